from django.contrib import admin

from access.models import Application

admin.site.register(Application)
