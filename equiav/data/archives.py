"""Plain HTTP downloads of whole files (official lists, data set archives) with checksums."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)


class ArchiveError(RuntimeError):
    """A download or an archive that cannot be used; the message names the URL or file and the fix."""


def sha256_of(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_url(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    expected_from: str = "the config expects",
    sha256_key: str = "sha256",
) -> str:
    """Download ``url`` to ``dest`` atomically and return its SHA-256.

    The file appears at ``dest`` only when complete and, if ``sha256`` is given, matching
    (``expected_from`` says where the expected digest came from and ``sha256_key`` which config
    key sets it, for the error message).
    Transient failures (5xx, 429, network errors) are retried with back-off; 4xx is final.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
                expected = response.headers.get("Content-Length")
            if expected is not None and part.stat().st_size != int(expected):
                raise ConnectionError(f"got {part.stat().st_size} of {expected} bytes")
            break
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500 or attempt == retries:
                part.unlink(missing_ok=True)
                raise ArchiveError(
                    f"cannot fetch {url}: HTTP {e.code} {e.reason}; check the `url` in the config, or download "
                    "it by hand and give the local file as `path` in the same config entry"
                ) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            if attempt == retries:
                part.unlink(missing_ok=True)
                raise ArchiveError(
                    f"cannot fetch {url} after {retries + 1} attempts: {e}; check the network, or download "
                    "it by hand and give the local file as `path` in the same config entry (it takes "
                    "precedence over `url`)"
                ) from None
        pause = 2.0**attempt
        log.warning("fetching %s failed (attempt %d), retrying in %.0f s", url, attempt + 1, pause)
        time.sleep(pause)
    digest = sha256_of(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise ArchiveError(
            f"{url} has SHA-256 {digest}, but {expected_from} {sha256}: the file changed upstream or was "
            f"damaged in transit; run the workflow again to fetch it again, or, if the new file is trusted, "
            f"set `{sha256_key}: {digest}` in the config"
        )
    os.replace(part, dest)
    return digest


def unpack(archive: str | Path, into: str | Path, *, key: str = "archive.url") -> None:
    """Unpack a zip or tar archive into ``into`` (refusing members that would land outside it).

    ``key`` names the config key the archive came from, for the error message.
    """
    archive, into = Path(archive), Path(into)
    into.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                _check_member(name, into)
            z.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            t.extractall(into, filter="data")
    else:
        raise ArchiveError(
            f"{archive} is neither a zip nor a tar archive; check `{key}` in the config: it must name a "
            "zip or tar(.gz) file" + (", or the folder the archive was unpacked into" if key == "archive.path" else "")
        )


def _check_member(name: str, into: Path) -> None:
    target = (into / name).resolve()
    if not target.is_relative_to(into.resolve()):
        raise ArchiveError(f"archive member {name!r} would be written outside {into}; refusing to unpack")


def archive_source(archive: dict) -> tuple[str, str]:
    """How a data set's `archive` config entry is had: ("folder", path) is used in place;
    ("file", path) and ("url", url) are unpacked into <data_dir>/<dataset>/archive.

    `path` takes precedence over `url`, so that a user's config file can point a preset's
    data set at a local copy (config files are merged, so the preset's `url` stays).
    """
    path = archive.get("path")
    if path is None:
        return "url", archive["url"]
    if os.path.isdir(path):
        return "folder", path
    if os.path.isfile(path):
        return "file", path
    raise ArchiveError(
        f"`archive.path` {path!r} does not exist (relative paths are taken in the working directory, "
        f"{os.getcwd()}); give the archive file (zip or tar[.gz]) or the folder it was unpacked into"
    )


def _unpack_into(archive: Path, folder: Path, key: str) -> None:
    """Unpack beside ``folder`` and move it into place, so a half-unpacked folder never counts."""
    staging = folder.with_name(folder.name + ".unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    unpack(archive, staging, key=key)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def fetch_archive(url: str, folder: str | Path, *, sha256: str | None = None) -> Path:
    """Fetch and unpack a data set archive into ``folder`` once; return the folder.

    With no expected checksum the first download's digest is recorded beside the folder
    and later downloads (after a deletion) must match it.
    """
    folder = Path(folder)
    record = folder.with_name(folder.name + ".sha256")
    expected_from = "the config's `archive.sha256` is"
    if sha256 is None and record.exists():
        sha256 = record.read_text().split()[0]
        expected_from = f"its first download (recorded in {record}) had"
    download = folder.with_name(folder.name + Path(url.split("?")[0]).suffix.lower() + ".download")
    digest = fetch_url(url, download, sha256=sha256, expected_from=expected_from, sha256_key="archive.sha256")
    record.write_text(f"{digest}  {url}\n")
    _unpack_into(download, folder, "archive.url")
    download.unlink()
    log.info("unpacked %s (sha256 %s) into %s", url, digest, folder)
    return folder


def unpack_local_archive(path: str | Path, folder: str | Path, *, sha256: str | None = None) -> Path:
    """Check a local archive file against ``sha256`` (when given) and unpack it into ``folder``.

    The file itself is only read. No digest is recorded: the file is the user's own copy.
    """
    path, folder = Path(path), Path(folder)
    if sha256 is not None:
        digest = sha256_of(path)
        if digest != sha256.lower():
            raise ArchiveError(
                f"{path} has SHA-256 {digest}, but the config's `archive.sha256` is {sha256}: it is not the "
                f"expected file, or it is damaged; give the right file as `archive.path`, or, if this one is "
                f"trusted, set `archive.sha256: {digest}` (or null to skip the check)"
            )
    _unpack_into(path, folder, "archive.path")
    log.info("unpacked %s into %s", path, folder)
    return folder
