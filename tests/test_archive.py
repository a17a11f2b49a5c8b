"""Archives (fetched or local) and the advice of every error on the way to a manifest: each
test makes the error, then does what it says and sees it work."""

from __future__ import annotations

import re
import shutil

import pytest
from data_sets import esc50_folder, snapshot, tar_folder, user_list, zip_folder

from equiav.config import ConfigError, validate_config
from equiav.data import archives
from equiav.data.archives import ArchiveError, archive_source, fetch_archive, fetch_url, unpack_local_archive
from equiav.data.lists import ListError
from equiav.data.manifest import build_manifest


@pytest.fixture
def esc50_zip(tmp_path):
    return zip_folder(esc50_folder(tmp_path / "src"), tmp_path / "esc50.zip")


def esc50_config(tmp_path, **archive) -> dict:
    return {
        "run": ["esc50"],
        "datasets": {"esc50": {"archive": archive, "lists": [{"format": "esc50", "path": "x.csv"}]}},
    }


def test_path_takes_precedence_over_url_and_names_its_kind(tmp_path, esc50_zip):
    url = "https://example.org/master.zip"
    assert archive_source({"url": url}) == ("url", url)
    assert archive_source({"url": url, "path": str(esc50_zip)}) == ("file", str(esc50_zip))
    assert archive_source({"url": url, "path": str(tmp_path / "src")}) == ("folder", str(tmp_path / "src"))


def test_a_missing_path_says_what_to_give(tmp_path, esc50_zip, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArchiveError, match=r"give the archive file \(zip or tar\[\.gz\]\) or the folder") as e:
        archive_source({"path": "esc50-copy.zip"})
    assert str(tmp_path) in str(e.value)  # where relative paths are looked up
    shutil.copy(esc50_zip, "esc50-copy.zip")  # the advice: the archive file there (or a folder)
    assert archive_source({"path": "esc50-copy.zip"}) == ("file", "esc50-copy.zip")


def test_archive_config_needs_url_or_path(tmp_path):
    with pytest.raises(ConfigError, match=r"'datasets.esc50.archive': give `url` or `path`"):
        validate_config(esc50_config(tmp_path, sha256=None))
    validate_config(esc50_config(tmp_path, path=str(tmp_path)))  # the advice: a `path`


def test_a_failed_fetch_advises_the_local_file_as_path(tmp_path, esc50_zip, monkeypatch):
    monkeypatch.setattr(archives.time, "sleep", lambda s: None)
    with pytest.raises(ArchiveError, match="give the local file as `path` in the same config entry") as e:
        fetch_archive(f"file://{tmp_path}/gone.zip", tmp_path / "archive")
    assert "takes precedence over `url`" in str(e.value)
    # The advice, as the workflow follows it (archive_source, then fetch-archive --path).
    kind, where = archive_source({"url": f"file://{tmp_path}/gone.zip", "path": str(esc50_zip)})
    assert kind == "file"
    unpack_local_archive(where, tmp_path / "archive")
    assert (tmp_path / "archive/ESC-50-master/meta/esc50.csv").is_file()


def test_local_archive_file_is_only_read_and_checked_when_a_digest_is_given(tmp_path, esc50_zip):
    before = snapshot(tmp_path / "src")
    digest = archives.sha256_of(esc50_zip)
    with pytest.raises(ArchiveError) as e:
        unpack_local_archive(esc50_zip, tmp_path / "archive", sha256="0" * 64)
    assert not (tmp_path / "archive").exists()
    advised = re.search(r"set `archive.sha256: ([0-9a-f]{64})`", str(e.value)).group(1)
    assert advised == digest and "(or null to skip the check)" in str(e.value)
    unpack_local_archive(esc50_zip, tmp_path / "archive", sha256=advised)  # the advice
    unpack_local_archive(esc50_zip, tmp_path / "archive", sha256=None)  # or null
    assert (tmp_path / "archive/ESC-50-master/audio").is_dir()
    assert not (tmp_path / "archive.sha256").exists()  # a local file records no digest
    assert snapshot(tmp_path / "src") == before


@pytest.mark.parametrize("name", ["esc50.tar.gz", "esc50.tar"])
def test_tarballs_unpack_like_zips(tmp_path, name):
    tarball = tar_folder(esc50_folder(tmp_path / "src"), tmp_path / name)
    unpack_local_archive(tarball, tmp_path / "archive")
    assert (tmp_path / "archive/ESC-50-master/meta/esc50.csv").is_file()


