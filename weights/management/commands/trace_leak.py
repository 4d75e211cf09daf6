"""Name the recipient of leaked weights: ``manage.py trace_leak PATH... [--release SLUG]``.

PATH is any mix of suspect files and directories: a Meta set (``consolidated.NN.pth``),
one shard alone, transformers safetensors, in any float dtype. Each fingerprinted release
with grants is tried (or only ``--release``); for the best-matching grants it prints the
detection score, the probability that an innocent grant scores as high (computed, and
corrected for the number of grants), the account and the grant. It writes a signed
evidence report (JSON) to keep, under ``var/evidence/`` unless ``--evidence`` says where;
``--verify FILE`` checks such a report later. A copy that is not fingerprinted, or not
derived from the release, is reported as "no recipient", with the reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from weights.services import leak_tracing
from weights.services.leak_tracing import LeakTraceError, ReleaseTrace

ERR_NO_PATHS = "give the suspect files or directories (or --verify FILE)"
ERR_READ_EVIDENCE = "{path}: cannot read it as a JSON evidence report ({reason})"


def format_p(log10: float) -> str:
    """A probability from its log10, readable far below float's range (1e-20893)."""
    if log10 >= 0:
        return "1"
    if log10 > -300:
        return f"{10**log10:.1e}"
    return f"1e{math.floor(log10)}"


class Command(BaseCommand):
    help = "Trace leaked weight files to the grant whose fingerprint they carry."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("paths", nargs="*", type=Path, metavar="PATH")
        parser.add_argument("--release", metavar="SLUG", help="only this fingerprinted release")
        parser.add_argument(
            "--evidence", type=Path, metavar="PATH", help="report file or directory to write"
        )
        parser.add_argument("--top", type=int, default=5, help="grants to list (default 5)")
        parser.add_argument("--verify", type=Path, metavar="FILE", help="check a signed report")

    def handle(self, *args, **options) -> None:
        if options["verify"]:
            return self._verify(options["verify"])
        if not options["paths"]:
            raise CommandError(ERR_NO_PATHS)
        from weights.fingerprint.trace import TraceError

        try:
            traces = leak_tracing.trace_leak(options["paths"], slug=options["release"])
        except (LeakTraceError, TraceError) as exc:
            raise CommandError(str(exc)) from None
        best = traces[0]
        self._print(best, options["top"])
        for other in traces[1:]:
            self.stdout.write(f"Also tried {other.release.slug}: {self._verdict(other)}")
        keep = [t for t in traces if t.named] or [best]
        for trace in keep:
            path = self._write(trace, options["evidence"], several=len(keep) > 1)
            self.stdout.write(f"Evidence: {path} (signed; check it with --verify)")

    def _verdict(self, trace: ReleaseTrace) -> str:
        result = trace.result
        if not trace.named:
            return f"no recipient ({result.reason})"
        names = ", ".join(self._who(m.grant) for m in trace.named)
        return f"RECIPIENT: {names}"

    @staticmethod
    def _who(grant) -> str:
        user = grant.user
        return f"{user.get_username()} <{user.email}> (grant {grant.pk})"

    def _print(self, trace: ReleaseTrace, top: int) -> None:
        result = trace.result
        files = ", ".join(f"{Path(f.path).name} ({f.layout})" for f in result.suspect_files)
        self.stdout.write(f"Suspect: {files}")
        held = result.positions["held_by_suspect"]
        self.stdout.write(
            f"Release {trace.release.slug}: {len(trace.matches)} grant(s) scored on "
            f"{held:,} marked positions; threshold {result.threshold:g} (Bonferroni-corrected)"
        )
        self.stdout.write(f"Verdict: {self._verdict(trace)}")
        header = (
            f"  {'#':>2}  {'grant':>6}  {'account':<40} {'granted':<10}  {'score':>9}  p (innocent)"
        )
        self.stdout.write(header)
        for rank, match in enumerate(trace.matches[:top], start=1):
            grant, score = match.grant, match.score
            granted = grant.created_at.date().isoformat()
            revoked = " revoked" if grant.revoked_at else ""
            account = f"{grant.user.get_username()} <{grant.user.email}>"
            self.stdout.write(
                f"  {rank:>2}  {grant.pk:>6}  {account:<40} {granted:<10}  {score.score:>9.2f}  "
                f"{format_p(score.log10_p_corrected)}{'  NAMED' if match.named else ''}{revoked}"
            )
        self.stdout.write(
            "  p: the probability that a grant whose copy this is not scores this high, "
            "times the grants scored"
        )

    def _write(self, trace: ReleaseTrace, target: Path | None, *, several: bool) -> Path:
        document = leak_tracing.sign(leak_tracing.evidence(trace))
        stamp = timezone.now().strftime("%Y%m%dT%H%M%S")
        name = f"trace-{stamp}-{trace.release.slug}.json"
        if target is None:
            path = Path(settings.VAR_DIR) / "evidence" / name
        elif target.is_dir() or several:
            path = target / name
        else:
            path = target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        return path

    def _verify(self, path: Path) -> None:
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CommandError(ERR_READ_EVIDENCE.format(path=path, reason=exc)) from None
        try:
            body = leak_tracing.verify(document)
        except LeakTraceError as exc:
            raise CommandError(f"{path}: {exc}") from None
        named = ", ".join(
            f"{r['account']['username']} (grant {r['grant_id']})" for r in body["named_recipients"]
        )
        self.stdout.write(
            f"{path}: signature valid. Release {body['portal_release']['slug']}, "
            f"{body['timestamp']}: {body['verdict']}{': ' + named if named else ''}"
        )
