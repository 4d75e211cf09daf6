"""Helpers that run inside Django with the private stack's settings.

`python -m prove.internal COMMAND '{json kwargs}'`; the last stdout line is a JSON result.
They call the portal's services, as a reviewer or an operator would, never its internals.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

APPLICATION_FIELDS = {
    "full_name": "Ada Prover",
    "institutional_email": "ada@uni.example.edu",
    "affiliation": "University of Examples",
    "organisation_type": "academic",
    "country": "GB",
    "role": "Research fellow",
    "intended_use": "Studying robustness of language models under distribution shift.",
}


def _researcher(username: str):
    """A user with a verified address, as allauth leaves one after sign-up."""
    from allauth.account.models import EmailAddress
    from django.contrib.auth import get_user_model

    email = f"{username}@uni.example.edu"
    user, _ = get_user_model().objects.get_or_create(username=username, defaults={"email": email})
    EmailAddress.objects.update_or_create(
        user=user, email=email, defaults={"verified": True, "primary": True}
    )
    return user


def _user(username: str):
    from access.tokens import token_create

    user = _researcher(username)
    return user, token_create(user=user, name="prove", second_factor=False).secret


def _draft(user, slug: str):
    from access.services.applications import application_save_draft
    from weights.models import Release

    return application_save_draft(
        applicant=user,
        fields={**APPLICATION_FIELDS, "full_name": f"Ada {user.username}"},
        releases=[Release.objects.get(slug=slug)],
    )


def _submit(user, application):
    from access.services.applications import application_submit
    from access.services.licenses import license_accept, license_current

    acceptance = license_accept(user=user, license_version=license_current(), ip_address=None)
    return application_submit(
        application=application, applicant=user, license_acceptance=acceptance
    )


def _approve(application, slug: str):
    from django.contrib.auth import get_user_model

    from access.services.reviews import application_approve
    from weights.models import Release

    reviewer = get_user_model().objects.get(username="reviewer")
    return application_approve(
        application=application, reviewer=reviewer, releases=[Release.objects.get(slug=slug)]
    )


def granted_links(*, prefix: str, count: int, slug: str, budget_copies: int) -> dict:
    """`count` researchers approved for `slug`, each with a fresh link of a large budget."""
    from weights.services.links import link_issue

    out = []
    for i in range(count):
        user, api_token = _user(f"{prefix}{i}")
        application = _submit(user, _draft(user, slug))
        (grant,) = _approve(application, slug)
        issued = link_issue(grant=grant, budget_copies=budget_copies)
        out.append({"user": user.username, "api_token": api_token, "token": issued.token})
    return {"links": out}


def launch_links(*, prefix: str, count: int, slug: str, budget_copies: int) -> dict:
    """`count` grantees of `slug`, each submitted, approved and given one link of
    `budget_copies` through the same services as granted_links, without the API token
    nobody uses here; and the release's shards (path, size), the files they will fetch."""
    from weights.models import Artifact
    from weights.services.links import link_issue

    tokens = []
    for i in range(count):
        user = _researcher(f"{prefix}{i}")
        (grant,) = _approve(_submit(user, _draft(user, slug)), slug)
        tokens.append(link_issue(grant=grant, budget_copies=budget_copies).token)
    shards = Artifact.objects.filter(release__slug=slug, path__contains="/consolidated.")
    return {"tokens": tokens, "shards": list(shards.order_by("path").values("path", "size"))}


def launch_accounting(*, slug: str, paths: list[str]) -> dict:
    """What the launch charged: one query over LinkUsage for the live links of `slug`
    (each (link, shard) must be charged exactly the shard's size) and the events recorded."""
    from django.db.models import Count, F, Q, Sum

    from weights.models import DownloadEvent, LinkUsage

    usage = LinkUsage.objects.filter(
        link__grant__release__slug=slug, link__revoked_at__isnull=True, artifact__path__in=paths
    ).aggregate(
        pairs=Count("pk"),
        exact=Count("pk", filter=Q(bytes_charged=F("artifact__size"))),
        over=Count("pk", filter=Q(bytes_charged__gt=F("artifact__size"))),
        under=Count("pk", filter=Q(bytes_charged__lt=F("artifact__size"))),
        bytes_charged=Sum("bytes_charged"),
        bytes_forgiven=Sum("bytes_forgiven"),
        bytes_expected=Sum("artifact__size"),
    )
    events = DownloadEvent.objects.filter(link__grant__release__slug=slug).aggregate(
        rows=Count("pk"),
        redirected=Count("pk", filter=Q(status_code=302, outcome=DownloadEvent.Outcome.REDIRECTED)),
        bytes=Sum("bytes"),
    )
    return {"usage": usage, "events": events}


