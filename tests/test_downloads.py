"""Datasets and the authors' captions by download (downloads.py, registry.fetch_missing,
`python registry.py download`, `train.py --download`), without a network: a loopback HTTP server
serves archives and caption files made here, with Range support and a switch that cuts a
transfer after N bytes."""
import dataclasses
import errno
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import data
import downloads
import registry
from tests.helpers import voc_tree

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 10          # every request of a test, both ends: a hung transfer fails the test, never blocks it


# --------------------------------------------------------------------------------------------
# The loopback server
# --------------------------------------------------------------------------------------------

class Served:
    """What the server serves and what it saw: files by URL path, the Range header of each
    request and the bytes each reply sent; `cut_after[path] = N` ends the next reply to `path`
    after N bytes; `ranges = False` makes it a server that ignores Range."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}
        self.stall_s = 0.0                                         # silence before the body: a stalled server
        self.ranges = True
        self.requests: list[tuple[str, str | None, int]] = []     # (path, Range header, bytes sent)
        self.url = ""                                              # http://127.0.0.1:PORT


class Handler(BaseHTTPRequestHandler):
    timeout = TIMEOUT_S

    def do_GET(self):
        served: Served = self.server.served
        body, asked = served.files.get(self.path), self.headers.get("Range")
        if body is None:
            served.requests.append((self.path, asked, 0))
            self.send_error(404)
            return
        start = int(asked.removeprefix("bytes=").partition("-")[0]) if asked and served.ranges else 0
        if start >= len(body) and asked and served.ranges:
            served.requests.append((self.path, asked, 0))
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if asked and served.ranges else 200)
        if asked and served.ranges:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        time.sleep(served.stall_s)
        payload = body[start:][:served.cut_after.pop(self.path, None)]
        # Recorded before the bytes go: the client may have read them all before this thread runs on.
        served.requests.append((self.path, asked, len(payload)))
        self.wfile.write(payload)
        self.close_connection = True          # a cut reply ends here, short of its Content-Length

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.served = Served()
    httpd.served.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd.served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT_S)


def checksum(algorithm: str, body: bytes) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"


# --------------------------------------------------------------------------------------------
# A small VOC2007 release, served as the registry's pieces
# --------------------------------------------------------------------------------------------

def tar_of(folder: Path, arcname: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        tf.add(folder, arcname=arcname)
    return buffer.getvalue()


def voc2007_release(real: Path, work: Path) -> dict[str, bytes]:
    """The official file names of voc2007's pieces -> their bytes: the two tars as they unpack
    (VOCdevkit/VOC2007 of the three real photos, with ImageSets) and the caption files."""
    trainval, test = work / "trainval", work / "test"
    captions = voc_tree(real, trainval / "VOC2007", ("trainval",), 1)
    voc_tree(real, test / "VOC2007", ("test",), 1)
    return {"VOCtrainval_06-Nov-2007.tar": tar_of(trainval, "VOCdevkit"),
            "VOCtest_06-Nov-2007.tar": tar_of(test, "VOCdevkit"),
            "voc2007_captions.json": json.dumps(captions).encode(),
            "voc2007_re_captions.json": json.dumps({k: v[::-1] for k, v in captions.items()}).encode()}


def served_pieces(served: Served, entry: registry.Dataset, files: dict[str, bytes],
                  wrong: str = "") -> tuple[registry.Download, ...]:
    """The entry's pieces, each fetched from the loopback server with the served file's own
    checksum (`wrong`: that file's checksum is another); places and names as the registry has them."""
    pieces = []
    for piece in entry.downloads:
        name = Path(piece.url).name
        served.files[f"/{name}"] = files[name]
        algorithm = piece.checksum.partition(":")[0]
        pinned = checksum(algorithm, files[name] + (b"other" if name == wrong else b""))
        pieces.append(dataclasses.replace(piece, url=f"{served.url}/{name}", checksum=pinned))
    return tuple(pieces)


@pytest.fixture
def voc_files(shared_data, tmp_path) -> dict[str, bytes]:
    return voc2007_release(shared_data / "real_sample" / "voc", tmp_path / "made")


def leftovers(folder: Path) -> list[str]:
    """What a download or an unpack must never leave: parts, archives, hidden staging folders."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith((".part", ".tar", ".zip")) or p.name.endswith(".unpacking"))


def test_download_unpacks_into_the_release_layout_that_the_loaders_read(server, voc_files, tmp_path):
    entry = registry.get("voc2007")
    entry = dataclasses.replace(entry, downloads=served_pieces(server, entry, voc_files))
    places = entry.release_places(tmp_path / "data_folder")
    said = []
    registry.fetch_missing(entry, places, say=said.append)
    root = tmp_path / "data_folder" / "voc2007"
    assert places == {"data_root": root, "captions": root}
    for split, tree in (("trainval", "VOCtrainval_06-Nov-2007"), ("test", "VOCtest_06-Nov-2007")):
        assert data.voc_root(root, 2007, split) == root / tree / "VOCdevkit" / "VOC2007"
        loaded = registry.load("voc2007", root, split)
        assert len(loaded) == 3 and loaded[0]["image"].shape[0] == 3
    assert (root / "captions.json").read_bytes() == voc_files["voc2007_captions.json"]
    assert (root / "re_captions.json").read_bytes() == voc_files["voc2007_re_captions.json"]
    assert leftovers(tmp_path) == []
    assert len(said) == 4 and all(line.startswith("fetched http://127.0.0.1:") for line in said), said
    assert said[0].endswith(f"(md5 checked), unpacked into {root / 'VOCtrainval_06-Nov-2007'}")
    # a second run finds every piece in place and asks the server for nothing
    asked, said = len(server.requests), []
    registry.fetch_missing(entry, places, say=said.append)
    assert len(server.requests) == asked and [line.split(":")[0] for line in said] == ["in place"] * 4


def test_an_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    body = os.urandom(300_000)
    server.files["/big.bin"], server.cut_after["/big.bin"] = body, 100_000
    dest, url = tmp_path / "big.bin", f"{server.url}/big.bin"
    with pytest.raises(data.DataError) as failed:
        downloads.fetch(url, dest, checksum("sha256", body), timeout=TIMEOUT_S)
    line = str(failed.value)
    assert "\n" not in line and line.startswith(f"{url}: download failed (the connection closed after 100,000 of")
    assert line.endswith(f"the 100,000 bytes so far are kept in {dest}.part and the next run resumes from there")
    assert not dest.exists() and (tmp_path / "big.bin.part").stat().st_size == 100_000
    assert downloads.fetch(url, dest, checksum("sha256", body), timeout=TIMEOUT_S) is True
    assert dest.read_bytes() == body and not (tmp_path / "big.bin.part").exists()
    assert server.requests == [("/big.bin", None, 100_000), ("/big.bin", "bytes=100000-", 200_000)]


def test_a_network_failure_is_one_line_naming_the_url_and_the_reason(server, tmp_path):
    url = f"{server.url}/VOCtest_06-Nov-2007.tar"
    with pytest.raises(data.DataError) as failed:
        downloads.fetch(url, tmp_path / "VOCtest_06-Nov-2007.tar", "md5:" + "0" * 32, timeout=TIMEOUT_S)
    assert str(failed.value) == f"{url}: download failed (HTTP 404 Not Found); nothing was received; the next run " \
                                "tries again"
    server.files["/VOCtest_06-Nov-2007.tar"], server.stall_s = b"x" * 1000, 1.0
    with pytest.raises(data.DataError) as failed:
        downloads.fetch(url, tmp_path / "VOCtest_06-Nov-2007.tar", "md5:" + "0" * 32, timeout=0.2)
    assert str(failed.value) == f"{url}: download failed (no data for too long (timed out)); nothing was " \
                                "received; the next run tries again"
    refused = f"http://127.0.0.1:{free_port()}/x.tar"
    with pytest.raises(data.DataError) as failed:
        downloads.fetch(refused, tmp_path / "x.tar", "md5:" + "0" * 32, timeout=TIMEOUT_S)
    assert str(failed.value).startswith(f"{refused}: download failed ([Errno {errno.ECONNREFUSED}] ")
    assert list(tmp_path.iterdir()) == []


def free_port() -> int:
    """A port no one listens on (taken, then let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_server_that_ignores_range_starts_over_and_a_complete_part_is_only_checked(server, tmp_path):
    body = os.urandom(50_000)
    server.files["/f.bin"], server.ranges = body, False
    (tmp_path / "f.bin.part").write_bytes(body[:20_000])
    assert downloads.fetch(f"{server.url}/f.bin", tmp_path / "f.bin", checksum("md5", body), timeout=TIMEOUT_S)
    assert (tmp_path / "f.bin").read_bytes() == body and server.requests == [("/f.bin", "bytes=20000-", 50_000)]
    # a part that holds the whole file (stopped before its rename): the server answers 416
    server.ranges = True
    (tmp_path / "g.bin.part").write_bytes(body)
    server.files["/g.bin"] = body
    assert downloads.fetch(f"{server.url}/g.bin", tmp_path / "g.bin", checksum("md5", body), timeout=TIMEOUT_S)
    assert (tmp_path / "g.bin").read_bytes() == body and server.requests[-1] == ("/g.bin", "bytes=50000-", 0)


def test_a_wrong_checksum_is_refused_with_the_part_removed_and_nothing_unpacked(server, voc_files, tmp_path):
    entry = registry.get("voc2007")
    entry = dataclasses.replace(entry, downloads=served_pieces(server, entry, voc_files,
                                                               wrong="VOCtrainval_06-Nov-2007.tar"))
    with pytest.raises(data.DataError) as failed:
        registry.fetch_missing(entry, entry.release_places(tmp_path / "data_folder"), say=lambda line: None)
    root = tmp_path / "data_folder" / "voc2007"
    line = str(failed.value)
    assert "\n" not in line and line.startswith(f"{root / 'VOCtrainval_06-Nov-2007.tar'}: md5 differs from the "
                                                "official one (got ")
    assert line.endswith("the download is damaged or not the official file; it was deleted, nothing was unpacked")
    assert sorted(p.name for p in root.iterdir()) == []


def tar_with(member: tarfile.TarInfo, payload: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        good = tarfile.TarInfo("VOCdevkit/fine.txt")
        good.size = 4
        tf.addfile(good, io.BytesIO(b"fine"))
        member.size = len(payload) if member.isfile() else 0
        tf.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return buffer.getvalue()


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, target
    return member


def device(name: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = tarfile.CHRTYPE
    return member


@pytest.mark.parametrize("member,words", [
    (tarfile.TarInfo("../evil"), "leads outside the folder it unpacks into"),
    (tarfile.TarInfo("VOCdevkit/../../evil"), "leads outside the folder it unpacks into"),
    (tarfile.TarInfo("/tmp/evil"), "has an absolute path"),
    (link("VOCdevkit/out", "../../../outside"), "is a link that leads outside the folder it unpacks into"),
    (link("VOCdevkit/abs", "/etc/passwd"), "is a link to an absolute path"),
    (link("VOCdevkit/hard", "../../outside", tarfile.LNKTYPE), "is a link that leads outside the folder it unpacks "
                                                               "into"),
    (device("VOCdevkit/tty"), "is a device or another special file"),
])
def test_a_tar_member_leading_outside_is_refused_with_nothing_unpacked(tmp_path, member, words):
    archive, into = tmp_path / "release.tar", tmp_path / "data" / "VOCtrainval_06-Nov-2007"
    archive.write_bytes(tar_with(member, b"evil" if member.isfile() else b""))
    with pytest.raises(data.DataError) as failed:
        downloads.unpack(archive, into)
    assert str(failed.value) == f"{archive}: member {member.name!r} {words}: refused, nothing was unpacked"
    assert not (tmp_path / "data").exists() and not (tmp_path / "evil").exists() and archive.is_file()


@pytest.mark.parametrize("name,words", [("../evil", "leads outside the folder it unpacks into"),
                                        ("a/../../evil", "leads outside the folder it unpacks into"),
                                        ("/tmp/evil", "has an absolute path"),
                                        ("C:\\evil", "has an absolute path")])
def test_a_zip_member_leading_outside_is_refused_with_nothing_unpacked(tmp_path, name, words):
    archive, into = tmp_path / "val2014.zip", tmp_path / "coco2014"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("val2014/fine.jpg", b"fine")
        zf.writestr(name, b"evil")
    into.mkdir()
    with pytest.raises(data.DataError) as failed:
        downloads.unpack(archive, into)
    assert str(failed.value) == f"{archive}: member {name!r} {words}: refused, nothing was unpacked"
    assert list(into.iterdir()) == [] and archive.is_file()


def test_unpack_never_replaces_what_is_there_and_unpacks_a_zip_into_place(tmp_path):
    archive, into = tmp_path / "val2014.zip", tmp_path / "coco2014"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("val2014/a.jpg", b"a")
        zf.writestr("val2014/b/c.jpg", b"c")
    (into / "val2014").mkdir(parents=True)
    (into / "val2014" / "mine.jpg").write_bytes(b"mine")
    with pytest.raises(data.DataError) as failed:
        downloads.unpack(archive, into)
    assert str(failed.value) == (f"{into / 'val2014'}: is there already: unpacking val2014.zip would replace it; "
                                 "nothing was unpacked (move it away, or pass another folder)")
    assert [p.name for p in (into / "val2014").iterdir()] == ["mine.jpg"] and archive.is_file()
    (into / "val2014" / "mine.jpg").unlink()
    (into / "val2014").rmdir()
    assert downloads.unpack(archive, into) == [into / "val2014"]
    assert (into / "val2014" / "b" / "c.jpg").read_bytes() == b"c" and not archive.exists()
    assert [p.name for p in into.iterdir()] == ["val2014"]


def test_an_existing_file_is_checked_skipped_when_equal_and_never_replaced(server, tmp_path):
    body = b'{"000005.": ["a dog"]}'
    server.files["/captions.json"] = body
    dest, url = tmp_path / "captions.json", f"{server.url}/captions.json"
    dest.write_bytes(body)
    assert downloads.fetch(url, dest, checksum("sha256", body), timeout=TIMEOUT_S) is False
    dest.write_bytes(b'{"mine": []}')
    with pytest.raises(data.DataError) as failed:
        downloads.fetch(url, dest, checksum("sha256", body), timeout=TIMEOUT_S)
    line = str(failed.value)
    assert line.startswith(f"{dest}: is there already and its sha256 differs from the official one (got ")
    assert line.endswith("it was left as it is; move it away to download it again") and "\n" not in line
    assert dest.read_bytes() == b'{"mine": []}' and server.requests == []


class DiskFillsAfter:
    """A file whose disk is full after `room` bytes: what is written up to then stays."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, block: bytes) -> int:
        if len(block) > self.room:
            self.file.write(block[:self.room])
            self.room = 0
            self.file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(block)
        return self.file.write(block)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_is_one_line_and_keeps_the_bytes_so_far(server, tmp_path, monkeypatch):
    body = os.urandom(3 * downloads.CHUNK_BYTES)
    server.files["/train2014.zip"] = body
    dest, url = tmp_path / "train2014.zip", f"{server.url}/train2014.zip"

    def open_on_a_small_disk(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return DiskFillsAfter(file, 1_500_000) if "w" in mode or "a" in mode else file
    monkeypatch.setattr(downloads, "open", open_on_a_small_disk, raising=False)
    with pytest.raises(data.DataError) as failed:
        downloads.fetch(url, dest, checksum("md5", body), timeout=TIMEOUT_S)
    assert str(failed.value) == (f"{dest}.part: cannot be written: the disk is full ({os.strerror(errno.ENOSPC)}); "
                                 "the 1,500,000 bytes so far are kept there and the next run resumes from them once "
                                 "there is room")
    monkeypatch.undo()                              # room made
    assert downloads.fetch(url, dest, checksum("md5", body), timeout=TIMEOUT_S) is True
    assert dest.read_bytes() == body and server.requests[-1][1] == "bytes=1500000-"


def test_a_full_disk_while_unpacking_leaves_nothing_and_keeps_the_archive(tmp_path, monkeypatch):
    archive, into = tmp_path / "VOCtest_06-Nov-2007.tar", tmp_path / "voc2007" / "VOCtest_06-Nov-2007"
    archive.write_bytes(tar_with(tarfile.TarInfo("VOCdevkit/VOC2007/JPEGImages/x.jpg"), b"jpeg"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(tarfile.TarFile, "makefile", full)
    with pytest.raises(data.DataError) as failed:
        downloads.unpack(archive, into)
    assert str(failed.value) == (f"{archive}: cannot be unpacked into {into} (the disk is full): nothing was "
                                 "unpacked, the archive is kept and the next run unpacks it again")
    assert not (tmp_path / "voc2007").exists() and archive.is_file()


# --------------------------------------------------------------------------------------------
# The registry's pins
# --------------------------------------------------------------------------------------------

def test_the_voc_sources_are_torchvisions():
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    archives = {(entry, piece.url, piece.checksum) for entry in ("voc2007", "voc2012")
                for piece in registry.get(entry).downloads if piece.unpack}
    assert archives == {(entry, DATASET_YEAR_DICT[key]["url"], f"md5:{DATASET_YEAR_DICT[key]['md5']}")
                        for entry, key in (("voc2007", "2007"), ("voc2007", "2007-test"), ("voc2012", "2012"))}


@pytest.mark.parametrize("dataset", ["voc2007", "voc2012"])
def test_the_pinned_caption_checksums_are_the_authors_files(shared_data, dataset):
    pieces = [piece for piece in registry.get(dataset).downloads if piece.place == "captions"]
    assert [piece.into for piece in pieces] == ["captions.json", "re_captions.json"]
    for piece in pieces:
        assert "/825d9d9bf0b87311ccaa9e4da0d0645cd3575642/caption/" in piece.url
        algorithm, expected = downloads.parse_checksum(piece.checksum)
        assert downloads.file_checksum(shared_data / dataset / piece.into, algorithm) == expected


def test_the_paper_dictionaries_are_pinned():
    paper = registry.SYNONYM_DIR / "paper"
    assert sorted(p.name for p in paper.glob("*.json")) == sorted(registry.PAPER_SYNONYMS_SHA256)
    for name, expected in registry.PAPER_SYNONYMS_SHA256.items():
        assert downloads.file_checksum(paper / name, "sha256") == expected, name


def test_every_piece_of_the_registry_is_an_official_file_with_a_checksum():
    for entry in registry.REGISTRY.values():
        for piece in entry.downloads:
            algorithm, expected = downloads.parse_checksum(piece.checksum)
            assert len(expected) == {"md5": 32, "sha256": 64}[algorithm], piece
            assert piece.place in ("data_root", "captions") and piece.present
        assert bool(entry.downloads) != bool(entry.download_note or entry.build_command or entry.own_photos), entry.name


def test_a_dataset_without_a_download_is_one_line(tmp_path, capsys):
    import train

    assert registry.main(["download", "nus", "--data-folder", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'nuswide'}: no official download of its images: put Flickr/, ImageList/, "
                   "Groundtruth/TrainTestLabels/ and Concepts81.txt here yourself (or elsewhere, and pass "
                   "--data-root=DIR)\n")
    assert train.main(["--dataset=nus", "--download", f"--data-folder={tmp_path}", f"--out={tmp_path / 'run'}",
                       "--device=cpu"]) == 2
    assert capsys.readouterr().err == err and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# The two command lines, each in its own process, the registry pointed at the loopback
# --------------------------------------------------------------------------------------------

def with_served_pieces(pieces: tuple[registry.Download, ...], command: str) -> str:
    """`python -c` code: voc2007's pieces replaced by `pieces` in the registry, then `command`."""
    return ("import dataclasses, sys\nimport registry\nfrom registry import Download\n"
            f"registry.REGISTRY['voc2007'] = dataclasses.replace(registry.REGISTRY['voc2007'], downloads={pieces!r})\n"
            f"{command}\n")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_registry_py_download_fetches_what_is_missing(server, voc_files, tmp_path):
    pieces = served_pieces(server, registry.get("voc2007"), voc_files)
    folder = tmp_path / "data_folder"
    argv = ["download", "voc07", "--data-folder", str(folder)]
    done = run_python(with_served_pieces(pieces, f"sys.exit(registry.main({argv!r}))"), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    root = folder / "voc2007"
    assert done.stdout.splitlines() == [
        f"fetched {server.url}/VOCtrainval_06-Nov-2007.tar (md5 checked), unpacked into "
        f"{root / 'VOCtrainval_06-Nov-2007'}",
        f"fetched {server.url}/VOCtest_06-Nov-2007.tar (md5 checked), unpacked into {root / 'VOCtest_06-Nov-2007'}",
        f"fetched {server.url}/voc2007_captions.json (sha256 checked) as {root / 'captions.json'}",
        f"fetched {server.url}/voc2007_re_captions.json (sha256 checked) as {root / 're_captions.json'}"]
    assert len(registry.load("voc2007", root, "test")) == 3 and leftovers(tmp_path) == []
    # a damaged caption file: one error line, nothing kept of it, the rest in place untouched
    (root / "re_captions.json").unlink()
    damaged = served_pieces(server, registry.get("voc2007"), voc_files, wrong="voc2007_re_captions.json")
    done = run_python(with_served_pieces(damaged, f"sys.exit(registry.main({argv!r}))"), tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith(f"error: {root / 're_captions.json'}: sha256 differs from the official one")
    assert done.stdout.count("in place: ") == 3 and not (root / "re_captions.json").exists()
    assert leftovers(tmp_path) == []


def test_train_download_fetches_before_the_missing_pieces_check(server, voc_files, tmp_path):
    """`train.py --dataset voc07 --download` puts the pieces where the run reads them and gets
    past the missing-pieces check: it stops at the next check, a run folder that is not empty."""
    pieces = served_pieces(server, registry.get("voc2007"), voc_files)
    (tmp_path / "weights.safetensors").write_bytes(b"")      # present: the check looks no further
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    argv = ["--dataset", "voc07", "--download", f"--data-folder={tmp_path / 'data_folder'}",
            f"--clip-weights={tmp_path / 'weights.safetensors'}", "--out=run", "--device=cpu"]
    done = run_python(with_served_pieces(pieces, f"import train\nsys.exit(train.main({argv!r}))"), tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'run'}: run folder is not empty: --resume continues the run there, "
                      "--overwrite replaces it"]
    assert [line.split(" ")[0] for line in done.stdout.splitlines()] == ["fetched"] * 4
    root = tmp_path / "data_folder" / "voc2007"
    assert data.voc_root(root, 2007, "trainval") == root / "VOCtrainval_06-Nov-2007" / "VOCdevkit" / "VOC2007"
    assert (root / "captions.json").read_bytes() == voc_files["voc2007_captions.json"]
