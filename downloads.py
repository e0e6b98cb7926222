"""Fetch, check, resume and unpack the official files of a dataset (the registry in registry.py
names each one with its checksum and its place).

  fetch(url, dest, "md5:HEX")   streams into dest.part, resumes a broken transfer with a Range
                                request, and renames to dest only once the checksum matches
  unpack(archive, into)         a .tar or .zip, every member checked before any is written,
                                unpacked in a hidden staging folder and renamed into place

Each failure is one line naming the file (or URL) and what is kept: a damaged download is
deleted and nothing is unpacked; a network failure or a full disk keeps the bytes so far for
the next run to resume; a file or folder that is already there and is not what this module
would write is never replaced.

Stdlib urllib, not torchvision's `download_url`: that one restarts a broken transfer from byte
zero (VOC's trainval tar is 450 MB, COCO's train2014.zip 13 GB) and extracts tars without a
member filter (a `../` or a link in an archive would write outside the folder).

The data layer: this file imports data.py at most, never the model.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import shutil
import ssl
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from data import DataError, shown_path

TIMEOUT_S = 60                  # a socket that stays silent this long is a failed transfer, resumed next run
CHUNK_BYTES = 1 << 20
ALGORITHMS = ("md5", "sha256")
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}   # EFBIG: a file-size limit (`ulimit -f`) reads the same
# What a transfer that stopped half way raises: the reason goes into the one line, the bytes stay.
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError)


def part_path(dest: Path) -> Path:
    """Where a download streams until its checksum matches: beside dest, so the rename stays on one disk."""
    return dest.with_name(dest.name + ".part")


def parse_checksum(checksum: str) -> tuple[str, str]:
    algorithm, _, expected = checksum.partition(":")
    if algorithm not in ALGORITHMS or not expected:
        raise ValueError(f"checksum {checksum!r}: expected md5:HEX or sha256:HEX")
    return algorithm, expected.lower()


def hash_file(path: Path, digest) -> int:
    """Feed `path` into `digest`; its size in bytes."""
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
            size += len(block)
    return size


def file_checksum(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    hash_file(path, digest)
    return digest.hexdigest()


def fetch(url: str, dest: str | os.PathLike, checksum: str, timeout: float = TIMEOUT_S) -> bool:
    """Download `url` to `dest` and check it against `checksum` ("md5:HEX" or "sha256:HEX");
    True when it was downloaded, False when `dest` was there already with that checksum. A
    dest with another checksum is refused, never replaced: this command did not write it."""
    dest = Path(dest)
    algorithm, expected = parse_checksum(checksum)
    if dest.exists():
        got = file_checksum(dest, algorithm)
        if got == expected:
            return False
        raise DataError(dest, f"is there already and its {algorithm} differs from the official one (got {got}, "
                              f"expected {expected}): it was left as it is; move it away to download it again")
    part = part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.new(algorithm)
    have = hash_file(part, digest) if part.exists() else 0     # a resumed part: its bytes count in the checksum
    try:
        digest = transfer(url, part, have, digest, timeout)
    except NETWORK_ERRORS as e:
        raise DataError(url, f"download failed ({network_reason(e)}); {kept_words(part)}") from None
    except KeyboardInterrupt:         # the command's `stopped:` line follows; this one says what is kept
        print(f"{url}: {kept_words(part)}", file=sys.stderr)
        raise
    got = digest.hexdigest()
    if got != expected:
        part.unlink()
        raise DataError(dest, f"{algorithm} differs from the official one (got {got}, expected {expected}): the "
                              "download is damaged or not the official file; it was deleted, nothing was unpacked")
    os.replace(part, dest)
    return True


def kept_words(part: Path) -> str:
    kept = part.stat().st_size if part.exists() else 0
    if not kept:
        return "nothing was received; the next run tries again"
    return f"the {kept:,} bytes so far are kept in {shown_path(part)} and the next run resumes from there"


def network_reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    if isinstance(e, http.client.IncompleteRead):
        return "the connection closed before the end of the file"
    if isinstance(e, TimeoutError):
        return "no data for too long (timed out)"
    return str(e) or type(e).__name__


def transfer(url: str, part: Path, have: int, digest, timeout: float):
    """Stream `url` onto `part` (which holds `have` bytes, already in `digest`): asks for the rest
    with a Range request; a 206 appends, a 200 (a server that ignores Range) starts over, a 416
    means the part holds the whole file. Returns the digest of the whole part."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        reply = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            return digest
        raise
    with reply:
        if have and reply.status == 206 and resumed_at(reply) != have:   # a server that sent other bytes: afresh
            reply.close()
            return transfer(url, part, 0, hashlib.new(digest.name), timeout)
        if have and reply.status != 206:
            digest, have = hashlib.new(digest.name), 0
        length = reply.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        received = stream(reply, part, have, total, digest)
    if total is not None and received < total:
        # http.client ends a read quietly when the connection closes early (Python keeps that for
        # compatibility), so a cut transfer would look complete and fail its checksum: say it here.
        raise ConnectionError(f"the connection closed after {received:,} of {total:,} bytes")
    return digest


