"""Researcher pages. Parse, call a service, render; the rules live in access.services."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from access import errors, selectors
from access.forms import AnswerForm, ApplicationForm, LicenseAcceptForm
from access.models import Application, LicenseAcceptance
from access.services import applications as application_services
from access.services import licenses as license_services
from access.services import request_forms, throttles
from portal.http import client_ip, user_agent


def posted(request: HttpRequest):
    """The POST data, or None on GET; an empty POST still binds the form and shows errors."""
    return request.POST if request.method == "POST" else None


@login_required
def apply(request: HttpRequest) -> HttpResponse:
    current = selectors.application_open_for(user=request.user)
    if current is not None and not current.is_editable():
        messages.info(request, "Your application is with the reviewers; follow it here.")
        return redirect("access:application_detail", pk=current.pk)
    license_version = license_services.license_current()
    form = ApplicationForm(posted(request), instance=current)
    if request.method == "POST" and form.is_valid():
        submitting = request.POST.get("action") == "submit"
        try:
            application = application_services.application_save_draft(
                applicant=request.user,
                fields=form.service_fields(),
                releases=form.cleaned_data["requested_releases"],
                application=current,
                answers=form.answers,
            )
        except request_forms.AnswersInvalid as exc:
            form.add_answer_errors(exc.field_errors)
        except errors.ServiceError as exc:
            form.add_error(None, str(exc))
        else:
            if not submitting:
                messages.success(request, "Draft saved. Submit it when it is complete.")
                return redirect("access:apply")
            if _submit(request, form, application, license_version):
                messages.success(request, "Application submitted. We emailed you a copy.")
                return redirect("access:application_detail", pk=application.pk)
            form.instance = application
    return render(
        request,
        "access/apply.html",
        {"form": form, "license": license_version, "application": current},
    )


def _submit(
    request: HttpRequest, form: ApplicationForm, application: Application, license_version
) -> bool:
    if not form.cleaned_data.get("accept_license"):
        form.add_error("accept_license", errors.LICENSE_NOT_ACCEPTED)
        return False
    try:
        with transaction.atomic():
            throttles.submission_allowance_check(user=request.user)
            acceptance = None
            if license_version is not None:
                acceptance = license_services.license_accept(
                    user=request.user,
                    license_version=license_version,
                    ip_address=client_ip(request),
                    user_agent=user_agent(request),
                )
            application_services.application_submit(
                application=application, applicant=request.user, license_acceptance=acceptance
            )
    except errors.ServiceError as exc:
        form.add_error(None, f"Your draft is saved, but it could not be submitted: {exc}")
        if isinstance(exc, request_forms.AnswersInvalid):
            form.add_answer_errors(exc.field_errors)
        return False
    return True


@login_required
def application_list(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "access/application_list.html",
        {
            "applications": selectors.applications_for(user=request.user).order_by("-created_at"),
            "grants": selectors.grants_for(user=request.user),
            "open_application": selectors.application_open_for(user=request.user),
        },
    )


@login_required
def application_detail(request: HttpRequest, pk: int) -> HttpResponse:
    application = get_object_or_404(selectors.applications_for(user=request.user), pk=pk)
    return render(
        request,
        "access/application_detail.html",
        {
            "application": application,
            # A hold names the policy rule that held it: not for applicants to game.
            "events": application.events.exclude(action__in=["created", "held"]).select_related(
                "actor"
            ),
            "grants": application.grants.select_related("release"),
            "answer_form": AnswerForm(),
            "answer_sheets": request_forms.answer_sheets(application),
        },
    )


@login_required
@require_POST
def application_withdraw(request: HttpRequest, pk: int) -> HttpResponse:
    application = get_object_or_404(selectors.applications_for(user=request.user), pk=pk)
    try:
        application_services.application_withdraw(application=application, applicant=request.user)
    except errors.ServiceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "Application withdrawn.")
    return redirect("access:application_detail", pk=pk)


@login_required
@require_POST
def application_answer(request: HttpRequest, pk: int) -> HttpResponse:
    application = get_object_or_404(selectors.applications_for(user=request.user), pk=pk)
    form = AnswerForm(request.POST)
    if not form.is_valid():
        for error in form.errors.get("answer", []):
            messages.error(request, f"Answer: {error}")
        return redirect("access:application_detail", pk=pk)
    try:
        application_services.application_answer(
            application=application, applicant=request.user, answer=form.cleaned_data["answer"]
        )
    except errors.ServiceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "Answer sent to the reviewers.")
    return redirect("access:application_detail", pk=pk)


def license_current(request: HttpRequest) -> HttpResponse:
    license_version = license_services.license_current()
    accepted = None
    if license_version and request.user.is_authenticated:
        accepted = LicenseAcceptance.objects.filter(
            user=request.user, license_version=license_version
        ).first()
    return render(
        request, "access/license.html", {"license": license_version, "accepted": accepted}
    )


@login_required
def license_accept(request: HttpRequest) -> HttpResponse:
    license_version = license_services.license_current()
    if license_version is None:
        messages.error(request, errors.NO_CURRENT_LICENSE)
        return redirect("home")
    form = LicenseAcceptForm(posted(request))
    if request.method == "POST" and form.is_valid():
        license_services.license_accept(
            user=request.user,
            license_version=license_version,
            ip_address=client_ip(request),
            user_agent=user_agent(request),
        )
        messages.success(request, f"You accepted {license_version}.")
        return redirect(
            request.GET.get("next") if _safe_next(request) else "access:application_list"
        )
    accepted = LicenseAcceptance.objects.filter(
        user=request.user, license_version=license_version
    ).first()
    return render(
        request,
        "access/license_accept.html",
        {"license": license_version, "form": form, "accepted": accepted},
    )


def _safe_next(request: HttpRequest) -> bool:
    from django.utils.http import url_has_allowed_host_and_scheme

    target = request.GET.get("next", "")
    return bool(target) and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
