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


def fetch_url(url: str, dest: str | Path, *, sha256: str | None = None, retries: int = 3, timeout: float = 60.0) -> str:
    """Download ``url`` to ``dest`` atomically and return its SHA-256.

    The file appears at ``dest`` only when complete and, if ``sha256`` is given, matching.
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
                raise ArchiveError(f"cannot fetch {url}: HTTP {e.code} {e.reason}; check the `url` in the config") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            if attempt == retries:
                part.unlink(missing_ok=True)
                raise ArchiveError(
                    f"cannot fetch {url} after {retries + 1} attempts: {e}; check the network, "
                    "or download it by hand and give its local `path` in the config"
                ) from None
        pause = 2.0**attempt
        log.warning("fetching %s failed (attempt %d), retrying in %.0f s", url, attempt + 1, pause)
        time.sleep(pause)
    digest = sha256_of(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise ArchiveError(
            f"{url} has SHA-256 {digest}, but the config expects {sha256}: the file changed upstream or "
            "was damaged in transit; re-run, or update `sha256` if the new file is trusted"
        )
    os.replace(part, dest)
    return digest


def unpack(archive: str | Path, into: str | Path) -> None:
    """Unpack a zip or tar archive into ``into`` (refusing members that would land outside it)."""
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
        raise ArchiveError(f"{archive} is neither a zip nor a tar archive; check the `archive.url` in the config")


def _check_member(name: str, into: Path) -> None:
    target = (into / name).resolve()
    if not target.is_relative_to(into.resolve()):
        raise ArchiveError(f"archive member {name!r} would be written outside {into}; refusing to unpack")


def fetch_archive(url: str, folder: str | Path, *, sha256: str | None = None) -> Path:
    """Fetch and unpack a data set archive into ``folder`` once; return the folder.

    With no expected checksum the first download's digest is recorded beside the folder
    and later downloads (after a deletion) must match it.
    """
    folder = Path(folder)
    record = folder.with_name(folder.name + ".sha256")
    if sha256 is None and record.exists():
        sha256 = record.read_text().split()[0]
    download = folder.with_name(folder.name + Path(url.split("?")[0]).suffix.lower() + ".download")
    digest = fetch_url(url, download, sha256=sha256)
    record.write_text(f"{digest}  {url}\n")
    staging = folder.with_name(folder.name + ".unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    unpack(download, staging)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    download.unlink()
    log.info("unpacked %s (sha256 %s) into %s", url, digest, folder)
    return folder