def resumed_at(reply) -> int | None:
    """The first byte of a 206 reply (its Content-Range: `bytes START-END/TOTAL`)."""
    unit, _, span = (reply.headers.get("Content-Range") or "").partition(" ")
    start = span.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def stream(reply, part: Path, have: int, total: int | None, digest) -> int:
    """Append the reply's body to `part` (rewritten from byte 0 when `have` is 0), hashing it; the
    part's size after. The part is opened at the first byte that arrives, so a reply that brings
    none (a timeout, a cut) leaves it as it was."""
    with contextlib.ExitStack() as files, \
            tqdm(total=total, initial=have, desc=part.name.removesuffix(".part"), unit="B", unit_scale=True,
                 unit_divisor=1024, file=sys.stderr, mininterval=1) as bar:
        out = None
        while block := reply.read(CHUNK_BYTES):
            if out is None:
                out = files.enter_context(open(part, "ab" if have else "wb"))
            write_block(out, block, part)
            digest.update(block)
            have += len(block)
            bar.update(len(block))
        if out is None and not have:      # an empty file: its part is empty too
            part.write_bytes(b"")
    return have


def write_block(out, block: bytes, part: Path) -> None:
    try:
        out.write(block)
        out.flush()              # a full disk shows here, on this block, not at close
    except OSError as e:
        size = part.stat().st_size
        if e.errno in DISK_FULL:
            raise DataError(part, f"cannot be written: the disk is full ({e.strerror}); the {size:,} bytes so far "
                                  "are kept there and the next run resumes from them once there is room") from None
        raise DataError(part, f"cannot be written ({e.strerror or e}); the {size:,} bytes so far are kept") from None


# ============================================================================================
# Unpacking: every member checked first, then unpacked in a staging folder and renamed into place
# ============================================================================================

FILTER_WORDS = {   # tarfile's refusals, as the one line says them
    tarfile.AbsolutePathError: "has an absolute path",
    tarfile.OutsideDestinationError: "leads outside the folder it unpacks into",
    tarfile.SpecialFileError: "is a device or another special file",
    tarfile.AbsoluteLinkError: "is a link to an absolute path",
    tarfile.LinkOutsideDestinationError: "is a link that leads outside the folder it unpacks into",
}


def staging_path(archive: Path, into: Path) -> Path:
    """The hidden folder an archive unpacks in, inside `into` so that the renames stay on one disk."""
    return into / f".{archive.name}.unpacking"


