"""The API tokens page: create (secret shown once), list and revoke. Rules in access.tokens."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from access import errors
from access import tokens as token_services
from access.forms import ApiTokenForm
from access.second_factor import session_passed_second_factor


def _form(request: HttpRequest, data=None) -> ApiTokenForm:
    return ApiTokenForm(
        data,
        max_days=token_services.max_lifetime_days(request.user),
        default_days=settings.PORTAL_API_TOKEN_DAYS,
    )


@never_cache
@login_required
def api_tokens(request: HttpRequest) -> HttpResponse:
    form = _form(request, request.POST if request.method == "POST" else None)
    issued, limited = None, False
    if request.method == "POST":
        try:
            token_services.token_create_allowance_check(request)
            if form.is_valid():
                issued = token_services.token_create_from_session(
                    request=request, name=form.cleaned_data["name"], days=form.cleaned_data["days"]
                )
                form = _form(request)
        except token_services.TokenCreateLimited as exc:
            limited = True
            form.add_error(None, str(exc))
        except errors.ServiceError as exc:
            form.add_error(None, str(exc))
    second_factor = session_passed_second_factor(request)
    return render(
        request,
        "access/api_tokens.html",
        {
            "form": form,
            "issued": issued,
            "tokens": token_services.tokens_of(request.user),
            "staff_blocked": request.user.is_staff
            and settings.PORTAL_ADMIN_REQUIRE_2FA
            and not second_factor,
            "needs_second_factor": token_services.STAFF_NEEDS_SECOND_FACTOR,
        },
        status=429 if limited else 400 if request.method == "POST" and issued is None else 200,
    )


@login_required
@require_POST
def api_token_revoke(request: HttpRequest, token_key: str) -> HttpResponse:
    try:
        token_services.token_revoke(user=request.user, token_key=token_key)
    except errors.ServiceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "Token revoked: it no longer works.")
    return redirect("access:api_tokens")


@login_required
@require_POST
def api_token_revoke_all(request: HttpRequest) -> HttpResponse:
    count = token_services.token_revoke_all(user=request.user)
    messages.success(request, f"Revoked {count} token{'s' if count != 1 else ''}.")
    return redirect("access:api_tokens")
