"""The reviewer's side: approve (per release), reject, ask for information, revoke."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from access import errors
from access.models import Application, ApplicationEvent, Grant, PolicyRule
from access.services import claims
from access.services.applications import lock, notify_applicant, record_event, refuse_transition
from access.services.webhooks import application_event_emit, grant_revoked_emit
from weights.models import Release

Status = Application.Status
Action = ApplicationEvent.Action
DECIDABLE = (Status.SUBMITTED, Status.INFO_REQUESTED)


def is_reviewer(user: AbstractBaseUser) -> bool:
    return bool(
        user.is_authenticated
        and user.is_active
        and user.is_staff
        and (user.is_superuser or user.groups.filter(name=settings.PORTAL_REVIEWERS_GROUP).exists())
    )


@dataclass(frozen=True)
class PolicyDecider:
    """An approval policy deciding in a reviewer's place (access.services.approval_policies).

    It may approve and ask for information, never reject or revoke: those stay with people.
    `user` is the policy's service account, for the columns that need a user.
    """

    rule: PolicyRule
    label: str  # "policy <name>: rule <rule>", as the timeline shows it
    user: AbstractBaseUser


Decider = AbstractBaseUser | PolicyDecider


def _acting_user(decider: Decider) -> AbstractBaseUser:
    return decider.user if isinstance(decider, PolicyDecider) else decider


def _record(*, decider: Decider, **fields) -> ApplicationEvent:
    if not isinstance(decider, PolicyDecider):
        return record_event(actor=decider, **fields)
    application = fields.pop("application")
    event = ApplicationEvent.objects.create(
        application=application,
        actor=decider.user,
        policy_rule=decider.rule,
        actor_label=decider.label,
        action=fields["action"],
        from_status=fields["from_status"],
        to_status=application.status,
        message=fields.get("message", ""),
        releases=sorted(fields.get("releases", ())),
    )
    application_event_emit(event)
    return event


def _check_reviewer(
    application: Application, reviewer: Decider, *, policy_may: bool = False
) -> None:
    if isinstance(reviewer, PolicyDecider):
        if not policy_may:
            raise errors.NotAllowed(errors.NOT_REVIEWER, code="not_reviewer")
        return
    if not is_reviewer(reviewer):
        raise errors.NotAllowed(errors.NOT_REVIEWER, code="not_reviewer")
    if application.applicant_id == reviewer.pk:
        raise errors.NotAllowed(errors.OWN_APPLICATION, code="own_application")
    # Another reviewer's live claim binds every door (admin, API, commands) alike.
    claims.refuse_if_held(application, reviewer)


@transaction.atomic
def application_approve(
    *,
    application: Application,
    reviewer: Decider,
    releases: Iterable[Release],
    note: str = "",
) -> list[Grant]:
    """Approve some or all requested releases; creates one Grant per release granted."""
    application = lock(application.pk)
    _check_reviewer(application, reviewer, policy_may=True)
    if application.status not in DECIDABLE:
        raise refuse_transition(application, "approve")
    chosen = {release.slug: release for release in releases}
    if not chosen:
        raise errors.InvalidInput(errors.NO_RELEASES, code="no_releases")
    requested = set(application.requested_releases.values_list("slug", flat=True))
    extra = set(chosen) - requested
    if extra:
        raise errors.InvalidInput(
            errors.RELEASES_NOT_REQUESTED.format(releases=", ".join(sorted(extra))),
            code="not_requested",
        )
    license_version = application.license_acceptance.license_version
    already = set(
        Grant.objects.filter(
            user=application.applicant, release__slug__in=chosen, revoked_at__isnull=True
        ).values_list("release__slug", flat=True)
    )
    grants = [
        Grant.objects.create(
            user=application.applicant,
            release=release,
            application=application,
            license_version=license_version,
            granted_by=_acting_user(reviewer),
        )
        for slug, release in sorted(chosen.items())
        if slug not in already
    ]
    previous = application.status
    application.status = Status.APPROVED
    application.decided_at = timezone.now()
    application.save(
        update_fields=["status", "decided_at", "updated_at", *claims.end_claim(application)]
    )
    _record(
        application=application,
        decider=reviewer,
        action=Action.APPROVED,
        from_status=previous,
        message=note.strip(),
        releases=chosen,
    )
    not_granted = sorted(requested - set(chosen))
    notify_applicant(
        application,
        "application_approved",
        granted=[release.name for _, release in sorted(chosen.items())],
        not_granted=list(
            Release.objects.filter(slug__in=not_granted).values_list("name", flat=True)
        ),
        note=note.strip(),
    )
    for grant in grants:
        transaction.on_commit(lambda grant_id=grant.pk: _grant_created(grant_id))
    return grants


def _grant_created(grant_id: int) -> None:
    """Hook for the weights app, which issues download links for new grants."""
    from access.signals import grant_created

    grant_created.send(sender=Grant, grant_id=grant_id)


@transaction.atomic
def application_reject(
    *, application: Application, reviewer: AbstractBaseUser, reason: str
) -> Application:
    application = lock(application.pk)
    _check_reviewer(application, reviewer)
    if application.status not in DECIDABLE:
        raise refuse_transition(application, "reject")
    reason = (reason or "").strip()
    if not reason:
        raise errors.InvalidInput(errors.REASON_REQUIRED, code="reason_required")
    previous = application.status
    application.status = Status.REJECTED
    application.decided_at = timezone.now()
    application.save(
        update_fields=["status", "decided_at", "updated_at", *claims.end_claim(application)]
    )
    record_event(
        application=application,
        actor=reviewer,
        action=Action.REJECTED,
        from_status=previous,
        message=reason,
    )
    notify_applicant(application, "application_rejected", reason=reason)
    return application


@transaction.atomic
def application_request_info(
    *, application: Application, reviewer: Decider, question: str
) -> Application:
    application = lock(application.pk)
    _check_reviewer(application, reviewer, policy_may=True)
    if application.status != Status.SUBMITTED:
        raise refuse_transition(application, "ask about")
    question = (question or "").strip()
    if not question:
        raise errors.InvalidInput(errors.QUESTION_REQUIRED, code="question_required")
    application.status = Status.INFO_REQUESTED
    application.save(update_fields=["status", "updated_at", *claims.end_claim(application)])
    _record(
        application=application,
        decider=reviewer,
        action=Action.INFO_REQUESTED,
        from_status=Status.SUBMITTED,
        message=question,
    )
    notify_applicant(application, "application_info_requested", question=question)
    return application


@transaction.atomic
def application_revoke(
    *, application: Application, reviewer: AbstractBaseUser, reason: str
) -> Application:
    """Withdraw an approval: every grant it created is revoked at once."""
    application = lock(application.pk)
    _check_reviewer(application, reviewer)
    if application.status != Status.APPROVED:
        raise refuse_transition(application, "revoke")
    reason = (reason or "").strip()
    if not reason:
        raise errors.InvalidInput(errors.REASON_REQUIRED, code="reason_required")
    revoked = [
        grant_revoke(grant=grant, reviewer=reviewer, reason=reason, notify=False)
        for grant in application.grants.filter(revoked_at__isnull=True)
    ]
    application.status = Status.REVOKED
    application.decided_at = timezone.now()
    application.save(update_fields=["status", "decided_at", "updated_at"])
    record_event(
        application=application,
        actor=reviewer,
        action=Action.REVOKED,
        from_status=Status.APPROVED,
        message=reason,
        releases=[grant.release.slug for grant in revoked],
    )
    notify_applicant(application, "application_revoked", reason=reason)
    return application


@transaction.atomic
def grant_revoke(
    *, grant: Grant, reviewer: AbstractBaseUser, reason: str, notify: bool = True
) -> Grant:
    grant = (
        # of=self: Grant.application is nullable (direct grants), and PostgreSQL refuses
        # FOR UPDATE on the nullable side of the outer join.
        Grant.objects.select_for_update(of=("self",))
        .select_related("release", "application")
        .get(pk=grant.pk)
    )
    if isinstance(reviewer, PolicyDecider) or not is_reviewer(reviewer):
        raise errors.NotAllowed(errors.NOT_REVIEWER, code="not_reviewer")
    if grant.user_id == reviewer.pk:
        raise errors.NotAllowed(errors.OWN_APPLICATION, code="own_application")
    if grant.revoked_at is not None:
        raise errors.IllegalTransition("This grant is revoked already.", code="already_revoked")
    reason = (reason or "").strip()
    if not reason:
        raise errors.InvalidInput(errors.REASON_REQUIRED, code="reason_required")
    grant.revoked_at = timezone.now()
    grant.revoked_by = reviewer
    grant.revoke_reason = reason
    grant.save(update_fields=["revoked_at", "revoked_by", "revoke_reason"])
    grant_revoked_emit(grant)
    transaction.on_commit(lambda: _grant_revoked(grant.pk))
    if notify:
        notify_applicant(
            grant.application, "grant_revoked", release=grant.release.name, reason=reason
        )
    return grant


def _grant_revoked(grant_id: int) -> None:
    from access.signals import grant_revoked

    grant_revoked.send(sender=Grant, grant_id=grant_id)
