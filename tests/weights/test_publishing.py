from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests.weights.conftest import stored_objects
from weights.checksums import file_digests, format_checklist, parse_checklist
from weights.management.commands.generate_sample_release import MIB, write_sample_release
from weights.models import Artifact, Release
from weights.services import publishing
from weights.services.publishing import PublishError, release_publish, storage_key_for
from weights.storage import StorageUnavailable

pytestmark = pytest.mark.django_db

SAMPLE_PATHS = [
    "7B/checklist.chk",
    "7B/consolidated.00.pth",
    "7B/consolidated.01.pth",
    "7B/params.json",
    "tokenizer.model",
    "tokenizer_checklist.chk",
]


def test_publish_records_artifacts_and_stores_bytes(local_storage, sample_release_dir):
    result = release_publish(
        directory=sample_release_dir,
        slug="llama-7b",
        name="LLaMA 7B",
        parameter_count=7_000_000_000,
    )

    release = Release.objects.get(slug="llama-7b")
    assert result.release == release and result.release_created
    assert (release.name, release.family, release.parameter_count) == (
        "LLaMA 7B",
        "llama",
        7 * 10**9,
    )
    assert release.published_at is not None
    assert sorted(result.created) == SAMPLE_PATHS and result.skipped == []
    assert result.bytes_uploaded == sum(
        (sample_release_dir / p).stat().st_size for p in SAMPLE_PATHS
    )
    for artifact in release.artifacts.all():
        data = (sample_release_dir / artifact.path).read_bytes()
        assert artifact.size == len(data)
        assert artifact.sha256 == hashlib.sha256(data).hexdigest()
        assert artifact.md5 == hashlib.md5(data).hexdigest()
        assert artifact.storage_key == f"sha256/{artifact.sha256[:2]}/{artifact.sha256}"
        assert (local_storage.root / artifact.storage_key).read_bytes() == data


def test_rerun_publishes_nothing_twice(local_storage, sample_release_dir):
    first = release_publish(directory=sample_release_dir, slug="llama-7b")
    published_at = first.release.published_at
    objects = {p: p.stat().st_mtime_ns for p in stored_objects(local_storage.root)}

    again = release_publish(directory=sample_release_dir, slug="llama-7b")

    assert again.created == [] and sorted(again.skipped) == SAMPLE_PATHS
    assert again.bytes_uploaded == 0 and not again.release_created
    assert Artifact.objects.count() == len(SAMPLE_PATHS)
    assert {p: p.stat().st_mtime_ns for p in stored_objects(local_storage.root)} == objects
    assert Release.objects.get().published_at == published_at


def test_hidden_and_partial_files_are_not_published(local_storage, sample_release_dir):
    (sample_release_dir / ".DS_Store").write_bytes(b"junk")
    (sample_release_dir / "7B" / "consolidated.02.pth.part").write_bytes(b"half")
    (sample_release_dir / ".cache").mkdir()
    (sample_release_dir / ".cache" / "x").write_bytes(b"junk")

    result = release_publish(directory=sample_release_dir, slug="llama-7b")

    assert sorted(result.created) == SAMPLE_PATHS


def test_checklist_mismatch_is_refused_before_anything_is_written(
    local_storage, sample_release_dir
):
    shard = sample_release_dir / "7B" / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    data[12345] ^= 0xFF
    shard.write_bytes(data)

    with pytest.raises(PublishError) as excinfo:
        release_publish(directory=sample_release_dir, slug="llama-7b")

    assert str(excinfo.value).startswith(
        f"7B/checklist.chk: MD5 of 7B/consolidated.01.pth is {hashlib.md5(data).hexdigest()}"
    )
    assert not Release.objects.exists() and not Artifact.objects.exists()
    assert stored_objects(local_storage.root) == []


def test_checklist_listing_a_missing_file_is_refused(local_storage, sample_release_dir):
    (sample_release_dir / "7B" / "consolidated.01.pth").unlink()

    with pytest.raises(PublishError) as excinfo:
        release_publish(directory=sample_release_dir, slug="llama-7b")

    assert str(excinfo.value) == publishing.CHECKLIST_MISSING.format(
        checklist="7B/checklist.chk", path="7B/consolidated.01.pth"
    )
    assert not Release.objects.exists()
    assert stored_objects(local_storage.root) == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not md5sum output", "tokenizer_checklist.chk is malformed: line 1"),
        (f"{'0' * 32}  ../outside.bin", "tokenizer_checklist.chk lists '../outside.bin'"),
    ],
)
def test_bad_checklist_lines_are_refused(local_storage, sample_release_dir, line, message):
    (sample_release_dir / "tokenizer_checklist.chk").write_text(line + "\n")

    with pytest.raises(PublishError, match=message.replace(".", r"\.")):
        release_publish(directory=sample_release_dir, slug="llama-7b")
    assert not Release.objects.exists()


