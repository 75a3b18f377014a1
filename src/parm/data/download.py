"""Fetching dataset files: mirrors in order, streamed to a ``.part`` file, md5-checked, renamed.

The steps for one :class:`RemoteFile` (see :func:`ensure_file`):

1. the file exists: check its md5; a mismatch raises ChecksumError (never silently overwritten);
2. else what it ``provides`` already exists (a decompressed copy, the extracted members): nothing to do;
3. else fetch it: try each mirror in order; stream into ``<name>.<random>.part`` in the target
   folder while hashing; a wrong md5 deletes the part file and moves on to the next mirror; the
   first good copy is renamed into place with ``os.replace`` (atomic), so a reader never sees a
   half-written file. If no mirror gives a good copy: ChecksumError when some mirror served
   wrong bytes, else DataError listing each URL and its error.
4. a tarball (``extract=True``) is unpacked into the data root after every member is checked:
   no absolute paths, no ``..``, no links that point outside, only files, folders and links.

Only :mod:`urllib` from the standard library is used; ``file://`` mirrors work too.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import re
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from parm.errors import ChecksumError, ConfigError, DataError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_NETWORK_ERRORS = (OSError, http.client.HTTPException, ValueError)  # URLError/HTTPError/timeouts are OSError


@dataclass(frozen=True)
class RemoteFile:
    """A file fetched from a mirror.

    path: where it goes, relative to the data root (POSIX), e.g. ``MNIST/raw/t10k-labels-idx1-ubyte.gz``;
      its URL is ``<mirror>/<basename of path>``.
    md5: lowercase hex md5 of the file.
    provides: paths (relative to the data root) whose presence makes the download unnecessary:
      the decompressed copy of a ``.gz``, or the members a tarball extracts to.
    extract: a tarball to unpack into the data root once downloaded.
    """

    path: str
    md5: str
    provides: tuple[str, ...] = ()
    extract: bool = False

    def __post_init__(self) -> None:
        for rel in (self.path, *self.provides):
            _check_relative(rel)
        if not _MD5_RE.match(self.md5):
            raise ConfigError(
                f"md5 must be 32 lowercase hex digits; got md5={self.md5!r} for {self.path}", field="md5", value=self.md5
            )

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


def _check_relative(rel: str) -> None:
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts:
        raise ConfigError(
            f"dataset file paths must be relative and stay inside the data root; got {rel!r}", field="path", value=rel
        )


def md5_file(path: str | Path) -> str:
    """Lowercase hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_files(files: Sequence[RemoteFile], root: Path, mirrors: Sequence[str], timeout_s: float) -> None:
    """Make every file of ``files`` present and verified under ``root`` (see the module docstring)."""
    if not mirrors:
        raise ConfigError("at least one mirror URL is needed to download; got none", field="mirrors", value=list(mirrors))
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s must be > 0; got timeout_s={timeout_s}", field="timeout_s", value=timeout_s)
    for remote in files:
        ensure_file(remote, root, mirrors, timeout_s)


def ensure_file(remote: RemoteFile, root: Path, mirrors: Sequence[str], timeout_s: float) -> None:
    dest = root / remote.path
    provided = bool(remote.provides) and all((root / p).exists() for p in remote.provides)
    if dest.exists():
        check_existing(dest, remote.md5)
    elif provided:
        logger.info("%s: not downloaded, its content is already present (%s)", remote.path, remote.provides[0])
        return
    else:
        fetch_file([_join_url(m, remote.name) for m in mirrors], dest, remote.md5, timeout_s)
    if remote.extract and not provided:
        safe_extract_tar(dest, root)


def check_existing(path: Path, expected_md5: str) -> None:
    actual = md5_file(path)
    if actual != expected_md5:
        raise ChecksumError(
            f"{path} already exists but its md5 is {actual}, expected {expected_md5}: it is damaged or a "
            "different version. It was left untouched; delete it and run again with --download to fetch a fresh copy.",
            path=path,
            expected=expected_md5,
            actual=actual,
        )
    logger.info("%s: present, md5 ok", path)


def _join_url(mirror: str, name: str) -> str:
    return mirror.rstrip("/") + "/" + name


