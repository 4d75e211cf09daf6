"""`manage.py publish_release DIR --slug SLUG`: a thin wrapper around `release_publish`."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from weights.services.fingerprinting import FingerprintRefused, release_mark_fingerprinted
from weights.services.publishing import PublishError, release_publish
from weights.storage import StorageError

# Small files (params.json, checklists) finish too fast for a bar to say anything.
PROGRESS_MIN_BYTES = 16 * 1024 * 1024


class Command(BaseCommand):
    help = (
        "Hash, verify, upload and record every file of a release directory, then its "
        "Hugging Face transformers variant when it holds a loadable checkpoint."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("directory", type=Path)
        parser.add_argument("--slug", required=True, help="e.g. llama-7b")
        parser.add_argument("--name", help="display name of a new release (default: the slug)")
        parser.add_argument("--family", default="llama")
        parser.add_argument("--parameter-count", type=int)
        parser.add_argument("--description", default="")
        parser.add_argument(
            "--no-transformers",
            dest="transformers",
            action="store_false",
            help="publish Meta's files only, without converting the transformers variant",
        )
        parser.add_argument(
            "--fingerprinted",
            action="store_true",
            help="give every grantee their own traceable copy (before the first grant only; "
            "see manage.py trace_leak)",
        )
        parser.add_argument(
            "--work-dir",
            type=Path,
            help="where the transformers variant is converted; needs the checkpoint's size "
            "free (default: the system's temporary directory, $TMPDIR)",
        )

    def handle(self, *args, **options) -> None:
        show_bars = options["verbosity"] > 0

        def progress(phase: str, path: str, size: int) -> tqdm | None:
            if not show_bars or size < PROGRESS_MIN_BYTES:
                return None
            verb = {"hash": "hashing", "upload": "uploading", "convert": "converting"}[phase]
            # disable=None: no bar when stderr is not a terminal (cron, CI logs).
            return tqdm(
                total=size,
                desc=f"{verb} {path}",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=None,
            )

        try:
            result = release_publish(
                directory=options["directory"],
                slug=options["slug"],
                name=options["name"],
                family=options["family"],
                parameter_count=options["parameter_count"],
                description=options["description"],
                progress=progress,
                transformers=options["transformers"],
                work_dir=options["work_dir"],
            )
            if options["fingerprinted"]:
                release_mark_fingerprinted(release=result.release)
        except (PublishError, StorageError, FingerprintRefused) as exc:
            raise CommandError(str(exc)) from exc

        if options["fingerprinted"]:
            self.stdout.write(
                f"{result.release.slug} is fingerprinted: each grantee gets their own copy."
            )
        prefix = "Created release" if result.release_created else "Release"
        self.stdout.write(
            f"{prefix} {result.release.slug}: {len(result.created)} files added, "
            f"{len(result.skipped)} already published, "
            f"{result.bytes_uploaded / 2**20:.1f} MiB uploaded."
        )
        for path in result.created:
            self.stdout.write(f"  + {path}")
        if result.transformers is not None:
            self.stdout.write(result.transformers.message)
            variant = result.transformers.published
            for path in variant.created if variant else []:
                self.stdout.write(f"  + {path}")
