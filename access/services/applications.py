"""The researcher's side of the status machine: draft, submit, answer, withdraw."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from allauth.account.models import EmailAddress
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from access import errors
from access.models import Application, ApplicationEvent, Grant, LicenseAcceptance
from access.services.licenses import license_current
from access.services.notifications import notification_create
from access.services.request_forms import answers_save, required_answers_check
from access.services.webhooks import application_event_emit
from weights.models import Release

Status = Application.Status
Action = ApplicationEvent.Action

EDITABLE_FIELDS = (
    "full_name",
    "institutional_email",
    "affiliation",
    "organisation_type",
    "country",
    "role",
    "orcid",
    "scholar_url",
    "homepage_url",
    "publications",
    "intended_use",
)
REQUIRED_TO_SUBMIT = (
    "full_name",
    "institutional_email",
    "affiliation",
    "organisation_type",
    "country",
    "role",
    "intended_use",
)


def lock(application_id: int) -> Application:
    return Application.objects.select_for_update().get(pk=application_id)


def record_event(
    *,
    application: Application,
    actor: AbstractBaseUser,
    action: str,
    from_status: str,
    message: str = "",
    releases: Iterable[str] = (),
) -> ApplicationEvent:
    event = ApplicationEvent.objects.create(
        application=application,
        actor=actor,
        action=action,
        from_status=from_status,
        to_status=application.status,
        message=message,
        releases=sorted(releases),
    )
    application_event_emit(event)
    return event


def refuse_transition(application: Application, action: str) -> errors.IllegalTransition:
    return errors.IllegalTransition(
        errors.TRANSITION.format(action=action, status=application.get_status_display().lower())
    )


def notify_applicant(application: Application, kind: str, **extra: Any) -> None:
    notification_create(
        kind=kind,
        recipient=application.applicant.email,
        context={
            "application_id": application.pk,
            "full_name": application.full_name or application.applicant.email,
            "status": application.get_status_display(),
            "status_url": reverse("access:application_detail", args=[application.pk]),
            **extra,
        },
    )


def _validate_fields(application: Application, fields: Mapping[str, Any]) -> None:
    unknown = set(fields) - set(EDITABLE_FIELDS)
    if unknown:
        raise errors.InvalidInput(f"Unknown fields: {', '.join(sorted(unknown))}.")
    for name, value in fields.items():
        setattr(application, name, value if value is not None else "")
    try:
        application.full_clean(
            exclude=["applicant", "status", "license_acceptance"], validate_unique=False
        )
    except ValidationError as exc:
        raise errors.InvalidInput(
            "; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in exc.message_dict.items()),
            code="invalid_fields",
        ) from exc


def _active_grant_slugs(user: AbstractBaseUser) -> set[str]:
    return set(
        Grant.objects.filter(user=user, revoked_at__isnull=True).values_list(
            "release__slug", flat=True
        )
    )


@transaction.atomic
def application_save_draft(
    *,
    applicant: AbstractBaseUser,
    fields: Mapping[str, Any],
    releases: Iterable[Release] | None = None,
    application: Application | None = None,
    answers: Mapping[str, Any] | None = None,
) -> Application:
    """Create the applicant's draft or update it. Drafts may be incomplete.

    `answers` are the extra questions of the requested releases, {slug: {key: value}}
    (access.services.request_forms); None leaves them as they are.
    """
    if application is None:
        if Application.objects.filter(
            applicant=applicant, status__in=Application.OPEN_STATUSES
        ).exists():
            raise errors.IllegalTransition(errors.ALREADY_OPEN, code="already_open")
        application = Application(applicant=applicant, status=Status.DRAFT)
        creating = True
    else:
        application = lock(application.pk)
        if application.applicant_id != applicant.pk:
            raise errors.NotAllowed("This is not your application.")
        if not application.is_editable():
            raise refuse_transition(application, "edit")
        creating = False
    _validate_fields(application, fields)
    try:
        with transaction.atomic():
            application.save()
    except IntegrityError:
        raise errors.IllegalTransition(errors.ALREADY_OPEN, code="already_open") from None
    if releases is not None:
        application.requested_releases.set(list(releases))
    answers_save(application=application, answers=answers)
    if creating:
        record_event(
            application=application, actor=applicant, action=Action.CREATED, from_status=""
        )
    return application


@transaction.atomic
def application_submit(
    *,
    application: Application,
    applicant: AbstractBaseUser,
    license_acceptance: LicenseAcceptance | None,
) -> Application:
    application = lock(application.pk)
    if application.applicant_id != applicant.pk:
        raise errors.NotAllowed("This is not your application.")
    if application.status != Status.DRAFT:
        raise refuse_transition(application, "submit")
    if not EmailAddress.objects.filter(user=applicant, verified=True).exists():
        raise errors.NotAllowed(errors.EMAIL_NOT_VERIFIED, code="email_not_verified")
    missing = [
        str(Application._meta.get_field(name).verbose_name)
        for name in REQUIRED_TO_SUBMIT
        if not getattr(application, name)
    ]
    if missing:
        raise errors.InvalidInput(
            errors.INCOMPLETE.format(fields=", ".join(missing)), code="incomplete"
        )
    slugs = set(application.requested_releases.values_list("slug", flat=True))
    if not slugs:
        raise errors.InvalidInput(errors.NO_RELEASES, code="no_releases")
    required_answers_check(application)
    already = slugs & _active_grant_slugs(applicant)
    if already:
        raise errors.InvalidInput(
            errors.ALREADY_GRANTED.format(releases=", ".join(sorted(already))),
            code="already_granted",
        )
    current = license_current()
    if current is None:
        raise errors.ServiceError(errors.NO_CURRENT_LICENSE, code="no_license")
    if license_acceptance is None or license_acceptance.user_id != applicant.pk:
        raise errors.InvalidInput(errors.LICENSE_NOT_ACCEPTED, code="license_not_accepted")
    if license_acceptance.license_version_id != current.pk:
        raise errors.InvalidInput(errors.LICENSE_OUTDATED, code="license_outdated")

    application.status = Status.SUBMITTED
    application.license_acceptance = license_acceptance
    application.submitted_at = timezone.now()
    application.save(update_fields=["status", "license_acceptance", "submitted_at", "updated_at"])
    record_event(
        application=application,
        actor=applicant,
        action=Action.SUBMITTED,
        from_status=Status.DRAFT,
        releases=slugs,
    )
    notify_applicant(application, "application_submitted", releases=_release_names(slugs))
    notify_reviewers(
        application,
        "reviewer_new_submission",
        affiliation=application.affiliation,
        country=str(application.country.name),
        releases=_release_names(slugs),
    )
    _approval_policies_after_commit(application)
    return application


def _approval_policies_after_commit(application: Application) -> None:
    # Imported here: approval_policies acts through reviews, which imports this module.
    from access.services.approval_policies import policies_apply_after_commit

    policies_apply_after_commit(application.pk)


def _release_names(slugs: Iterable[str]) -> list[str]:
    return list(Release.objects.filter(slug__in=list(slugs)).values_list("name", flat=True))


def reviewer_emails(*, exclude: AbstractBaseUser | None = None) -> list[str]:
    users = get_user_model().objects.filter(
        is_active=True, is_staff=True, groups__name=settings.PORTAL_REVIEWERS_GROUP
    )
    if exclude is not None:
        users = users.exclude(pk=exclude.pk)
    return sorted({email for email in users.values_list("email", flat=True) if email})


def notify_reviewers(application: Application, kind: str, **extra: Any) -> None:
    """Immediate notices to every reviewer but the applicant; the daily digest replaces them."""
    if settings.PORTAL_REVIEWER_NOTIFICATIONS != "immediate":
        return
    context = {
        "application_id": application.pk,
        "full_name": application.full_name,
        "admin_url": reverse("admin:access_application_change", args=[application.pk]),
        **extra,
    }
    for email in reviewer_emails(exclude=application.applicant):
        notification_create(kind=kind, recipient=email, context=context)


@transaction.atomic
def application_withdraw(*, application: Application, applicant: AbstractBaseUser) -> Application:
    application = lock(application.pk)
    if application.applicant_id != applicant.pk:
        raise errors.NotAllowed("This is not your application.")
    if not application.is_open():
        raise refuse_transition(application, "withdraw")
    previous = application.status
    application.status = Status.WITHDRAWN
    application.decided_at = timezone.now()
    application.save(update_fields=["status", "decided_at", "updated_at"])
    record_event(
        application=application, actor=applicant, action=Action.WITHDRAWN, from_status=previous
    )
    if previous != Status.DRAFT:
        notify_applicant(application, "application_withdrawn")
    return application


@transaction.atomic
def application_answer(
    *, application: Application, applicant: AbstractBaseUser, answer: str
) -> Application:
    application = lock(application.pk)
    if application.applicant_id != applicant.pk:
        raise errors.NotAllowed("This is not your application.")
    if application.status != Status.INFO_REQUESTED:
        raise refuse_transition(application, "answer")
    answer = (answer or "").strip()
    if not answer:
        raise errors.InvalidInput(errors.ANSWER_REQUIRED, code="answer_required")
    if len(answer) > 5000:
        raise errors.InvalidInput("Keep the answer under 5000 characters.", code="too_long")
    application.status = Status.SUBMITTED
    application.save(update_fields=["status", "updated_at"])
    record_event(
        application=application,
        actor=applicant,
        action=Action.ANSWERED,
        from_status=Status.INFO_REQUESTED,
        message=answer,
    )
    notify_reviewers(application, "reviewer_answer_received", answer=answer)
    _approval_policies_after_commit(application)
    return application
    for email in reviewer_emails(exclude=applicant):
        notification_create(
            kind="reviewer_answer_received",
            recipient=email,
            context={
                "application_id": application.pk,
                "full_name": application.full_name,
                "answer": answer,
                "admin_url": reverse("admin:access_application_change", args=[application.pk]),
            },
        )
    return application