def test_changed_file_under_a_published_path_is_refused(local_storage, sample_release_dir):
    release_publish(directory=sample_release_dir, slug="llama-7b")
    before = stored_objects(local_storage.root)
    params = sample_release_dir / "7B" / "params.json"
    params.write_text('{"dim": 1}\n')
    # The checklist is updated too, so only immutability can refuse it.
    checklist = sample_release_dir / "7B" / "checklist.chk"
    entries = parse_checklist(checklist.read_text())
    entries["params.json"] = file_digests(params)[1]
    checklist.write_text(format_checklist(entries))

    with pytest.raises(PublishError, match="7B/params.json is already published in llama-7b"):
        release_publish(directory=sample_release_dir, slug="llama-7b")

    artifact = Artifact.objects.get(path="7B/params.json")
    assert artifact.sha256 != file_digests(params)[0]
    assert stored_objects(local_storage.root) == before


def test_new_files_can_be_added_to_a_published_release(local_storage, tmp_path):
    directory = tmp_path / "rel"
    write_sample_release(directory, shards=1, shard_bytes=1024, seed=3)
    release_publish(directory=directory, slug="llama-7b")
    (directory / "LICENSE").write_text("research only\n")

    result = release_publish(directory=directory, slug="llama-7b")

    assert result.created == ["LICENSE"]
    assert Artifact.objects.filter(release__slug="llama-7b").count() == 6


def test_tokenizer_shared_by_two_releases_is_stored_once(local_storage, tmp_path):
    write_sample_release(tmp_path / "a", size_label="7B", shard_bytes=4096, seed=5)
    write_sample_release(tmp_path / "b", size_label="13B", shard_bytes=4096, seed=5)
    release_publish(directory=tmp_path / "a", slug="llama-7b")

    second = release_publish(directory=tmp_path / "b", slug="llama-13b")

    tokenizers = Artifact.objects.filter(path="tokenizer.model")
    assert tokenizers.count() == 2
    assert len({a.storage_key for a in tokenizers}) == 1
    tokenizer_size = tokenizers[0].size
    created_bytes = sum(a.size for a in Artifact.objects.filter(release__slug="llama-13b"))
    # tokenizer.model and its checklist are already stored: only the 13B files travel.
    checklist_size = (tmp_path / "b" / "tokenizer_checklist.chk").stat().st_size
    assert second.bytes_uploaded == created_bytes - tokenizer_size - checklist_size
    stored_keys = [
        p.relative_to(local_storage.root).as_posix() for p in stored_objects(local_storage.root)
    ]
    assert stored_keys.count(tokenizers[0].storage_key) == 1
    assert len(stored_keys) == len(set(Artifact.objects.values_list("storage_key", flat=True)))


def test_failed_upload_leaves_no_rows(local_storage, sample_release_dir, monkeypatch):
    real_put = type(local_storage).put
    calls = []

    def flaky_put(self, key, source, *, size, progress=None):
        calls.append(key)
        if len(calls) == 3:
            raise OSError("no space left on device")
        return real_put(self, key, source, size=size, progress=progress)

    monkeypatch.setattr(type(local_storage), "put", flaky_put)

    with pytest.raises(OSError, match="no space"):
        release_publish(directory=sample_release_dir, slug="llama-7b")
    assert not Release.objects.exists() and not Artifact.objects.exists()

    monkeypatch.setattr(type(local_storage), "put", real_put)
    result = release_publish(directory=sample_release_dir, slug="llama-7b")
    assert sorted(result.created) == SAMPLE_PATHS


def test_progress_reports_hashing_and_upload(local_storage, sample_release_dir):
    class Bar:
        def __init__(self, phase: str, path: str, total: int) -> None:
            self.key, self.total, self.done, self.closed = (phase, path), total, 0, False
            bars.append(self)

        def update(self, n: int) -> None:
            self.done += n

        def close(self) -> None:
            self.closed = True

    bars: list[Bar] = []
    release_publish(directory=sample_release_dir, slug="llama-7b", progress=Bar)

    assert {b.key for b in bars} == {
        (phase, p) for phase in ("hash", "upload") for p in SAMPLE_PATHS
    }
    assert all(b.closed and b.done == b.total for b in bars)