def reviewer_token() -> dict:
    """A reviewer token as minted after a TOTP sign-in (the only kind the review API takes)."""
    from allauth.mfa.totp.internal.auth import TOTP, generate_totp_secret
    from allauth.mfa.utils import is_mfa_enabled
    from django.contrib.auth import get_user_model

    from access.tokens import token_create

    reviewer = get_user_model().objects.get(username="reviewer")
    if not is_mfa_enabled(reviewer):
        TOTP.activate(reviewer, generate_totp_secret())
    return {"token": token_create(user=reviewer, name="prove", second_factor=True).secret}


def drafts(*, prefix: str, count: int, slug: str) -> dict:
    """Researchers with a complete draft, ready to submit through the API."""
    out = []
    for i in range(count):
        user, api_token = _user(f"{prefix}{i}")
        application = _draft(user, slug)
        out.append({"user": user.username, "api_token": api_token, "application": application.pk})
    return {"drafts": out}


def submit_and_approve(*, prefix: str, count: int, slug: str) -> dict:
    """Submit and approve: the outbox rows and link tasks go to the broker after commit."""
    out = []
    for i in range(count):
        user, _ = _user(f"{prefix}{i}")
        application = _submit(user, _draft(user, slug))
        (grant,) = _approve(application, slug)
        out.append({"application": application.pk, "grant": grant.pk, "email": user.email})
    return {"submitted": out}


def counts(*, usernames: list[str] | None = None, mail_dir: str = "") -> dict:
    """Outbox, link and mail counts (per researcher when usernames are given)."""
    from django.contrib.auth import get_user_model

    from access.models import Grant, Notification
    from weights.models import DownloadLink

    result = {
        "notifications": Notification.objects.count(),
        "notifications_sent": Notification.objects.filter(sent_at__isnull=False).count(),
        "notifications_unsent": Notification.objects.filter(sent_at__isnull=True).count(),
        "eml_files": len(list(Path(mail_dir).glob("*.eml"))) if mail_dir else None,
    }
    if usernames:
        users = get_user_model().objects.filter(username__in=usernames)
        emails = list(users.values_list("email", flat=True))
        grants = Grant.objects.filter(user__in=users)
        result["per_grant"] = {
            str(g.pk): {
                "links": DownloadLink.objects.filter(grant=g).count(),
                "links_emailed": DownloadLink.objects.filter(
                    grant=g, emailed_at__isnull=False
                ).count(),
            }
            for g in grants
        }
        result["user_notifications"] = Notification.objects.filter(recipient__in=emails).count()
        result["user_notifications_sent"] = Notification.objects.filter(
            recipient__in=emails, sent_at__isnull=False
        ).count()
        if mail_dir:
            per_recipient: dict[str, int] = {}
            for eml in Path(mail_dir).glob("*.eml"):
                head = eml.read_bytes()[:4000].decode("utf-8", "replace")
                for email in emails:
                    if f"To: {email}" in head:
                        per_recipient[email] = per_recipient.get(email, 0) + 1
            result["eml_per_recipient"] = per_recipient
    return result


def sweep() -> dict:
    """What beat runs every five minutes: the outbox sweep and missing link emails."""
    from access.tasks import sweep_outbox
    from weights.tasks import issue_missing_links

    return {"outbox_sent": sweep_outbox(), "links_issued": issue_missing_links()}


def create_bucket(*, bucket: str) -> dict:
    from weights.storage import get_storage

    get_storage().client.create_bucket(Bucket=bucket)
    return {"bucket": bucket}


def release_rows(*, slug: str) -> dict:
    from weights.models import Artifact, Release

    return {
        "releases": Release.objects.filter(slug=slug).count(),
        "artifacts": Artifact.objects.filter(release__slug=slug).count(),
    }


def link_usage(*, token: str) -> dict:
    from weights.models import DownloadEvent, DownloadLink, LinkUsage
    from weights.tokens import token_hash

    link = DownloadLink.objects.get(token_hash=token_hash(token))
    return {
        "bytes_charged": sum(
            LinkUsage.objects.filter(link=link).values_list("bytes_charged", flat=True)
        ),
        "events": list(
            DownloadEvent.objects.filter(link=link).values_list("status_code", "outcome")
        ),
    }


COMMANDS = {
    f.__name__: f
    for f in (
        granted_links,
        launch_links,
        launch_accounting,
        reviewer_token,
        drafts,
        submit_and_approve,
        counts,
        sweep,
        create_bucket,
        release_rows,
        link_usage,
    )
}


def main() -> None:
    import django

    django.setup()
    command, kwargs = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
    print(json.dumps(COMMANDS[command](**kwargs), default=str))


if __name__ == "__main__":
    main()