def fetch_file(urls: Sequence[str], dest: Path, expected_md5: str, timeout_s: float) -> None:
    """Download ``dest`` from the first of ``urls`` that gives bytes with ``expected_md5``."""
    _check_writable(dest.parent)
    failures: list[str] = []
    bad_md5: tuple[str, str] | None = None  # (url, actual md5) of the last mismatch
    for url in urls:
        try:
            part, actual = _stream_to_part(url, dest, timeout_s)
        except _NETWORK_ERRORS as exc:
            logger.warning("download of %s failed: %s; trying the next mirror", url, exc)
            failures.append(f"{url}: {exc}")
            continue
        if actual == expected_md5:
            os.replace(part, dest)  # atomic: readers see the old state or the whole verified file
            logger.info("%s: downloaded from %s, md5 ok", dest, url)
            return
        part.unlink()
        logger.warning("%s from %s has md5 %s, expected %s; deleted it", dest.name, url, actual, expected_md5)
        failures.append(f"{url}: md5 {actual}, expected {expected_md5}")
        bad_md5 = (url, actual)
    _raise_fetch_failure(dest, expected_md5, failures, bad_md5)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DataError(
            f"cannot write downloads into {folder} ({exc}). Pass --data-root DIR or set PARM_DATA_ROOT to a "
            "writable folder.",
            path=folder,
        ) from exc


def _raise_fetch_failure(dest: Path, expected_md5: str, failures: list[str], bad_md5: tuple[str, str] | None) -> None:
    tried = "\n  ".join(failures)
    if bad_md5 is not None:
        raise ChecksumError(
            f"downloaded {dest.name} has md5 {bad_md5[1]}, expected {expected_md5} (from {bad_md5[0]}); the mirror "
            f"served a damaged or different file, which was deleted. Tried:\n  {tried}\nTry again later, pass other "
            f"mirrors, or put a good copy in {dest.parent} by hand.",
            path=dest,
            expected=expected_md5,
            actual=bad_md5[1],
        )
    raise DataError(
        f"could not download {dest.name} into {dest.parent} from any mirror. Tried:\n  {tried}\n"
        f"Check the network or proxy, or put the file in {dest.parent} by hand, or point --data-root / "
        "PARM_DATA_ROOT at a folder that already has the data.",
        path=dest,
    )


def _stream_to_part(url: str, dest: Path, timeout_s: float) -> tuple[Path, str]:
    """Stream ``url`` into a new ``.part`` file beside ``dest``; return (part path, md5). No part left on error."""
    fd, part_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    part = Path(part_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            total_bytes = int(response.headers.get("Content-Length") or 0)
            digest = _copy_with_progress(response, out, total_bytes, url)
        return part, digest
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _copy_with_progress(response: IO[bytes], out: IO[bytes], total_bytes: int, url: str) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.md5(usedforsecurity=False)
    start_s = time.monotonic()
    logger.info("downloading %s (%s bytes)", url, total_bytes or "unknown")
    bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc=posixpath.basename(url), disable=None, leave=False)
    with bar:
        for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    logger.info("downloaded %s in %.1f s", url, time.monotonic() - start_s)
    return digest.hexdigest()


def safe_extract_tar(tarball: Path, root: Path) -> None:
    """Unpack ``tarball`` into ``root`` after checking every member; nothing is written if one is unsafe."""
    try:
        with tarfile.open(tarball, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, tarball)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: refuse links and devices on extraction too
                tar.extractall(root, members=members, filter="data")
            else:
                tar.extractall(root, members=members)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(
            f"cannot extract {tarball}: {exc}. Delete it and run again with --download.", path=tarball
        ) from exc
    logger.info("extracted %s (%d members) into %s", tarball, len(members), root)


def _check_member(member: tarfile.TarInfo, tarball: Path) -> None:
    name = member.name
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        _unsafe(tarball, name, "it is a device, fifo or other special file")
    if _escapes(name):
        _unsafe(tarball, name, "its path is absolute or climbs out with '..'")
    if member.issym() and _escapes(posixpath.join(posixpath.dirname(name), member.linkname)):
        _unsafe(tarball, name, f"it is a symlink to {member.linkname!r}, outside the extraction folder")
    if member.islnk() and _escapes(member.linkname):
        _unsafe(tarball, name, f"it is a hard link to {member.linkname!r}, outside the extraction folder")


def _escapes(rel: str) -> bool:
    """True when ``rel`` is absolute or, once normalised, leaves the folder it is relative to."""
    if rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        return True
    normal = posixpath.normpath(rel.replace("\\", "/"))
    return normal == ".." or normal.startswith("../")


def _unsafe(tarball: Path, name: str, why: str) -> None:
    raise DataError(
        f"refusing to extract {tarball}: member {name!r} is unsafe ({why}). Nothing was extracted. "
        "The archive is not the genuine release: delete it and download it again from a trusted mirror.",
        path=tarball,
    )
