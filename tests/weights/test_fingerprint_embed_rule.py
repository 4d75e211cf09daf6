"""The embedder's one-ulp rule on every bit pattern, its per-thread working buffer, and the
torch-free q/k row order it maps transformers files back with.

The oracle is torch.nextafter on the values themselves, sharing nothing with the bit
arithmetic of ``embed.ulp_step``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from inference_demo.convert import permute_rotary
from inference_demo.hf_layout import rotary_rows
from tests.weights.test_fingerprint_embed import ALICE, BOB, KEY, write_meta
from weights.fingerprint import embed
from weights.fingerprint.embed import fingerprint_range
from weights.fingerprint.layout import directory_layouts

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("up", [False, True])
def test_ulp_step_of_every_bit_pattern_is_the_numeric_neighbour_or_nothing(name, up) -> None:
    dtype = DTYPES[name]
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = torch.from_numpy(patterns.view(np.int16).copy()).view(dtype)
    moved = torch.nextafter(values, torch.full_like(values, torch.inf if up else -torch.inf))
    tiny = torch.finfo(dtype).tiny
    normal = values.isfinite() & (values.abs() >= tiny)
    allowed = normal & moved.isfinite() & (moved.abs() >= tiny)
    expected = torch.where(allowed, moved, values).view(torch.int16).numpy().view(np.uint16)

    got = embed.ulp_step(patterns, name, np.full(len(patterns), up))
    assert np.array_equal(got, expected)
    assert np.array_equal(embed.ulp_step(patterns, name, np.full(len(patterns), up, np.uint8)), got)
    assert int(allowed.sum()) > 60_000  # nearly every pattern moves; the skips are the edges


def test_threads_fingerprinting_at_once_each_get_their_own_bytes(tmp_path) -> None:
    """The working buffer is per thread: ranges computed concurrently (a threaded server)
    equal those computed alone."""
    meta = write_meta(tmp_path / "meta", torch.bfloat16, n_shards=1)
    path = meta / "consolidated.00.pth"
    layout = directory_layouts(meta)[path.name]
    raw = path.read_bytes()

    def read_at(a: int, b: int) -> bytes:
        return raw[a:b]

    step = 40_001  # odd: every other range cuts an element at both ends
    ranges = [(a, min(a + step, len(raw))) for a in range(0, len(raw), step)]
    alone = {
        (code, a, b): fingerprint_range(layout, KEY, code, a, b, raw[a:b], read_at=read_at)
        for code in (ALICE, BOB)
        for a, b in ranges
    }
    assert alone[(ALICE, *ranges[1])] != alone[(BOB, *ranges[1])]
    results: dict[tuple, bytes] = {}
    errors: list[BaseException] = []

    def work(code: bytes) -> None:
        try:
            for _ in range(3):
                for a, b in ranges:
                    got = fingerprint_range(layout, KEY, code, a, b, raw[a:b], read_at=read_at)
                    if results.setdefault((code, a, b), got) != got:
                        raise AssertionError((code, a, b))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(code,)) for code in (ALICE, BOB, ALICE, BOB)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == alone


@pytest.mark.parametrize(("rows", "heads"), [(8, 1), (64, 4), (96, 4), (4096, 32), (1024, 8)])
def test_rotary_rows_is_the_converters_permutation_of_the_row_numbers(rows, heads) -> None:
    numbers = torch.arange(rows, dtype=torch.int64).view(rows, 1)
    expected = permute_rotary(numbers, heads).view(-1).numpy()
    assert np.array_equal(rotary_rows(rows, heads), expected)
    assert sorted(rotary_rows(rows, heads)) == list(range(rows))
