"""Bulk-create realistic applications for benchmarks: `manage.py seed_applications 100000`.

Not part of `make run`: the rows are fake people. See access.seeding for what is written.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from access.seeding import seed_applications


class Command(BaseCommand):
    help = "Bulk-create N realistic submitted and decided applications (no emails, no webhooks)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("count", type=int, help="How many applications (and applicants).")
        parser.add_argument(
            "--releases",
            default="",
            help="Comma-separated release slugs to request (default: every release; "
            "llama-7b and llama-13b are created when there is none).",
        )
        parser.add_argument(
            "--decided-fraction",
            type=float,
            default=0.3,
            help="Share approved or rejected (8 in 10 approved); the rest await review.",
        )
        parser.add_argument(
            "--seed", type=int, default=None, help="Random seed, for repeatable data."
        )
        parser.add_argument("--batch-size", type=int, default=2000)

    def handle(self, *args, count: int, releases: str, decided_fraction: float, **options) -> None:
        if count < 1:
            raise CommandError("count must be at least 1")
        slugs = [slug.strip() for slug in releases.split(",") if slug.strip()]
        try:
            result = seed_applications(
                count,
                releases=slugs,
                decided_fraction=decided_fraction,
                seed=options["seed"],
                batch_size=max(1, options["batch_size"]),
                progress=lambda done: (
                    self.stderr.write(f"  {done}/{count}") if options["verbosity"] > 1 else None
                ),
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"Created {result.applications} applications ({result.decided} decided, "
            f"{result.grants} grants) in {result.seconds:.1f} s."
        )