def test_invalid_slug_and_missing_directory_are_refused(local_storage, tmp_path):
    with pytest.raises(PublishError, match="not a valid slug"):
        release_publish(directory=tmp_path, slug="llama 7b/../x")
    with pytest.raises(PublishError, match="is not a directory"):
        release_publish(directory=tmp_path / "nope", slug="llama-7b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PublishError, match="no files to publish"):
        release_publish(directory=tmp_path / "empty", slug="llama-7b")


# --- S3 -----------------------------------------------------------------------


def test_publish_to_s3_stores_the_bytes(s3_storage, sample_release_dir):
    result = release_publish(directory=sample_release_dir, slug="llama-7b")

    assert sorted(result.created) == SAMPLE_PATHS
    for artifact in Artifact.objects.all():
        body = s3_storage.open(artifact.storage_key)
        assert body.read() == (sample_release_dir / artifact.path).read_bytes()
    assert release_publish(directory=sample_release_dir, slug="llama-7b").bytes_uploaded == 0


def test_publish_with_s3_unreachable_is_refused_without_rows(dead_s3, sample_release_dir):
    with pytest.raises(StorageUnavailable, match="unreachable"):
        release_publish(directory=sample_release_dir, slug="llama-7b")
    assert not Release.objects.exists() and not Artifact.objects.exists()


# --- management commands -------------------------------------------------------


def test_generator_writes_meta_layout_with_verifiable_checklists(tmp_path, capsys):
    call_command(
        "generate_sample_release",
        str(tmp_path),
        "--size-label",
        "13B",
        "--shard-mb",
        "0.5",
        "--seed",
        "7",
    )

    assert sorted(
        p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
    ) == [
        "13B/checklist.chk",
        "13B/consolidated.00.pth",
        "13B/consolidated.01.pth",
        "13B/params.json",
        "tokenizer.model",
        "tokenizer_checklist.chk",
    ]
    assert (tmp_path / "13B" / "consolidated.01.pth").stat().st_size == MIB // 2
    for checklist in [tmp_path / "13B" / "checklist.chk", tmp_path / "tokenizer_checklist.chk"]:
        entries = parse_checklist(checklist.read_text())
        assert entries
        for name, md5 in entries.items():
            assert file_digests(checklist.parent / name)[1] == md5
    assert "Wrote 6 files" in capsys.readouterr().out


def test_generator_is_deterministic_per_seed(tmp_path):
    a = write_sample_release(tmp_path / "a", shard_bytes=1000, seed=1)
    b = write_sample_release(tmp_path / "b", shard_bytes=1000, seed=1)
    c = write_sample_release(tmp_path / "c", shard_bytes=1000, seed=2)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()


def test_publish_release_command_end_to_end(local_storage, tmp_path, capsys):
    directory = tmp_path / "llama-7b"
    call_command("generate_sample_release", str(directory), "--shards", "2", "--shard-mb", "1")

    call_command(
        "publish_release",
        str(directory),
        "--slug",
        "llama-7b",
        "--name",
        "LLaMA 7B",
        "--parameter-count",
        "6700000000",
        "--description",
        "The smallest one.",
    )
    out = capsys.readouterr().out
    assert "Created release llama-7b: 6 files added, 0 already published" in out
    release = Release.objects.get(slug="llama-7b")
    assert (release.name, release.parameter_count, release.description) == (
        "LLaMA 7B",
        6_700_000_000,
        "The smallest one.",
    )
    assert release.artifacts.count() == 6

    call_command("publish_release", str(directory), "--slug", "llama-7b")
    assert "0 files added, 6 already published, 0.0 MiB uploaded" in capsys.readouterr().out


def test_publish_release_command_reports_refusals(local_storage, sample_release_dir):
    os.remove(sample_release_dir / "tokenizer.model")
    with pytest.raises(
        CommandError, match="tokenizer_checklist.chk lists tokenizer.model, which is not"
    ):
        call_command("publish_release", str(sample_release_dir), "--slug", "llama-7b")
    assert not Release.objects.exists()


def test_storage_key_is_content_addressed():
    digest = hashlib.sha256(b"x").hexdigest()
    assert storage_key_for(digest) == f"sha256/{digest[:2]}/{digest}"
    assert Path(storage_key_for(digest)).parts[:2] == ("sha256", digest[:2])


@pytest.mark.parametrize("name", ["weights\\shard.pth", "tab\there.bin", "bell\x07.bin"])
def test_a_path_no_download_door_could_serve_is_refused_before_anything_is_written(
    local_storage, sample_release_dir, name
):
    (sample_release_dir / name).write_bytes(b"x")
    with pytest.raises(PublishError, match="cannot be published"):
        release_publish(directory=sample_release_dir, slug="llama-7b")
    assert not Artifact.objects.exists() and not Release.objects.exists()
    assert stored_objects(local_storage.root) == []
