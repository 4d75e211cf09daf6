"""The embedding engine: a recipient's bytes of Meta shards and transformers safetensors.

The oracle works in merged coordinates, element by element, with torch.nextafter: it
shares nothing with the embedder but ``keys.marked``/``keys.directions``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from inference_demo.convert import convert, hf_state_dict
from inference_demo.llama.checkpoint import PARAMS, load_state_dict, save_checkpoint
from inference_demo.llama.model import ModelArgs, Transformer
from weights.fingerprint import keys
from weights.fingerprint.embed import (
    FingerprintedReader,
    UnsupportedDtypeError,
    fingerprint_file,
    fingerprint_range,
)
from weights.fingerprint.layout import (
    CompressedEntryError,
    FileLayout,
    LayoutError,
    directory_layouts,
    meta_layout,
)

DEMO_DIR = Path(__file__).resolve().parents[2] / "inference_demo" / "demo_model"
TOKENIZER = DEMO_DIR / "tokenizer.model"
KEY = bytes(range(32))
ALICE, BOB = keys.recipient_code(KEY, 1), keys.recipient_code(KEY, 2)
# dim 96 over 2 shards: 48-column slices and 250-row halves of the output start mid-block,
# so the unaligned paths of the block hash are exercised, not only the 64-aligned ones.
PARAMS_SMALL = dict(dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=500, multiple_of=32)
SPECIAL_TENSORS = ("layers.0.attention.wq.weight", "layers.1.attention.wo.weight")
REPEAT = 256  # copies of each special value: ~32 marked, so both directions meet each


def specials(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    sub = info.tiny / 4
    values = [0.0, -0.0, sub, -sub, math.inf, -math.inf, math.nan]
    values += [info.max, -info.max, info.tiny, -info.tiny]
    return torch.tensor(values, dtype=torch.float32).to(dtype)


def random_state(params: dict, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_params(params))
    state = {}
    for key, t in model.state_dict().items():
        noise = torch.randn(t.shape, generator=gen)
        value = 1.0 + 0.1 * noise if t.ndim == 1 else noise / t.shape[-1] ** 0.5
        state[key] = value.to(dtype)
    for name in SPECIAL_TENSORS:
        flat = state[name].view(-1)
        sp = specials(dtype)
        flat[: REPEAT * len(sp)] = sp.repeat_interleave(REPEAT)
    return state


def write_meta(directory: Path, dtype: torch.dtype, n_shards: int) -> Path:
    save_checkpoint(directory, PARAMS_SMALL, random_state(PARAMS_SMALL, dtype), n_shards=n_shards)
    return directory


def fingerprint_dir(src: Path, dst: Path, code: bytes) -> Path:
    """A recipient's copy of a model directory: weight files fingerprinted, the rest copied."""
    dst.mkdir(parents=True)
    layouts = directory_layouts(src)
    for path in src.iterdir():
        if path.name in layouts:
            with (dst / path.name).open("wb") as f:
                for chunk in fingerprint_file(path, layouts[path.name], KEY, code):
                    f.write(chunk)
        elif path.name != "checklist.chk":
            shutil.copyfile(path, dst / path.name)
    return dst


