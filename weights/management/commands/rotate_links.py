"""Rotate every live download link of a release.

Each unrevoked link of an active grant is revoked; with --email (the default) a fresh
link is issued and emailed to the researcher in the same transaction, so a failed email
leaves the old link working and the command can simply be run again. With --no-email
the links are only revoked: researchers get fresh ones on My downloads (a fresh link
nobody is told about would be of no use). Tokens are never printed.
"""

from __future__ import annotations

import argparse

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from access.models import Grant
from weights.models import DownloadLink, Release
from weights.services.links import link_email, link_issue, links_revoke_for_grant

REASON = "Rotated by an operator."


class Command(BaseCommand):
    help = "Revoke every live link of a release and email each researcher a fresh one."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--release", required=True, metavar="SLUG")
        parser.add_argument(
            "--email",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="Issue and email fresh links (default); --no-email only revokes.",
        )
        parser.add_argument("--reason", default=REASON, help="Recorded on each revoked link.")

    def handle(self, *args, **options) -> None:
        release = Release.objects.filter(slug=options["release"]).first()
        if release is None:
            raise CommandError(f"No release {options['release']!r}.")
        grant_ids = sorted(
            set(
                DownloadLink.objects.filter(
                    grant__release=release,
                    grant__revoked_at__isnull=True,
                    revoked_at__isnull=True,
                ).values_list("grant_id", flat=True)
            )
        )
        rotated, failed = [], []
        for grant_id in grant_ids:
            try:
                rotated.append(self._rotate(grant_id, options["reason"], email=options["email"]))
            except Exception as exc:  # one researcher's failure must not stop the others
                failed.append(f"grant {grant_id}: {type(exc).__name__}: {exc}")
        for recipient in rotated:
            self.stdout.write(f"  {recipient}")
        if options["email"]:
            self.stdout.write(
                f"Rotated {len(rotated)} link(s) of {release.slug}: fresh links emailed."
            )
        else:
            self.stdout.write(
                f"Revoked {len(rotated)} link(s) of {release.slug}; researchers get fresh "
                "links on My downloads."
            )
        if failed:
            raise CommandError(
                f"{len(failed)} grant(s) kept their old link (run again):\n" + "\n".join(failed)
            )

    @transaction.atomic
    def _rotate(self, grant_id: int, reason: str, *, email: bool) -> str:
        grant = (
            # of=self: a direct grant has no application, and PostgreSQL cannot lock the
            # nullable side of the outer join.
            Grant.objects.select_for_update(of=("self",))
            .select_related("release", "user", "application")
            .get(pk=grant_id)
        )
        links_revoke_for_grant(grant_id=grant.pk, reason=reason)
        if email and grant.revoked_at is None:
            issued = link_issue(grant=grant)
            link_email(grant, issued).send()
            DownloadLink.objects.filter(pk=issued.link.pk).update(emailed_at=timezone.now())
        return grant.user.email
