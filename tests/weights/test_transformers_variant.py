"""Publishing a release also publishes its Hugging Face transformers variant, verified."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency: missing is a broken install, not a skip
from django.core.management import call_command

from inference_demo.llama.checkpoint import load_model, save_checkpoint
from inference_demo.llama.generation import SamplingParams, generate
from inference_demo.llama.tokenizer import Tokenizer
from tests.inference_demo.conftest import DEMO_DIR, MHA, random_state_dict
from tests.weights.conftest import stored_objects
from weights.models import Artifact, Release
from weights.services import publishing
from weights.services.publishing import release_publish
from weights.services.revisions import revision_of
from weights.services.transformers_variant import (
    NotConvertible,
    VerificationError,
    convert_verified,
    find_checkpoint,
    verify_converted,
)
from weights.storage import get_storage

pytestmark = pytest.mark.django_db

TRANSFORMERS_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
}
PROMPTS = ["The for statement", "A context manager is"]
TRANSFORMERS = Artifact.Variant.TRANSFORMERS


def variant_paths(slug: str, variant: str = TRANSFORMERS) -> set[str]:
    return set(
        Artifact.objects.filter(release__slug=slug, variant=variant).values_list("path", flat=True)
    )


def rebuild_from_storage(release: Release, dst: Path) -> Path:
    """The transformers files as a Hub client gets them: read back from weight storage."""
    storage = get_storage()
    dst.mkdir(parents=True)
    for artifact in release.artifacts.filter(variant=TRANSFORMERS):
        with storage.open(artifact.storage_key) as src, (dst / artifact.path).open("wb") as out:
            shutil.copyfileobj(src, out)
    return dst


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference_demo.llama.demo_builder import corpus, train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(corpus()[:10], path, vocab_size=400)
    return path


@pytest.fixture
def meta_release(tmp_path: Path, small_tokenizer: Path) -> Path:
    """A real checkpoint laid out as Meta ships a family: 7B/ and tokenizer.model above it."""
    root = tmp_path / "release"
    params = dict(MHA, vocab_size=400)
    save_checkpoint(root / "7B", params, random_state_dict(params), n_shards=2)
    shutil.copyfile(small_tokenizer, root / "tokenizer.model")
    return root


def test_demo_model_gets_a_verified_transformers_variant(local_storage, capsys) -> None:
    call_command("publish_release", str(DEMO_DIR), "--slug", "llama-demo", "--no-transformers")
    assert "transformers" not in capsys.readouterr().out.lower()
    release = Release.objects.get(slug="llama-demo")
    original_revision = release.revision
    assert variant_paths("llama-demo") == set()

    call_command("publish_release", str(DEMO_DIR), "--slug", "llama-demo")
    out = capsys.readouterr().out
    assert "0 files added, 7 already published" in out
    assert "Transformers variant: 7 files added, 0 already published" in out
    assert (
        "verified config.json, 39 tensor headers, tokenizer.json (encodes like SentencePiece)"
        in out
    )

    release.refresh_from_db()
    artifacts = list(release.artifacts.filter(variant=TRANSFORMERS))
    assert {a.path for a in artifacts} == TRANSFORMERS_FILES
    assert {a.repo_path for a in artifacts} == TRANSFORMERS_FILES  # at the top of the Hub repo
    assert variant_paths("llama-demo", Artifact.Variant.ORIGINAL) == {
        "README.md",
        "checklist.chk",
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
        "tokenizer.model",
        "tokenizer_checklist.chk",
    }
    for artifact in artifacts:
        stored = (local_storage.root / artifact.storage_key).read_bytes()
        assert len(stored) == artifact.size
        assert hashlib.sha256(stored).hexdigest() == artifact.sha256
        assert hashlib.md5(stored).hexdigest() == artifact.md5
    tokenizer = next(a for a in artifacts if a.path == "tokenizer.model")
    assert (
        tokenizer.sha256 == hashlib.sha256((DEMO_DIR / "tokenizer.model").read_bytes()).hexdigest()
    )
    config = json.loads(
        (
            local_storage.root / next(a for a in artifacts if a.path == "config.json").storage_key
        ).read_text()
    )
    params = json.loads((DEMO_DIR / "params.json").read_text())
    assert (config["hidden_size"], config["num_key_value_heads"], config["torch_dtype"]) == (
        params["dim"],
        params["n_kv_heads"],
        "bfloat16",
    )

    assert release.revision != original_revision
    assert release.revision == revision_of(
        release.artifacts.values_list("variant", "path", "sha256")
    )

    # Publishing again adds nothing, converts nothing and keeps the revision.
    objects = stored_objects(local_storage.root)
    call_command("publish_release", str(DEMO_DIR), "--slug", "llama-demo")
    out = capsys.readouterr().out
    assert "Transformers variant already published (7 files)." in out
    release.refresh_from_db()
    assert release.artifacts.count() == 14
    assert stored_objects(local_storage.root) == objects
    assert release.revision == revision_of(
        release.artifacts.values_list("variant", "path", "sha256")
    )


def test_conversion_is_deterministic_so_storage_dedupes_it(local_storage) -> None:
    first = release_publish(directory=DEMO_DIR, slug="llama-demo")
    second = release_publish(directory=DEMO_DIR, slug="llama-demo-copy")
    assert first.transformers.published is not None and second.transformers.published is not None
    assert first.transformers.published.bytes_uploaded > 7_000_000  # the safetensors file
    assert second.bytes_uploaded == 0
    assert second.transformers.published.bytes_uploaded == 0  # same bytes, same keys
    assert sorted(second.transformers.published.created) == sorted(TRANSFORMERS_FILES)
    assert first.release.revision == second.release.revision  # the same files


@pytest.mark.parametrize("backend", ["local_storage", "s3_storage"])
def test_transformers_loads_the_stored_files_and_generates_like_our_engine(
    request, backend, tmp_path
) -> None:
    request.getfixturevalue(backend)
    release = release_publish(directory=DEMO_DIR, slug="llama-demo").release
    directory = rebuild_from_storage(release, tmp_path / "hub")

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, torch_dtype=torch.float32
    )
    assert isinstance(hf_tokenizer, transformers.LlamaTokenizerFast)
    assert isinstance(hf_model, transformers.LlamaForCausalLM)
    ours = load_model(DEMO_DIR, max_seq_len=256)
    ours.setup_caches(max_batch_size=1, max_seq_len=256)
    tokenizer = Tokenizer(DEMO_DIR / "tokenizer.model")

    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, bos=True, eos=False)
        assert hf_tokenizer(prompt).input_ids == ids
        expected = generate(ours, tokenizer, ids, SamplingParams(max_new_tokens=24)).collect()
        with torch.inference_mode():
            out = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=2
            )
        got = out[0, len(ids) :].tolist()
        assert got == expected.token_ids, prompt
        assert hf_tokenizer.decode(got, skip_special_tokens=True) == tokenizer.decode(got)


def test_a_meta_family_layout_converts_with_the_tokenizer_above(
    local_storage, meta_release, capsys
):
    call_command("publish_release", str(meta_release), "--slug", "llama-7b")
    out = capsys.readouterr().out
    assert "Transformers variant: 7 files added" in out
    assert variant_paths("llama-7b") == TRANSFORMERS_FILES
    assert "7B/params.json" in variant_paths("llama-7b", Artifact.Variant.ORIGINAL)


def test_sample_release_gets_no_variant_and_says_why(
    local_storage, sample_release_dir, capsys, monkeypatch
) -> None:
    def no_conversion(*args, **kwargs):
        raise AssertionError("a byte-filled sample must be turned down before any conversion")

    monkeypatch.setattr(publishing, "convert_verified", no_conversion)
    call_command("publish_release", str(sample_release_dir), "--slug", "llama-7b")
    out = capsys.readouterr().out
    assert "Created release llama-7b: 6 files added" in out
    lines = [line for line in out.splitlines() if "transformers" in line.lower()]
    assert lines == ["No transformers variant: 7B/consolidated.00.pth is not a PyTorch checkpoint"]
    assert variant_paths("llama-7b") == set()
    assert Release.objects.get(slug="llama-7b").artifacts.count() == 6


def test_no_transformers_flag_publishes_the_original_only(local_storage, meta_release, capsys):
    call_command("publish_release", str(meta_release), "--slug", "llama-7b", "--no-transformers")
    assert "transformers" not in capsys.readouterr().out.lower()
    assert variant_paths("llama-7b") == set()
    assert variant_paths("llama-7b", Artifact.Variant.ORIGINAL)


def _write_release(root: Path, files: dict[str, bytes]) -> list[str]:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return sorted(files)


PARAMS = json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 400}).encode()


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ({"README.md": b"hi"}, "no params.json beside consolidated.*.pth shards"),
        ({"7B/consolidated.00.pth": b"x"}, "no params.json beside consolidated.*.pth shards"),
        (
            {
                "7B/params.json": PARAMS,
                "7B/consolidated.00.pth": b"PK",
                "13B/params.json": PARAMS,
                "13B/consolidated.00.pth": b"PK",
            },
            "2 checkpoint directories (13B, 7B); a transformers variant holds one model",
        ),
        (
            {"7B/params.json": b"{not json", "7B/consolidated.00.pth": b"PK\x03\x04"},
            "7B/params.json is not a LLaMA params.json",
        ),
        (
            {"7B/params.json": b'{"dim": 64}', "7B/consolidated.00.pth": b"PK\x03\x04"},
            "7B/params.json is not a LLaMA params.json (no positive n_layers)",
        ),
        (
            {"7B/params.json": PARAMS, "7B/consolidated.00.pth": b"PK\x03\x04 truncated"},
            "7B/consolidated.00.pth is not a PyTorch checkpoint",
        ),
    ],
    ids=["no-params", "no-params-beside", "two-sizes", "bad-json", "no-layers", "truncated-zip"],
)
def test_detection_reasons(tmp_path: Path, files: dict[str, bytes], reason: str) -> None:
    paths = _write_release(tmp_path, files)
    with pytest.raises(NotConvertible) as caught:
        find_checkpoint(tmp_path, paths)
    assert str(caught.value).startswith(reason)


def test_detection_needs_a_sentencepiece_tokenizer(meta_release: Path) -> None:
    paths = publishing.list_release_files(meta_release)
    (meta_release / "tokenizer.model").unlink()
    without = [p for p in paths if p != "tokenizer.model"]
    with pytest.raises(
        NotConvertible, match="^no tokenizer.model beside 7B/params.json or in its parent"
    ):
        find_checkpoint(meta_release, without)
    (meta_release / "tokenizer.model").write_bytes(b"IWFu 0\nIWFv 1\n")  # LLaMA 3's tiktoken file
    with pytest.raises(NotConvertible, match="^tokenizer.model is not a SentencePiece model"):
        find_checkpoint(meta_release, paths)


def test_a_checkpoint_that_does_not_load_is_reported(local_storage, meta_release) -> None:
    class Exploit:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    shard = meta_release / "7B" / "consolidated.00.pth"
    torch.save({**torch.load(shard, weights_only=True), "payload": Exploit()}, shard)
    (meta_release / "7B" / "checklist.chk").unlink()
    result = release_publish(directory=meta_release, slug="llama-7b")
    assert (
        result.transformers.message.startswith("No transformers variant: 7B did not convert: ")
        and "refused to load" in result.transformers.message
    )
    assert result.transformers.published is None
    assert variant_paths("llama-7b") == set() and len(result.created) == 4


@pytest.mark.parametrize(
    ("target", "replacement", "error"),
    [
        (
            "inference_demo.hf_tokenizer.bpe_merges",
            lambda pieces: [],
            "tokenizer.json encodes the sample as",
        ),
        (
            "inference_demo.convert.hf_config",
            None,
            "config.json has num_key_value_heads=1, expected 4",
        ),
    ],
    ids=["tokenizer", "config"],
)
def test_a_conversion_that_fails_verification_publishes_no_variant(
    local_storage, meta_release, monkeypatch, caplog, target, replacement, error
) -> None:
    if replacement is None:
        from inference_demo import convert

        real = convert.hf_config

        def replacement(args, dtype):
            return {**real(args, dtype), "num_key_value_heads": 1}

    monkeypatch.setattr(target, replacement)
    result = release_publish(directory=meta_release, slug="llama-7b")
    assert result.transformers.message.startswith(
        "No transformers variant: the converted files failed verification: " + error
    )
    assert variant_paths("llama-7b") == set()
    assert variant_paths("llama-7b", Artifact.Variant.ORIGINAL)  # the original stays published
    assert "transformers variant not published" in caplog.text


def test_safetensors_headers_are_checked_against_the_config(meta_release, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    source = find_checkpoint(meta_release, publishing.list_release_files(meta_release))
    out = tmp_path / "hf"
    out.mkdir()
    assert convert_verified(source, out).tensors == 3 + 9 * MHA["n_layers"]

    tensors = load_file(out / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="model.safetensors holds 20 tensors, the index 21"):
        verify_converted(out, source)
    tensors["lm_head.weight"] = torch.zeros(400, 32, dtype=torch.float32)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        VerificationError, match=r"lm_head.weight is \(400, 32\), expected \(400, 64\)"
    ):
        verify_converted(out, source)


def test_conversion_reports_progress_and_uses_the_work_dir(local_storage, tmp_path) -> None:
    calls: dict[tuple[str, str], list[int]] = {}

    class Bar:
        def __init__(self, phase: str, path: str, total: int) -> None:
            self.key = (phase, path)
            calls[self.key] = [total, 0, 0]

        def update(self, n: int) -> None:
            calls[self.key][1] += n

        def close(self) -> None:
            calls[self.key][2] += 1

    work = tmp_path / "work"
    work.mkdir()
    seen: list[Path] = []
    real = publishing.convert_verified

    def spy(source, dst, **kwargs):
        seen.append(dst)
        return real(source, dst, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(publishing, "convert_verified", spy)
        release_publish(directory=DEMO_DIR, slug="llama-demo", progress=Bar, work_dir=work)

    checkpoint = sum((DEMO_DIR / f"consolidated.0{i}.pth").stat().st_size for i in (0, 1))
    total, converted, closed = calls[("convert", ".")]
    assert total == checkpoint and closed == 1
    safetensors = Artifact.objects.get(variant=TRANSFORMERS, path="model.safetensors").size
    assert 0.99 * safetensors < converted < safetensors  # every tensor's bytes, not the header
    assert ("hash", "model.safetensors") in calls and ("upload", "model.safetensors") in calls
    assert [p.parent for p in seen] == [work] and list(work.iterdir()) == []  # removed after


def test_a_work_dir_that_does_not_exist_is_refused_before_anything(local_storage, tmp_path):
    with pytest.raises(publishing.PublishError, match="work directory .* is not a directory"):
        release_publish(directory=DEMO_DIR, slug="llama-demo", work_dir=tmp_path / "missing")
    assert not Release.objects.exists()
    assert stored_objects(local_storage.root) == []


def test_without_the_tokenizers_library_the_vocabulary_is_still_checked(
    local_storage, meta_release, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as on an install without dev extras
    result = release_publish(directory=meta_release, slug="llama-7b")
    assert "tokenizer.json (vocabulary only: the tokenizers library is not installed)" in (
        result.transformers.message
    )
    assert variant_paths("llama-7b") == TRANSFORMERS_FILES

    source = find_checkpoint(meta_release, publishing.list_release_files(meta_release))
    out = meta_release.parent / "hf"
    out.mkdir()
    convert_verified(source, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["model"]["vocab"]["<s>"], spec["model"]["vocab"]["</s>"] = 2, 1
    (out / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(
        VerificationError, match="tokenizer.json's vocabulary is not tokenizer.model's"
    ):
        verify_converted(out, source)
