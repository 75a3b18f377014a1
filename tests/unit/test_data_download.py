"""Downloads against a local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import io
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures_data import md5_file, write_cifar, write_cifar_tarball
from parm.data import DATASETS, DatasetSpec, RemoteFile, download_dataset, load_dataset
from parm.data.download import safe_extract_tar
from parm.errors import ChecksumError, DataError


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        pass


@dataclasses.dataclass(frozen=True)
class Server:
    folder: Path  # files served at url + "/<name>"
    url: str


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    folder = tmp_path / "www"
    folder.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Server(folder, f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _serve_mnist(fixture_root: Path, server: Server) -> DatasetSpec:
    """Copy the fixture .gz files to the server; a spec whose md5s are theirs."""
    files = []
    for remote in DATASETS["mnist"].files:
        shutil.copy(fixture_root / remote.path, server.folder / remote.name)
        files.append(dataclasses.replace(remote, md5=md5_file(server.folder / remote.name)))
    return dataclasses.replace(DATASETS["mnist"], files=tuple(files), mirrors=(server.url + "/",))


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def _no_part_files(folder: Path) -> bool:
    return not list(folder.rglob("*.part"))


def test_download_then_load(fixture_root: Path, server: Server, tmp_path: Path) -> None:
    spec = _serve_mnist(fixture_root, server)
    root = tmp_path / "root"
    assert download_dataset(spec, root) == root
    for remote in spec.files:
        assert md5_file(root / remote.path) == remote.md5
    assert _no_part_files(root)
    assert len(load_dataset("mnist", "test", data_root=root)) == 300


def test_second_download_is_a_no_op(fixture_root: Path, server: Server, tmp_path: Path) -> None:
    spec = _serve_mnist(fixture_root, server)
    download_dataset(spec, tmp_path)
    for f in server.folder.iterdir():
        f.unlink()  # the server has nothing now: a new fetch would fail
    download_dataset(spec, tmp_path)


def test_mirror_fallback(fixture_root: Path, server: Server, tmp_path: Path) -> None:
    spec = _serve_mnist(fixture_root, server)
    mirrors = [_closed_port_url(), server.url + "/missing/", server.url]  # refused, 404, good
    download_dataset(spec, tmp_path, mirrors=mirrors, timeout_s=5.0)
    assert all((tmp_path / f.path).exists() for f in spec.files)


def test_all_mirrors_fail(fixture_root: Path, server: Server, tmp_path: Path) -> None:
    spec = _serve_mnist(fixture_root, server)
    with pytest.raises(DataError) as err:
        download_dataset(spec, tmp_path, mirrors=[server.url + "/a/", server.url + "/b/"])
    text = str(err.value)
    assert "/a/" in text and "/b/" in text and "404" in text
    assert not isinstance(err.value, ChecksumError)
    assert _no_part_files(tmp_path)


def test_wrong_checksum(fixture_root: Path, server: Server, tmp_path: Path) -> None:
    spec = _serve_mnist(fixture_root, server)
    wanted = "0" * 32
    bad = dataclasses.replace(spec.files[0], md5=wanted)
    spec = dataclasses.replace(spec, files=(bad,))
    with pytest.raises(ChecksumError) as err:
        download_dataset(spec, tmp_path)
    actual = md5_file(server.folder / bad.name)
    assert (err.value.expected, err.value.actual, err.value.path) == (wanted, actual, tmp_path / bad.path)
    text = str(err.value)
    assert bad.name in text and wanted in text and actual in text
    assert not (tmp_path / bad.path).exists()
    assert _no_part_files(tmp_path)


def test_unwritable_root(fixture_root: Path, server: Server, tmp_path: Path) -> None:
    spec = _serve_mnist(fixture_root, server)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(DataError, match="cannot write downloads") as err:
        download_dataset(spec, not_a_folder)
    assert err.value.path == not_a_folder / "MNIST" / "raw"


def test_existing_file_with_wrong_checksum_is_reported(fixture_root: Path, server: Server, tmp_path: Path) -> None:
    spec = _serve_mnist(fixture_root, server)
    target = tmp_path / spec.files[0].path
    target.parent.mkdir(parents=True)
    target.write_bytes(b"stale")
    with pytest.raises(ChecksumError) as err:
        download_dataset(spec, tmp_path)
    assert err.value.path == target and "already exists" in str(err.value)
    assert target.read_bytes() == b"stale"


def test_load_with_download(fixture_root: Path, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _serve_mnist(fixture_root, server)
    monkeypatch.setitem(DATASETS, "mnist", spec)
    ds = load_dataset("mnist", "train", data_root=tmp_path, download=True)
    assert len(ds) == 1200


# --- tarballs ---------------------------------------------------------------------------------


def test_cifar_tarball_download_and_extract(server: Server, tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_cifar(source, 10)
    tarball = write_cifar_tarball(source, 10, server.folder)
    remote = dataclasses.replace(DATASETS["cifar10"].files[0], md5=md5_file(tarball))
    spec = dataclasses.replace(DATASETS["cifar10"], files=(remote,), mirrors=(server.url,))
    root = tmp_path / "root"
    download_dataset(spec, root)
    assert (root / "cifar-10-python.tar.gz").exists() and (root / "cifar-10-batches-py" / "test_batch").exists()
    assert len(load_dataset("cifar10", "train", data_root=root)) == 100


def _tar_with(tmp_path: Path, *members: tarfile.TarInfo) -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_member("../evil.txt"), "'..'"),
        (_member("cifar-10-batches-py/../../evil.txt"), "'..'"),
        (_member("/tmp/parm-evil.txt"), "absolute"),
        (_member("cifar-10-batches-py/link", tarfile.SYMTYPE, "../../outside"), "symlink"),
        (_member("cifar-10-batches-py/abs", tarfile.SYMTYPE, "/etc/passwd"), "symlink"),
        (_member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "../x"), "hard link"),
        (_member("cifar-10-batches-py/dev", tarfile.CHRTYPE), "device"),
    ],
)
def test_malicious_member_rejected(tmp_path: Path, member: tarfile.TarInfo, why: str) -> None:
    tarball = _tar_with(tmp_path, member)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DataError) as err:
        safe_extract_tar(tarball, dest)
    assert why in str(err.value) and member.name in str(err.value) and err.value.path == tarball
    assert list(dest.iterdir()) == []  # nothing extracted, not even the good member
    assert not (tmp_path / "evil.txt").exists()


def test_malicious_tarball_via_download(server: Server, tmp_path: Path) -> None:
    tarball = _tar_with(tmp_path, _member("../../escaped.txt"))
    shutil.copy(tarball, server.folder / "cifar-10-python.tar.gz")
    provides = ("cifar-10-batches-py/test_batch",)
    remote = RemoteFile("cifar-10-python.tar.gz", md5_file(tarball), provides=provides, extract=True)
    spec = dataclasses.replace(DATASETS["cifar10"], files=(remote,), mirrors=(server.url,))
    root = tmp_path / "a" / "root"
    with pytest.raises(DataError, match="unsafe"):
        download_dataset(spec, root)
    assert not (tmp_path / "escaped.txt").exists() and not (root / "cifar-10-batches-py").exists()


def test_safe_tarball_with_internal_symlink(tmp_path: Path) -> None:
    tarball = _tar_with(tmp_path, _member("cifar-10-batches-py/alias", tarfile.SYMTYPE, "ok.txt"))
    safe_extract_tar(tarball, tmp_path / "dest")
    assert (tmp_path / "dest" / "cifar-10-batches-py" / "alias").read_bytes() == b"ok"


def test_remote_file_validation() -> None:
    with pytest.raises(ValueError, match="md5"):
        RemoteFile("a.gz", "xyz")
    with pytest.raises(ValueError, match="relative"):
        RemoteFile("../a.gz", "0" * 32)
