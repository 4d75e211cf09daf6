"""The admin opens only to staff who signed in with a TOTP code (allauth mfa).

Sign-in goes through allauth so that its MFA stage runs; Django's own admin
login form, which knows nothing of 2FA, is never shown.
"""

from __future__ import annotations

from urllib.parse import urlencode

from allauth.mfa.models import Authenticator
from allauth.mfa.utils import is_mfa_enabled
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth import logout
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse

from access.second_factor import second_factor_satisfied, session_passed_second_factor

NEEDS_TOTP = (
    "Staff must set up two-factor authentication (an authenticator app) before using the admin."
)
NEEDS_TOTP_LOGIN = "Sign in with your authenticator code to open the admin."


class PortalAdminSite(admin.AdminSite):
    site_header = "LLaMA access — review"
    site_title = "LLaMA access admin"
    index_title = "Review and operations"

    def has_permission(self, request: HttpRequest) -> bool:
        return super().has_permission(request) and second_factor_satisfied(request)

    def login(self, request: HttpRequest, extra_context=None) -> HttpResponse:
        next_url = request.GET.get("next") or reverse("admin:index")
        user = request.user
        if (
            user.is_authenticated
            and user.is_active
            and user.is_staff
            and settings.PORTAL_ADMIN_REQUIRE_2FA
        ):
            if not is_mfa_enabled(user, [Authenticator.Type.TOTP]):
                messages.warning(request, NEEDS_TOTP)
                return HttpResponseRedirect(reverse("mfa_activate_totp"))
            if not session_passed_second_factor(request):
                logout(request)
                messages.info(request, NEEDS_TOTP_LOGIN)
        elif user.is_authenticated and not user.is_staff:
            messages.error(request, "Your account has no access to the review admin.")
            return HttpResponseRedirect(reverse("home"))
        return HttpResponseRedirect(f"{reverse('account_login')}?{urlencode({'next': next_url})}")
