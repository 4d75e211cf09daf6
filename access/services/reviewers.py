from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import Group, Permission
from django.db import transaction

REVIEWER_PERMISSIONS = (
    ("access", "view_application"),
    ("access", "decide_application"),
    ("access", "view_applicationevent"),
    ("access", "view_grant"),
    ("access", "view_grantevent"),
    ("access", "view_licenseversion"),
    ("access", "view_licenseacceptance"),
    ("access", "view_notification"),
    ("weights", "view_release"),
    ("weights", "view_artifact"),
    ("weights", "view_downloadlink"),
    ("weights", "view_downloadevent"),
    ("inference_demo", "view_demorequest"),
)


@transaction.atomic
def reviewers_group_ensure() -> Group:
    """Create the Reviewers group with exactly the permissions reviewing needs; safe to rerun."""
    group, _ = Group.objects.get_or_create(name=settings.PORTAL_REVIEWERS_GROUP)
    permissions = [
        Permission.objects.get(content_type__app_label=app, codename=codename)
        for app, codename in REVIEWER_PERMISSIONS
    ]
    group.permissions.add(*permissions)
    return group
