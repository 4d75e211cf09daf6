"""What a release's approval policy would decide for past applications, against reviewers.

The last line is a JSON object (access.services.approval_policies.DryRunReport.as_dict),
for scripts: agreement rate and every disagreement.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser

from access.services.approval_policies import policy_dry_run
from weights.models import Release


class Command(BaseCommand):
    help = "Compare a release's approval policy with the last N reviewer decisions."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--release", required=True, help="the release slug")
        parser.add_argument("--last", type=int, default=100, help="decisions to compare")

    def handle(self, *args, release: str, last: int, **options) -> None:
        if last < 1:
            raise CommandError("--last must be at least 1.")
        found = Release.objects.filter(slug=release).first()
        if found is None:
            raise CommandError(f"No release with slug {release!r}.")
        report = policy_dry_run(found, last=last)
        summary = report.as_dict()
        if not report.policy:
            self.stdout.write(f"{release} has no approval policy.")
        elif not report.rows:
            self.stdout.write(f"No reviewer decisions on {release} to compare yet.")
        else:
            self.stdout.write(
                f"{report.policy} on {release}: agrees with {summary['agreed']} of "
                f"{summary['evaluated']} reviewer decisions ({summary['agreement_rate']:.1%})."
            )
            for row in report.disagreements:
                self.stdout.write(
                    f"  application #{row.application_id}: policy {row.policy_outcome} "
                    f"({row.rule or 'no rule matched'}), reviewer {row.human_outcome}"
                )
        self.stdout.write(json.dumps(summary, sort_keys=True))
