from django.urls import path

from access import views

app_name = "access"

urlpatterns = [
    path("apply/", views.apply, name="apply"),
    path("applications/", views.application_list, name="application_list"),
    path("applications/<int:pk>/", views.application_detail, name="application_detail"),
    path(
        "applications/<int:pk>/withdraw/", views.application_withdraw, name="application_withdraw"
    ),
    path("applications/<int:pk>/answer/", views.application_answer, name="application_answer"),
    path("license/", views.license_current, name="license"),
    path("license/accept/", views.license_accept, name="license_accept"),
    path("account/api-token/", views.api_token, name="api_token"),
]
