"""Write a small fake release in Meta's layout, for tests, demos and benchmarks.

The shards are deterministic random bytes, not loadable checkpoints; the layout,
names and checklists are exactly those of a real release.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from weights.checksums import file_digests, format_checklist

MIB = 1024 * 1024
_CHUNK = 8 * MIB
TOKENIZER_BYTES = 64 * 1024

# Meta's params.json per size, and how many model-parallel shards each came in.
PARAMS = {
    "7B": ({"dim": 4096, "n_heads": 32, "n_layers": 32}, 1),
    "13B": ({"dim": 5120, "n_heads": 40, "n_layers": 40}, 2),
    "30B": ({"dim": 6656, "n_heads": 52, "n_layers": 60}, 4),
    "33B": ({"dim": 6656, "n_heads": 52, "n_layers": 60}, 4),
    "65B": ({"dim": 8192, "n_heads": 64, "n_layers": 80}, 8),
}


def write_sample_release(
    directory: Path,
    *,
    size_label: str = "7B",
    shards: int | None = None,
    shard_bytes: int = MIB,
    seed: int = 0,
) -> list[Path]:
    """Write the release under `directory` and return the files written.

    The tokenizer depends only on the seed, so two sizes generated with one seed
    share it byte for byte, as real releases do.
    """
    arch, default_shards = PARAMS.get(size_label, PARAMS["7B"])
    shards = default_shards if shards is None else shards
    directory = Path(directory)
    size_dir = directory / size_label
    size_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = directory / "tokenizer.model"
    _write_random(tokenizer, TOKENIZER_BYTES, f"{seed}:tokenizer")
    params = size_dir / "params.json"
    params.write_text(
        json.dumps({**arch, "multiple_of": 256, "norm_eps": 1e-06, "vocab_size": -1}) + "\n"
    )
    shard_paths = [size_dir / f"consolidated.{i:02d}.pth" for i in range(shards)]
    for i, shard in enumerate(shard_paths):
        _write_random(shard, shard_bytes, f"{seed}:{size_label}:{i}")

    tokenizer_checklist = directory / "tokenizer_checklist.chk"
    _write_checklist(tokenizer_checklist, [tokenizer])
    checklist = size_dir / "checklist.chk"
    _write_checklist(checklist, [*shard_paths, params])
    return [tokenizer, tokenizer_checklist, params, *shard_paths, checklist]


def _write_random(path: Path, size: int, seed: str) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            n = min(remaining, _CHUNK)
            f.write(rng.randbytes(n))
            remaining -= n


def _write_checklist(path: Path, files: list[Path]) -> None:
    entries = {f.name: file_digests(f)[1] for f in files}
    path.write_text(format_checklist(entries))


class Command(BaseCommand):
    help = "Write a small fake LLaMA release (Meta's layout) into DIR."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("directory", type=Path)
        parser.add_argument("--size-label", default="7B", help="e.g. 7B, 13B, 33B, 65B")
        parser.add_argument("--shards", type=int, help="default: as many as Meta's release had")
        parser.add_argument("--shard-mb", type=float, default=1.0, help="size of each shard")
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args, **options) -> None:
        if options["shards"] is not None and options["shards"] < 1:
            raise CommandError("--shards must be at least 1")
        if options["shard_mb"] < 0:
            raise CommandError("--shard-mb must not be negative")
        written = write_sample_release(
            options["directory"],
            size_label=options["size_label"],
            shards=options["shards"],
            shard_bytes=int(options["shard_mb"] * MIB),
            seed=options["seed"],
        )
        total = sum(p.stat().st_size for p in written)
        self.stdout.write(
            f"Wrote {len(written)} files ({total / MIB:.1f} MiB) to {options['directory']}"
        )