def unpack(archive: str | os.PathLike, into: str | os.PathLike) -> list[Path]:
    """Unpack a .tar or .zip into the folder `into` and delete the archive; the top-level paths
    it put there. Nothing is written unless every member stays inside `into` (no absolute path,
    no `..`, no link leading out, no device) and no top-level path of the archive exists there
    already: either is one line naming the archive (or the path)."""
    archive, into = Path(archive), Path(into)
    staging = staging_path(archive, into)
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                names = [checked_name(archive, info.filename) for info in zf.infolist()]
                tops = top_level(archive, names, into)
                extract_in(staging, archive, lambda: [zf.extract(info, staging) for info in
                                                      tqdm(zf.infolist(), **member_bar(archive))])
        else:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for member in members:
                    checked_tar_member(archive, member, into)
                tops = top_level(archive, [m.name for m in members], into)
                extract_in(staging, archive, lambda: tf.extractall(staging, tqdm(members, **member_bar(archive)),
                                                                    filter="data"))
    except (tarfile.ReadError, tarfile.CompressionError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(archive, f"not a readable {archive.suffix.lstrip('.') or 'tar'} archive ({e}): nothing "
                                 "was unpacked") from None
    for name in tops:                 # one rename per top-level path: a stop leaves it whole or absent
        os.rename(staging / name, into / name)
    shutil.rmtree(staging)
    archive.unlink()
    return [into / name for name in tops]


def member_bar(archive: Path) -> dict:
    return {"desc": f"unpacking {archive.name}", "unit": "file", "file": sys.stderr, "mininterval": 1}


def checked_tar_member(archive: Path, member: tarfile.TarInfo, into: Path) -> None:
    """A tar member's path (checked_name), then tarfile's data filter: links that lead out, devices."""
    checked_name(archive, member.name)
    try:
        tarfile.data_filter(member, str(staging_path(archive, into)))
    except tarfile.FilterError as e:
        words = next((w for kind, w in FILTER_WORDS.items() if isinstance(e, kind)), str(e))
        raise DataError(archive, f"member {member.name!r} {words}: refused, nothing was unpacked") from None


def checked_name(archive: Path, name: str) -> str:
    """A member's path, '/'-separated, or one line refusing it: an absolute one (tarfile's filter
    would only strip the '/', and a zip's reader too: a path that says it goes elsewhere is not
    trusted), or a `..` that climbs out."""
    entry = name.replace("\\", "/")
    if PureWindowsPath(entry).anchor or entry.startswith("/"):
        problem = "has an absolute path"
    elif os.path.normpath(entry).split("/")[0] == "..":
        problem = "leads outside the folder it unpacks into"
    else:
        return entry
    raise DataError(archive, f"member {name!r} {problem}: refused, nothing was unpacked")


def top_level(archive: Path, names: list[str], into: Path) -> list[str]:
    """The archive's top-level paths (in order); one already in `into` is refused: it was not
    written by this unpack, so it is never replaced."""
    tops = list(dict.fromkeys(p.parts[0] for p in map(PurePosixPath, names) if p.parts and p.parts[0] != "."))
    for name in tops:
        if os.path.lexists(into / name):
            raise DataError(into / name, f"is there already: unpacking {archive.name} would replace it; nothing "
                                         "was unpacked (move it away, or pass another folder)")
    if not tops:
        raise DataError(archive, "holds no file: nothing to unpack")
    return tops


def extract_in(staging: Path, archive: Path, extract) -> None:
    """Run `extract` into a fresh `staging` folder; on any failure (Ctrl-C included) the folder
    goes, with the folder above it when this made it, and the archive stays for the next run."""
    if staging.exists():              # a stopped earlier unpack of this archive: its own leftovers
        shutil.rmtree(staging)
    made = next((p for p in reversed([staging.parent, *staging.parent.parents]) if not p.exists()), None)
    done = False
    try:
        staging.mkdir(parents=True)
        extract()
        done = True
    except tarfile.FilterError as e:  # a member that leads out only once an earlier link is on disk
        raise DataError(archive, f"refused while unpacking ({e}): nothing was unpacked") from None
    except OSError as e:
        full = "the disk is full" if e.errno in DISK_FULL else (e.strerror or str(e))
        raise DataError(archive, f"cannot be unpacked into {shown_path(staging.parent)} ({full}): nothing was "
                                 "unpacked, the archive is kept and the next run unpacks it again") from None
    finally:
        if not done:
            shutil.rmtree(made or staging, ignore_errors=True)