def test_not_an_archive_advises_a_file_or_the_folder(tmp_path):
    esc50_folder(tmp_path / "src")
    csv = tmp_path / "src/ESC-50-master/meta/esc50.csv"
    with pytest.raises(ArchiveError, match="check `archive.path` in the config: it must name a zip or tar"
                                           r"\(\.gz\) file, or the folder the archive was unpacked into"):  # fmt: skip
        unpack_local_archive(csv, tmp_path / "archive")
    assert archive_source({"path": str(tmp_path / "src")}) == ("folder", str(tmp_path / "src"))  # the advice


def test_a_changed_download_advises_its_digest_or_a_rerun(tmp_path, esc50_zip):
    """With `sha256: null` the first download's digest is recorded; a later one must match."""
    served = tmp_path / "served.zip"
    shutil.copy(esc50_zip, served)
    url = f"file://{served}"
    fetch_archive(url, tmp_path / "archive")
    shutil.rmtree(tmp_path / "archive")
    first = served.read_bytes()
    served.write_bytes(first + b"damaged")  # changed upstream, or damaged in transit
    with pytest.raises(ArchiveError, match="its first download \\(recorded in .*archive.sha256\\) had") as e:
        fetch_archive(url, tmp_path / "archive")
    advised = re.search(r"set `archive.sha256: ([0-9a-f]{64})` in the config", str(e.value)).group(1)
    assert "run the workflow again to fetch it again" in str(e.value)
    fetch_archive(url, tmp_path / "archive", sha256=advised)  # the advice, for a trusted new file
    served.write_bytes(first)  # the advice, for a file damaged in transit: a re-run fetches it again
    fetch_archive(url, tmp_path / "archive", sha256=archives.sha256_of(esc50_zip))
    assert (tmp_path / "archive/ESC-50-master").is_dir()


def test_a_failed_list_fetch_advises_its_local_path(tmp_path, monkeypatch):
    monkeypatch.setattr(archives.time, "sleep", lambda s: None)
    with pytest.raises(ArchiveError, match="give the local file as `path` in the same config entry"):
        fetch_url(f"file://{tmp_path}/gone.csv", tmp_path / "lists/x.csv", retries=0)


def dataset_of(csv, **entry) -> dict:
    return {"lists": [{"format": "esc50", "path": str(csv), **entry}], "shard_size": 10}


def test_a_missing_list_file_advises_its_path(tmp_path):
    esc50_folder(tmp_path / "src")
    csv = tmp_path / "src/ESC-50-master/meta/esc50.csv"
    with pytest.raises(ListError, match="fix the list's `path`"):
        build_manifest(dataset_of(tmp_path / "src/meta/esc50.csv"), tmp_path / "out", tmp_path / "shards")
    assert len(build_manifest(dataset_of(csv), tmp_path / "out", tmp_path / "shards")) == 10  # the advice


def test_no_audio_folder_advises_audio_dir(tmp_path):
    esc50_folder(tmp_path / "src")
    flat = tmp_path / "flat.csv"
    shutil.copy(tmp_path / "src/ESC-50-master/meta/esc50.csv", flat)
    with pytest.raises(ListError, match="set the list's `audio_dir`"):
        build_manifest(dataset_of(flat), tmp_path / "out", tmp_path / "shards")
    audio = str(tmp_path / "src/ESC-50-master/audio")
    assert len(build_manifest(dataset_of(flat, audio_dir=audio), tmp_path / "out", tmp_path / "shards")) == 10


def test_no_usable_clip_shows_the_rejected_rows(tmp_path):
    """The job's outputs (list_problems.csv) are deleted when it fails: the message holds the rows."""
    good = user_list(tmp_path / "mine")
    bad = tmp_path / "bad.csv"
    lines = good.read_text().splitlines()
    bad.write_text(
        "\n".join([lines[0]] + [",".join(line.split(",")[:4] + ["", line.split(",")[5]]) for line in lines[1:]])
    )
    settings = {"lists": [{"format": "user", "path": str(bad)}], "shard_size": 10, "max_bad_fraction": 1.0}
    with pytest.raises(ListError, match=r"check each list's `path` and `format`. Rejected rows:\n  .*bad.csv:2: "):
        build_manifest(settings, tmp_path / "out", tmp_path / "shards")
    settings["lists"][0]["path"] = str(good)  # the advice: the right list
    assert len(build_manifest(settings, tmp_path / "out", tmp_path / "shards")) == 6