def expected_copy(name: str, tensor: torch.Tensor, code: bytes) -> torch.Tensor:
    """The oracle: marked, allowed elements moved to their numeric neighbour."""
    flat = tensor.reshape(-1)
    index = np.arange(flat.numel())
    mark = torch.from_numpy(keys.marked(KEY, name, index))
    up = torch.from_numpy(keys.directions(code, name, index) > 0)
    target = torch.where(up, math.inf, -math.inf).to(flat.dtype)
    moved = torch.nextafter(flat, target)
    tiny = torch.finfo(flat.dtype).tiny
    normal = flat.isfinite() & (flat.abs() >= tiny)
    allowed = normal & moved.isfinite() & (moved.abs() >= tiny)
    return torch.where(mark & allowed, moved, flat).reshape(tensor.shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp")
    meta = write_meta(root / "meta", torch.bfloat16, n_shards=2)
    hf = convert(meta, root / "hf", tokenizer=TOKENIZER, max_shard_bytes=200_000, verify=False)
    alice = fingerprint_dir(meta, root / "alice", ALICE)
    return {"root": root, "meta": meta, "hf": hf, "alice": alice}


def test_layout_offsets_and_merged_mapping_match_torch(release) -> None:
    layouts = directory_layouts(release["meta"])
    assert sorted(layouts) == ["consolidated.00.pth", "consolidated.01.pth"]
    _, merged = load_state_dict(release["meta"], verify=False)
    for name, layout in layouts.items():
        raw = (release["meta"] / name).read_bytes()
        shard = torch.load(release["meta"] / name, weights_only=True)
        assert layout.size == len(raw) and layout.n_shards == 2
        assert {e.name for e in layout.extents} == set(shard)
        for e in layout.extents:
            local = shard[e.name]
            assert raw[e.file_offset : e.end] == local.view(torch.uint8).numpy().tobytes()
            at = torch.from_numpy(e.merged_index(np.arange(e.numel)).astype(np.int64))
            assert torch.equal(bits(merged[e.name].reshape(-1)[at]), bits(local.reshape(-1)))
    hf_layouts = directory_layouts(release["hf"])
    assert len(hf_layouts) > 1  # sharded safetensors, with an index
    for name, layout in hf_layouts.items():
        raw = (release["hf"] / name).read_bytes()
        with safe_open(release["hf"] / name, "pt") as f:
            for e in layout.extents:
                local = f.get_tensor(e.stored_name)
                assert raw[e.file_offset : e.end] == local.view(torch.uint8).numpy().tobytes()
                at = torch.from_numpy(e.merged_index(np.arange(e.numel)).astype(np.int64))
                assert torch.equal(bits(merged[e.name].reshape(-1)[at]), bits(local.reshape(-1)))


def test_which_tensors_are_fingerprinted(release) -> None:
    layout = directory_layouts(release["meta"])["consolidated.01.pth"]
    marked = {e.name for e in layout.fingerprinted}
    assert "layers.0.attention.wq.weight" in marked and "tok_embeddings.weight" in marked
    assert "norm.weight" not in marked and "layers.0.ffn_norm.weight" not in marked
    assert layout.extent("norm.weight").skip_reason == "not a 2-D weight matrix"


@pytest.mark.parametrize("source", ["meta/consolidated.01.pth", "hf/model-00002-of-"])
def test_any_byte_range_is_the_slice_of_the_whole_copy(release, source) -> None:
    folder, prefix = source.split("/")
    path = next(p for p in sorted(release[folder].iterdir()) if p.name.startswith(prefix))
    layout = directory_layouts(release[folder])[path.name]
    raw = path.read_bytes()
    whole = b"".join(fingerprint_file(path, layout, KEY, ALICE))
    assert len(whole) == len(raw) and whole != raw

    def read_at(a: int, b: int) -> bytes:
        return raw[a:b]

    rng = random.Random(7)
    edges = [e.file_offset for e in layout.extents] + [e.end for e in layout.extents]
    ranges = [(0, len(raw)), (0, 1), (len(raw) - 1, len(raw)), (len(raw), len(raw))]
    for _ in range(150):
        a = rng.randrange(len(raw))
        ranges.append((a, min(len(raw), a + rng.choice([1, 2, 3, 63, 4097, 100_000]))))
    for edge in rng.sample(
        edges, min(20, len(edges))
    ):  # around tensor boundaries, odd offsets included
        a = max(0, edge - rng.randrange(5))
        ranges.append((a, min(len(raw), edge + rng.randrange(1, 300_000))))
    assert any(a % 2 for a, _ in ranges) and any(b % 2 for _, b in ranges)
    for a, b in ranges:
        got = fingerprint_range(layout, KEY, ALICE, a, b, raw[a:b], read_at=read_at)
        assert got == whole[a:b], (a, b)
    reader = FingerprintedReader(path, layout, KEY, ALICE, chunk_size=4097)  # odd chunks
    assert reader.read_range(0, len(raw)) == whole
    assert reader.read_range(12345, len(raw) - 3) == whole[12345:-3]
    assert all(len(c) <= 4097 for c in reader.iter_range(1, 50_001))


def test_a_cut_element_needs_its_other_byte(release) -> None:
    path = release["meta"] / "consolidated.00.pth"
    layout = directory_layouts(release["meta"])[path.name]
    e = layout.extent("layers.0.attention.wq.weight")
    raw = path.read_bytes()
    start = e.file_offset + 101
    with pytest.raises(ValueError, match=r"cuts a 2-byte element of layers.0.attention.wq"):
        fingerprint_range(layout, KEY, ALICE, start, start + 10, raw[start : start + 10])
    with pytest.raises(ValueError, match=r"not within the file's"):
        fingerprint_range(layout, KEY, ALICE, 0, layout.size + 1, raw + b"x")


def test_copy_loads_and_every_change_is_one_ulp_the_recipients_way(release) -> None:
    originals, copies = release["meta"], release["alice"]
    _, merged = load_state_dict(originals, verify=False)
    _, copy = load_state_dict(copies, verify=False)  # the project's loader merges the copy
    changed = eligible = 0
    for name, tensor in merged.items():
        want = (
            expected_copy(name, tensor, ALICE)
            if keys.is_fingerprinted(name, tensor.shape)
            else tensor
        )
        assert torch.equal(bits(copy[name]), bits(want)), name
        if tensor.ndim == 2:
            eligible += int(
                (tensor.isfinite() & (tensor.abs() >= torch.finfo(tensor.dtype).tiny)).sum()
            )
            changed += int((bits(copy[name]) != bits(tensor)).sum())
        else:
            assert torch.equal(bits(copy[name]), bits(tensor)), name  # norms exact
    assert 0.115 < changed / eligible < 0.135, changed / eligible
    for name in SPECIAL_TENSORS:  # the edge rules were met in both directions
        flat, got = merged[name].reshape(-1)[: REPEAT * 11], copy[name].reshape(-1)[: REPEAT * 11]
        moved = bits(flat) != bits(got)
        assert not moved[: REPEAT * 7].any()  # zeros, subnormals, inf, nan
        mark = torch.from_numpy(keys.marked(KEY, name, np.arange(REPEAT * 11)))
        up = torch.from_numpy(keys.directions(ALICE, name, np.arange(REPEAT * 11)) > 0)
        toward_zero = up == (flat < 0)
        for block in range(7, 11):  # max finite, -max finite, min normal, -min normal
            sl = slice(REPEAT * block, REPEAT * block + REPEAT)
            can = toward_zero[sl] if block < 9 else ~toward_zero[sl]
            assert (mark[sl] & can).any() and (mark[sl] & ~can).any()
            assert torch.equal(moved[sl], mark[sl] & can)


def test_non_tensor_bytes_identical_and_recipients_distinct(release) -> None:
    for name, layout in directory_layouts(release["meta"]).items():
        raw = np.frombuffer((release["meta"] / name).read_bytes(), np.uint8)
        alice = np.frombuffer((release["alice"] / name).read_bytes(), np.uint8)
        bob = b"".join(fingerprint_file(release["meta"] / name, layout, KEY, BOB))
        again = b"".join(fingerprint_file(release["meta"] / name, layout, KEY, ALICE))
        assert alice.tobytes() == again and bob != again
        inside = np.zeros(len(raw), bool)
        for e in layout.fingerprinted:
            inside[e.file_offset : e.end] = True
        assert np.array_equal(raw[~inside], alice[~inside])
        assert (raw[inside] != alice[inside]).any()
        with zipfile.ZipFile(release["alice"] / name) as z:  # CRCs are not checked by torch
            assert z.namelist() == zipfile.ZipFile(release["meta"] / name).namelist()


def test_transformers_copy_equals_converting_the_recipients_meta_copy(release) -> None:
    converted = convert(
        release["alice"],
        release["root"] / "alice-hf",
        tokenizer=TOKENIZER,
        max_shard_bytes=200_000,
        verify=False,
    )
    layouts = directory_layouts(release["hf"])
    for name, layout in layouts.items():
        served = b"".join(fingerprint_file(release["hf"] / name, layout, KEY, ALICE))
        assert served == (converted / name).read_bytes(), name
        assert served != (release["hf"] / name).read_bytes()
    index = "model.safetensors.index.json"
    assert (converted / index).read_bytes() == (release["hf"] / index).read_bytes()


def test_single_file_transformers_layout_undoes_the_permutation(release, tmp_path) -> None:
    from safetensors.torch import save_file

    args, merged = load_state_dict(release["meta"], verify=False)
    save_file(
        {k: v.contiguous() for k, v in hf_state_dict(args, merged).items()},
        tmp_path / "model.safetensors",
    )
    config = {"num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads}
    (tmp_path / "config.json").write_text(json.dumps(config))
    layout = directory_layouts(tmp_path)["model.safetensors"]
    q = layout.extent("layers.1.attention.wq.weight")
    assert q.stored_name == "model.layers.1.self_attn.q_proj.weight" and q.rows.perm is not None
    copy = b"".join(fingerprint_file(tmp_path / "model.safetensors", layout, KEY, BOB))
    (tmp_path / "copy.safetensors").write_bytes(copy)
    want = hf_state_dict(
        args, {k: expected_copy(k, v, BOB) if v.ndim == 2 else v for k, v in merged.items()}
    )
    with safe_open(tmp_path / "copy.safetensors", "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            assert torch.equal(bits(f.get_tensor(name)), bits(want[name])), name


def test_float16_copy(tmp_path) -> None:
    meta = write_meta(tmp_path / "meta", torch.float16, n_shards=1)
    copy = fingerprint_dir(meta, tmp_path / "copy", BOB)
    _, merged = load_state_dict(meta, verify=False)
    _, got = load_state_dict(copy, verify=False)
    for name, tensor in merged.items():
        want = expected_copy(name, tensor, BOB) if tensor.ndim == 2 else tensor
        assert torch.equal(bits(got[name]), bits(want)), name


def test_demo_model_copy_merges_to_the_direct_perturbation(tmp_path) -> None:
    copy = fingerprint_dir(DEMO_DIR, tmp_path / "demo", ALICE)
    _, merged = load_state_dict(DEMO_DIR, verify=False)
    _, got = load_state_dict(copy, verify=False)
    for name, tensor in merged.items():
        want = expected_copy(name, tensor, ALICE) if tensor.ndim == 2 else tensor
        assert torch.equal(bits(got[name]), bits(want)), name


def test_compressed_entries_are_refused(release, tmp_path) -> None:
    src = release["meta"] / "consolidated.00.pth"
    packed = tmp_path / "consolidated.00.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with pytest.raises(
        CompressedEntryError, match=r"zip entry consolidated.00/data.pkl is compressed \(deflate\)"
    ):
        meta_layout(packed, n_shards=2)


def test_float32_weights_are_refused_with_the_reason(tmp_path) -> None:
    meta = write_meta(tmp_path / "meta", torch.float32, n_shards=1)
    layout = directory_layouts(meta)["consolidated.00.pth"]
    wq = layout.extent("layers.0.attention.wq.weight")
    assert not wq.fingerprinted and wq.skip_reason.startswith("float32: one ulp is defined")
    with pytest.raises(
        UnsupportedDtypeError, match=r"cannot fingerprint tok_embeddings.weight: it is float32"
    ):
        FingerprintedReader(meta / "consolidated.00.pth", layout, KEY, ALICE)


def test_pickle_globals_are_never_executed(tmp_path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "consolidated.00.pth"
    torch.save({"w.weight": torch.zeros(4, 4, dtype=torch.bfloat16), "x": Payload()}, path)
    with pytest.raises(
        LayoutError, match=r"(posix|os)\.system is not part of a plain tensor archive"
    ):
        meta_layout(path, n_shards=1)
    assert not marker.exists()


def test_layout_needs_a_valid_shard_index(release, tmp_path) -> None:
    shard = release["meta"] / "consolidated.01.pth"
    with pytest.raises(LayoutError, match=r"shard index 1 is not in 0..0"):
        meta_layout(shard, n_shards=1)
    alone = tmp_path / "suspect.pth"
    shutil.copyfile(shard, alone)
    with pytest.raises(LayoutError, match=r"not named consolidated.NN.pth"):
        meta_layout(alone, n_shards=2)
    # A shard alone, with its place given, maps as it does in its directory.
    placed = meta_layout(alone, shard_index=1, n_shards=2)
    in_dir = directory_layouts(release["meta"])[shard.name]
    assert [(e.name, e.rows) for e in placed.extents] == [(e.name, e.rows) for e in in_dir.extents]
    assert isinstance(placed, FileLayout) and (release["meta"] / PARAMS).exists()


def test_small_pieces_give_the_same_bytes(release, monkeypatch) -> None:
    from weights.fingerprint import embed

    path = release["meta"] / "consolidated.00.pth"
    layout = directory_layouts(release["meta"])[path.name]
    whole = FingerprintedReader(path, layout, KEY, BOB).read_range(0, layout.size)
    monkeypatch.setattr(embed, "PIECE", 130)  # pieces of 65 elements: never block-aligned
    reader = FingerprintedReader(path, layout, KEY, BOB, chunk_size=1 << 16)
    assert reader.read_range(0, layout.size) == whole


def test_run_marks_equal_the_per_element_functions() -> None:
    rng = np.random.default_rng(3)
    cases = [([0], 64), ([0, 64, 640], 128), ([3], 5), ([63], 1), ([5, 1000, 448], 200)]
    cases += [
        (list(rng.integers(0, 10**9, size=rng.integers(1, 6))), int(rng.integers(1, 700)))
        for _ in range(100)
    ]
    for starts, length in cases:
        positions, up = keys.run_marks(KEY, "t.weight", starts, length, ALICE)
        merged = np.concatenate([s + np.arange(length) for s in starts])
        expected = np.flatnonzero(keys.marked(KEY, "t.weight", merged))
        assert np.array_equal(positions, expected), (starts, length)
        assert np.array_equal(up, keys.directions(ALICE, "t.weight", merged[expected]) > 0)
    mask = keys.marked(KEY, "t.weight", np.arange(80_000)).reshape(-1, 8)
    assert (mask.sum(axis=1) == 1).all()  # exactly one mark in each group of 8
    up = keys.directions(ALICE, "t.weight", np.flatnonzero(mask)) > 0
    assert 0.48 < up.mean() < 0.52
    other = keys.directions(BOB, "t.weight", np.flatnonzero(mask)) > 0
    assert 0.48 < (up == other).mean() < 0.52  # another recipient's signs: independent coins


def test_layout_for_a_file_kept_apart_from_its_siblings(release, tmp_path) -> None:
    """Content-addressed storage: the file's own name says nothing, the published name does."""
    from weights.fingerprint.layout import layout_for

    stored = tmp_path / "sha256-of-shard-1"
    shutil.copyfile(release["meta"] / "consolidated.01.pth", stored)
    got = layout_for(stored, "7B/consolidated.01.pth", n_shards=2)
    want = directory_layouts(release["meta"])["consolidated.01.pth"]
    assert [(e.name, e.file_offset, e.rows) for e in got.extents] == [
        (e.name, e.file_offset, e.rows) for e in want.extents
    ]
    name = next(p.name for p in release["hf"].glob("*.safetensors"))
    config = json.loads((release["hf"] / "config.json").read_text())
    hf = layout_for(release["hf"] / name, f"transformers/{name}", config=config)
    assert hf.fingerprinted and hf.format == "safetensors"
    with pytest.raises(LayoutError, match=r"lacks num_attention_heads"):
        layout_for(release["hf"] / name, name)
    with pytest.raises(LayoutError, match=r"params.json: not a weight file"):
        layout_for(release["meta"] / PARAMS, "params.json")


def test_tensors_sharing_or_scattering_bytes_are_refused(tmp_path) -> None:
    base = torch.arange(64, dtype=torch.float32).to(torch.bfloat16).view(8, 8)
    shared = tmp_path / "consolidated.00.pth"
    torch.save({"a.weight": base, "b.weight": base[2:]}, shared)
    with pytest.raises(LayoutError, match=r"tensors a.weight and b.weight share bytes"):
        meta_layout(shared, n_shards=1)
    transposed = tmp_path / "t" / "consolidated.00.pth"
    transposed.parent.mkdir()
    torch.save({"a.weight": base.t()}, transposed)
    layout = meta_layout(transposed, n_shards=1)
    assert layout.extent("a.weight").skip_reason == "not stored contiguously"
    with pytest.raises(
        LayoutError, match=r"cannot fingerprint a.weight: its elements are not stored in order"
    ):
        FingerprintedReader(transposed, layout, KEY, ALICE)
