"""Feature cache: the frozen encoder runs once per image, its outputs stored in safetensors shards,
the patch tokens in bf16 or compact (8 bits and a scale per token, `--cache-format=int8`).

Built on the data layer (`data.py`), which never imports this module; nothing here imports the
model (the encoder is handed in).
"""
from __future__ import annotations

import json
import os
import re
import stat
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data import DataError, SkipReport, atomic_write, image_batches, read_json, write_json

_HASHES: dict[tuple, str] = {}
# Shards this process has checked, by (path, inode, size, mtime, what they had to be): eval.py
# and the ablation open one cache several times, and a shard unchanged since is not read again.
_CHECKED: set[tuple] = set()
# A file changed within a clock tick of its check keeps its mtime (coarse file-system clocks):
# only shards older than this when checked are remembered (git's rule for "racily clean" files).
RACY_NS = 2 * 10**9
CHECK_THREADS = min(8, os.cpu_count() or 1)
SHARD_NAME = re.compile(r"part\d{3,}-shard-\d{5,}\.safetensors")

# How the patch tokens are stored (`--cache-format`); the global read-outs (g, g^H, g^Hc) and the
# [cls] attention are bf16 except in fp32. Measured (docs/research.md, "The feature cache's format"):
# int8 halves an image's bytes at a token cosine error of ~2e-5; on the proving ground's four seeds
# it moved BAC-GCN's mAP from bf16's by -0.20 to +0.07 (mean -0.05), about as far from the fp32
# features on average as bf16 is, but not within the 0.05 of bf16 per seed that a default needed:
# bf16 stays the default. fp8 e4m3 with the same scale per token lost on the tokens (~14x int8's error).
FORMATS = {
    "int8": "patch tokens in int8 with an fp32 scale per token (its largest magnitude / 127): half the bytes",
    "bf16": "every field in bf16 (the format before the compact one; its caches keep their key)",
    "fp32": "every field as the encoder gave it: the reference the others are measured against, twice bf16's bytes",
}
COMPACT_FIELDS = ("patches",)           # the fields that int8 stores in 8 bits
SCALE = "_scale"                        # the per-token scale of a compact field is stored as <field>_scale
# safetensors' dtype names of what a shard may hold, and their torch types
DTYPES = {"BF16": "bfloat16", "I8": "int8", "F32": "float32"}


def quantize_tokens(x):
    """x [..., D] -> (int8 [..., D], fp32 scale [...]): x ~ q * scale, per token, symmetric."""
    import torch

    x = x.float()
    scale = x.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale


def decode(stored: dict, dtype) -> dict:
    """Stored rows (as `CachedFeatures.gather_stored` returns them, on any device) -> features in
    `dtype`: a compact field times its per-token scale (in fp32, then `dtype`), the others cast."""
    out = {}
    for k, v in stored.items():
        if k.endswith(SCALE) and k[:-len(SCALE)] in stored:
            continue
        if k + SCALE in stored:
            v = v.float().mul_(stored[k + SCALE].float()[..., None])
        out[k] = v.to(dtype)
    return out


def _stat_key(path: Path, wanted: dict) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(path, "feature cache shard missing") from None
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns, tuple(sorted(wanted.items()))


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (memoised by path, size and mtime): weights identify a cache by content."""
    import hashlib

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def folder_bytes(folder: str | os.PathLike) -> int:
    """The bytes of the regular files under `folder` (0 when there is none); links not followed."""
    total = 0
    for base, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(base, name))
            except OSError:
                continue
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


class FeatureCache:
    """Per-image encoder outputs stored in safetensors shards under a key, in `FORMATS[fmt]`.

    The key hashes everything that changes the features (`spec`: encoder, weights digest, input
    size, read-out, dataset, split, image ids and file stamps), so a changed config or a changed
    image file never reads a stale cache. A folder is complete once its `meta.json` exists
    (written last, atomically); `problem()` tells a damaged one (shard missing or truncated,
    ids that do not match the rows). The build can be split into parts (one per process of a
    distributed job), each writing its own shards, and `merge` lists them in part order. This
    module never imports the model: `encode` is handed in.
    """

    SHARD = 4096
    # A shard is buffered in memory before it is written: capped by bytes too, or one shard of
    # ViT-B/16 at 448 px (800 KB a row) would hold 3.2 GB, twice over while concatenated.
    SHARD_BYTES = 256 * 2**20
    # 2: every shard carries its cache key, the digest of its image ids and of its bytes. Part
    # of the key, so that a cache of format 1 (which carries none) is a miss, not a cache to trust.
    FORMAT = 2

    def __init__(self, root: str | os.PathLike, spec: dict, shard_rows: int = SHARD, fmt: str = "bf16"):
        import hashlib

        if fmt not in FORMATS:
            raise ValueError(f"unknown feature cache format {fmt!r}; formats: {', '.join(FORMATS)}")
        self.spec, self.fmt = spec, fmt
        # bf16 adds nothing to the key, so that the caches written before the compact format stay hits
        keyed = json.dumps({**spec, "cache_format": self.FORMAT, **({"tokens": fmt} if fmt != "bf16" else {})},
                           sort_keys=True)
        self.key = hashlib.sha256(keyed.encode()).hexdigest()[:20]
        self.dir = Path(root) / self.key
        self.shard_rows = shard_rows

    @property
    def complete(self) -> bool:
        return (self.dir / "meta.json").is_file()

    def _meta(self) -> dict:
        return read_json(self.dir / "meta.json", "feature cache index")

    def problem(self) -> str | None:
        """Why this complete cache cannot be read (one line naming the first failing file), or
        None when it is sound: every shard is there, whole, of this key, holds the rows of the
        image ids meta.json gives it, and its bytes hash to the digest written with it."""
        try:
            failing = self.failing_shards()
        except DataError as e:
            return str(e)
        return f"{self.dir / failing[0][0]}: {failing[0][1]}" if failing else None

    def failing_shards(self) -> list[tuple[str, str]]:
        """[(shard name, why)] of the shards that fail their check, reading every byte once
        (the cost: README, "Feature cache"). A DataError when the index itself is unsound
        (meta.json unreadable or inconsistent), which no single shard explains."""
        meta = self._meta()
        lists = [meta.get(k) for k in ("shards", "rows", "digests")]
        if not isinstance(meta.get("ids"), list) or not all(isinstance(x, list) for x in lists) or \
                len({len(x) for x in lists}) != 1 or not all(type(r) is int and r >= 0 for r in lists[1]) or \
                not all(isinstance(i, str) for i in meta["ids"]) or not all(isinstance(d, str) for d in lists[2]):
            raise DataError(self.dir / "meta.json", "lacks its ids, shards, rows or digests")
        for name in lists[0]:     # read, and rewritten by rebuild_shards: a name, never a path out of the folder
            if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
                raise DataError(self.dir / "meta.json", f"names a shard {name!r} that is not a shard file of "
                                                        "this folder")
        if sum(meta["rows"]) != len(meta["ids"]):
            raise DataError(self.dir / "meta.json", f"lists {len(meta['ids'])} ids and {sum(meta['rows'])} rows")
        from concurrent.futures import ThreadPoolExecutor

        started, starts = time.time_ns(), np.cumsum([0] + meta["rows"])
        shards = [(name, rows, {"cache_key": self.key, "ids_sha256": ids_digest(meta["ids"][a:a + rows]),
                                "sha256": digest}) for name, rows, digest, a in zip(*lists, starts.tolist())]

        def check(shard: tuple) -> tuple[str | None, tuple | None]:
            name, rows, wanted = shard
            try:
                seen = _stat_key(self.dir / name, wanted)
                if seen in _CHECKED:
                    return None, None
                found, fields, header = _shard_layout(self.dir / name)
                if found != rows:
                    return f"holds {found} rows, meta.json gives it {rows}", seen
                return shard_problem(self.dir / name, rows, fields, header, wanted), seen
            except DataError as e:
                return e.problem, None

        # Shards are hashed side by side: hashlib and file reads let go of the GIL, so the check
        # runs at the cores' or the disk's pace rather than one core's (~1 GB/s of sha256).
        with ThreadPoolExecutor(max_workers=max(1, min(CHECK_THREADS, len(shards)))) as pool:
            results = list(pool.map(check, shards))
        failing = []
        for (name, _, _), (why, seen) in zip(shards, results):
            if why is not None:
                failing.append((name, why))
            elif seen is not None and seen[3] < started - RACY_NS:
                _CHECKED.add(seen)
        if not failing:
            CachedFeatures.from_shards(self.dir, meta["ids"], meta["shards"])    # the shards agree on their fields
        return failing

    def open(self, memory_budget_bytes: float = float("inf"), device: str = "cpu") -> "CachedFeatures":
        """The cached rows: loaded once onto `device` when they fit `memory_budget_bytes`, else streamed."""
        meta = self._meta()
        features = CachedFeatures.from_shards(self.dir, meta["ids"], meta["shards"])
        if features.nbytes <= memory_budget_bytes:
            return features.in_memory(device)
        fix_malloc_threshold()
        return features

    def open_within(self, memory_gb: float, device: str) -> tuple["CachedFeatures", str]:
        """`open` under the budget of `memory_budget(memory_gb, device)`, and the line that says
        where the rows are and why."""
        budget, why = memory_budget(memory_gb, device)
        features = self.open(budget, device)
        return features, where_features_are(features, why, device, budget)

    def build(self, dataset, encode: Callable, batch_size: int = 64, workers: int = 0, device: str = "cpu",
              desc: str = "caching features", pin_memory: bool = False, part: int = 0, parts: int = 1) -> None:
        """Encode every image of `dataset` with `encode` (see `encode_images`) into shards.
        Skipped images are reported and left out. With `parts` > 1 this writes part `part` only
        (its dataset is that part's images); `merge` completes the cache once all parts exist."""
        import torch

        self.dir.mkdir(parents=True, exist_ok=True)
        ids: list[str] = []
        buffer: dict[str, list] = {}
        shards: list[str] = []
        digests: list[str] = []
        shard_ids: list[str] = []
        rows_of: list[int] = []

        def flush():
            if not buffer:
                return
            name = f"part{part:03d}-shard-{len(shards):05d}.safetensors"
            digests.append(self.write_shard(name, {k: torch.cat(v) for k, v in buffer.items()}, shard_ids))
            shards.append(name)
            rows_of.append(len(shard_ids))
            buffer.clear()
            shard_ids.clear()

        for batch_ids, _, out in encode_images(dataset, encode, batch_size, workers, device, desc, pin_memory):
            keep_rows(buffer, out, self.fmt)
            ids.extend(batch_ids)
            shard_ids.extend(batch_ids)
            rows = sum(len(x) for x in next(iter(buffer.values())))
            if rows >= self.shard_rows or rows * sum(v[0][0].nbytes for v in buffer.values()) >= self.SHARD_BYTES:
                flush()
        flush()
        write_json(self.dir / f"part{part:03d}.json",
                   {"ids": ids, "shards": shards, "rows": rows_of, "digests": digests}, indent=None)
        if parts == 1:
            self.merge(1)

    def write_shard(self, name: str, tensors: dict, ids: Sequence[str]) -> str:
        """One shard, atomically, with its identity in the safetensors header: this cache's
        key, the digest of the ids of its rows, and the digest of its bytes (returned)."""
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in tensors.items()}
        digest = tensors_digest(tensors)
        _unlink_link(self.dir / name)
        header = {"cache_key": self.key, "ids_sha256": ids_digest(ids), "sha256": digest}
        atomic_write(self.dir / name, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        return digest

    def rebuild_shards(self, dataset, encode: Callable, names: Sequence[str], batch_size: int = 64,
                       workers: int = 0, device: str = "cpu") -> bool:
        """Encode again the images of the shards `names` (those failing_shards named) and write
        each shard anew, from the ids meta.json gives it; the rest of the cache stays. False
        (nothing written) when those images no longer give those rows (an image gone or now
        unreadable): the whole cache must be built again."""
        import torch

        meta = self._meta()
        where = {image_id: k for k, image_id in enumerate(getattr(dataset, "ids", []))}
        starts = np.cumsum([0] + meta["rows"])
        new = {}
        for name in names:
            s = meta["shards"].index(name)
            wanted = meta["ids"][starts[s]:starts[s + 1]]
            if any(i not in where for i in wanted):
                return False
            got, fields = [], {}
            subset = torch.utils.data.Subset(dataset, [where[i] for i in wanted])
            for batch_ids, _, out in encode_images(subset, encode, batch_size, workers, device, f"re-encoding {name}"):
                got += batch_ids
                keep_rows(fields, out, self.fmt)
            if got != wanted:
                return False
            new[s] = ({k: torch.cat(v) for k, v in fields.items()}, wanted)
        digests = list(meta["digests"])
        for s, (tensors, wanted) in new.items():
            digests[s] = self.write_shard(meta["shards"][s], tensors, wanted)
        _unlink_link(self.dir / "meta.json")
        write_json(self.dir / "meta.json", {**meta, "digests": digests}, indent=None)
        return True

    def merge(self, parts: int) -> None:
        """Write meta.json over the parts 0..parts-1, in part order: the cache is then complete."""
        index = {"ids": [], "shards": [], "rows": [], "digests": []}
        for part in range(parts):
            piece = read_json(self.dir / f"part{part:03d}.json", "feature cache part")
            for k in index:
                index[k] += piece[k]
        write_json(self.dir / "meta.json", {**index, "spec": self.spec}, indent=None)


def as_stored(out: dict, fmt: str) -> dict:
    """Encoder outputs as a cache of format `fmt` stores them, where they are (`decode` reverses it)."""
    import torch

    stored = {}
    for k, v in out.items():
        if fmt == "int8" and k in COMPACT_FIELDS:
            stored[k], stored[k + SCALE] = quantize_tokens(v.detach())
        else:
            stored[k] = v.detach().to(torch.float32 if fmt == "fp32" else torch.bfloat16)
    return stored


def keep_rows(fields: dict[str, list], out: dict, fmt: str = "bf16") -> None:
    """A batch's encoder outputs appended to `fields`, as a shard of format `fmt` stores them, on the
    CPU (quantised where they were computed: the copy to the host moves the compact bytes)."""
    for k, v in as_stored(out, fmt).items():
        fields.setdefault(k, []).append(v.cpu())


def _unlink_link(path: Path) -> None:
    """A link where the cache writes is removed first: atomic_write follows a link to a file
    (right for a user's output), and a damaged cache's link must not lead a write out of it."""
    if path.is_symlink():
        path.unlink()


def ids_digest(ids: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(ids).encode("utf-8", "surrogateescape")).hexdigest()


def tensors_digest(tensors: dict) -> str:
    """sha256 over the fields' raw bytes in name order: what shard_problem recomputes from the file."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensors[name].contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def shard_problem(path: Path, rows: int, fields: dict, header: dict, expected: dict) -> str | None:
    """Why one shard is not what meta.json says it is (one phrase), or None: its header's
    identity, then its bytes, read in 8 MiB blocks in the digest's order (name order)."""
    import hashlib

    if header.get("cache_key") != expected["cache_key"]:
        return f"belongs to another cache (key {header.get('cache_key')!r}, this cache is {expected['cache_key']!r})"
    if header.get("ids_sha256") != expected["ids_sha256"]:
        return "holds the rows of other images than meta.json lists at its place"
    if header.get("sha256") != expected["sha256"]:
        return "is not the shard meta.json recorded (its digest differs)"
    h, block = hashlib.sha256(), 8 << 20
    with open(path, "rb", buffering=0) as f:
        for name in sorted(fields):
            _, offset, row_bytes, _ = fields[name]
            f.seek(offset)
            left = rows * row_bytes
            while left > 0:
                chunk = f.read(min(block, left))
                if not chunk:
                    return f"truncated in field {name!r}"
                h.update(chunk)
                left -= len(chunk)
    if h.hexdigest() != expected["sha256"]:
        return "its bytes changed since it was written (sha256 differs)"
    return None


def fix_malloc_threshold(threshold: int = 1 << 16) -> None:
    """Stream without the heap creeping up. glibc raises its mmap threshold each time a large
    block is freed, so after the first batch every batch buffer (0.1-10 MB) comes from the heap,
    whose fragments the process keeps: measured, peak memory then grew with the number of
    batches (+85 MB from a 4x larger cache), and with the threshold fixed it did not (-13 MB).
    A no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3         # mallopt's parameter number, from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_mmap_threshold, threshold)
    except (OSError, AttributeError):
        pass


# Under --cache-memory-gb=-1, the share of the memory free when a split's cache opens that it may
# take: on a GPU the head's working set is small next to it; on the CPU the page cache, the
# loader and the other splits need the RAM too.
RESIDENT_SHARE = {"cuda": 0.75, "cpu": 0.5}


def memory_budget(memory_gb: float, device: str) -> tuple[float, str]:
    """(bytes a split's cache may take on `device`, the words saying where that figure comes from):
    `memory_gb` GiB (--cache-memory-gb), or with -1 a share of what `device` has free now."""
    import torch

    from cli import size_words

    if memory_gb >= 0:
        return memory_gb * 2**30, f"--cache-memory-gb={memory_gb:g}"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind == "cuda":
        free, what = torch.cuda.mem_get_info(torch.device(device))[0], "GPU memory free"
    else:
        free, what = available_ram(), "RAM available"
    share = RESIDENT_SHARE[kind]
    return share * free, f"{size_words(int(share * free))} ({share:.0%} of the {size_words(free)} of {what})"


def available_ram() -> int:
    """The bytes of RAM the kernel says it can give without swapping (MemAvailable), else all free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


PREFETCH_DEPTH = 2          # batches of a streamed cache read ahead of the one being computed


def where_features_are(feats: "CachedFeatures", why: str, device: str, budget: float) -> str:
    """One line: the cache's size and format, and whether it is held on the device or streamed."""
    from cli import size_words

    size = f"features {size_words(feats.nbytes)} ({feats.format} patch tokens)"
    if feats.tensors is not None:
        place = "the CPU (in memory)" if feats.device == "cpu" else f"the GPU ({feats.device})"
        return f"{size} held on {place}, within the budget of {why}"
    staging = "pinned buffers, " if device.startswith("cuda") else ""
    line = f"{size} streamed from disk ({staging}{PREFETCH_DEPTH} batches read ahead), over the budget of {why}"
    compact = len(feats) * feats.row_bytes_as("int8")
    if not feats.compact and compact <= budget:
        line += f"; --cache-format=int8 would take {size_words(compact)} and be held"
    return line


class CachedFeatures:
    """The rows of a feature cache: `gather(rows)` returns {name: tensor [len(rows), ...]} in the
    order asked, compact fields decoded to fp32 and the others bf16; `gather_stored(rows)` returns
    them as stored (a compact field with its scale), which is what crosses to the device.

    Streamed (the default of `from_shards`), rows are read on demand with positioned reads
    into the batch's own tensors: resident memory is what a batch needs, whatever the cache's
    size (file pages live on in the OS page cache, which the kernel reclaims under pressure and
    which is not this process's memory). `in_memory(device)` reads every row once into one tensor
    per field on that device (no second copy, unlike concatenating loaded shards).
    """

    # Rows staged per copy when a cache is loaded onto a GPU: the host holds this much at a time.
    LOAD_BYTES = 256 * 2**20

    def __init__(self, ids: list[str], shards: list[tuple[Path, int, dict]], tensors: dict | None = None):
        import torch

        self.ids = list(ids)
        self._shards = shards                    # (path, rows, {name: (row shape, file offset, row bytes, dtype)})
        self._starts = np.cumsum([0] + [rows for _, rows, _ in shards])
        self._fds: dict[int, int] = {}
        self.tensors = tensors
        self._held_on = "cpu"
        if shards:
            stored = {k: (v[0], getattr(torch, DTYPES[v[3]])) for k, v in shards[0][2].items()}
        else:
            stored = {k: (tuple(v.shape[1:]), v.dtype) for k, v in (tensors or {}).items()}
        self.stored_shapes = {k: shape for k, (shape, _) in stored.items()}
        self.stored_dtypes = {k: dtype for k, (_, dtype) in stored.items()}
        self.row_shapes = {k: v for k, v in self.stored_shapes.items()
                           if not (k.endswith(SCALE) and k[:-len(SCALE)] in stored)}

    @classmethod
    def from_shards(cls, directory: Path, ids: Sequence[str], names: Sequence[str]) -> "CachedFeatures":
        shards = [(Path(directory) / n, *_shard_layout(Path(directory) / n)[:2]) for n in names]
        rows = sum(r for _, r, _ in shards)
        if rows != len(ids):
            raise DataError(Path(directory) / "meta.json", f"lists {len(ids)} ids, the shards hold {rows} rows")
        layouts = {tuple(sorted((k, v[0], v[3]) for k, v in f.items())) for _, _, f in shards}
        if len(layouts) > 1:
            raise DataError(directory, "shards hold different fields, shapes or types")
        for k, (shape, _, _, dtype) in (shards[0][2].items() if shards else ()):
            if k.endswith(SCALE) and k[:-len(SCALE)] in shards[0][2]:
                token_shape, _, _, token_dtype = shards[0][2][k[:-len(SCALE)]]
                if (dtype, token_dtype, shape) != ("F32", "I8", token_shape[:-1]):
                    raise DataError(shards[0][0], f"field {k!r} is no fp32 scale per token of an int8 field "
                                                  f"{k[:-len(SCALE)]!r}")
        return cls(ids, shards)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def keys(self) -> list[str]:
        return list(self.row_shapes)

    @property
    def compact(self) -> bool:
        return any(k.endswith(SCALE) for k in self.stored_shapes)

    @property
    def format(self) -> str:
        """The FORMATS name of how the patch tokens are stored."""
        import torch

        if self.compact:
            return "int8"
        return "fp32" if self.stored_dtypes.get("patches") == torch.float32 else "bf16"

    def stored_keys(self, keys: Sequence[str]) -> list[str]:
        """The stored fields that hold `keys`: a compact field's scale beside it."""
        return [s for k in keys for s in (k, k + SCALE) if s in self.stored_shapes]

    @property
    def row_bytes(self) -> int:
        return sum(self.stored_dtypes[k].itemsize * int(np.prod(s)) for k, s in self.stored_shapes.items())

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def row_bytes_as(self, fmt: str) -> int:
        """What a row of these fields takes in a cache of format `fmt`."""
        import torch

        row = {k: torch.zeros((1, *s)) for k, s in self.row_shapes.items()}
        return sum(v.nbytes for v in as_stored(row, fmt).values())

    @property
    def device(self) -> str:
        """Where the rows are: "disk" when streamed, else the device that holds them."""
        if self.tensors is None:
            return "disk"
        return str(next(iter(self.tensors.values())).device) if self.tensors else self._held_on

    def in_memory(self, device: str = "cpu") -> "CachedFeatures":
        import torch

        self._held_on = str(device)         # where an empty cache's (no) rows are
        if self.tensors is None:
            keys = list(self.stored_shapes)
            if str(device) == "cpu":
                self.tensors = self._read(np.arange(len(self)), keys)
            else:       # staged through the host a slice at a time: the host never holds the whole cache
                tensors = {k: torch.empty((len(self), *self.stored_shapes[k]), dtype=self.stored_dtypes[k],
                                          device=device) for k in keys}
                step = max(1, self.LOAD_BYTES // max(self.row_bytes, 1))
                for start in range(0, len(self), step):
                    part = self._read(np.arange(start, min(start + step, len(self))), keys)
                    for k in keys:
                        tensors[k][start:start + len(part[k])].copy_(part[k])
                self.tensors = tensors
            self.close()
        return self

    def gather_stored(self, rows, keys: Sequence[str] | None = None, into: dict | None = None) -> dict:
        """The rows of `keys` as stored (see `decode`), where the cache is (the CPU when streamed);
        a streamed cache reads them into the front rows of `into`'s tensors where given."""
        import torch

        keys = self.stored_keys(keys or self.keys)
        if self.tensors is not None:
            index = torch.as_tensor(rows, dtype=torch.int64).to(self.device)
            return {k: self.tensors[k][index] for k in keys}
        return self._read(np.asarray(rows, dtype=np.int64).reshape(-1), keys, into)

    def gather(self, rows, keys: Sequence[str] | None = None) -> dict:
        import torch

        stored = self.gather_stored(rows, keys)
        return {k: decode({k: v, k + SCALE: stored[k + SCALE]}, torch.float32)[k] if k + SCALE in stored else v
                for k, v in stored.items() if k in self.row_shapes}

    def _read(self, rows: np.ndarray, keys: list[str], into: dict | None = None) -> dict:
        """Rows read straight into the output tensors with positioned reads (`os.preadv`, one per
        row and field, field by field in file order): the kernel copies from its page cache, so no
        file page is ever mapped into this process and resident memory stays what the batch needs.
        (Gathering from memory maps and releasing the touched pages after each batch bounded
        memory too, but every batch then paid a page fault per 4 KB: the streamed epoch ran at
        0.65x the in-memory speed, 0.80x this way: bench/cache_scale.py on a 3.9 GiB cache.)"""
        import torch

        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range [0, {len(self)})")
        out = {k: into[k][:len(rows)] if into is not None else
               torch.empty((len(rows), *self.stored_shapes[k]), dtype=self.stored_dtypes[k]) for k in keys}
        shards = np.searchsorted(self._starts, rows, side="right") - 1
        local = rows - self._starts[shards]
        order, shard_of = np.argsort(rows, kind="stable").tolist(), shards.tolist()
        fds = {s: self._fd(s) for s in set(shard_of)}
        for k in keys:      # field by field, rows in file order; offsets worked out for all rows at once
            view = out[k].view(torch.uint8).numpy().reshape(len(rows), -1)
            row_bytes = view.shape[1]
            offsets = (np.array([f[k][1] for _, _, f in self._shards])[shards] + local * row_bytes).tolist()
            for i in order:
                if _read_at(fds[shard_of[i]], view[i], offsets[i]) != row_bytes:
                    raise DataError(self._shards[shard_of[i]][0], f"shorter than its header says (row {local[i]} "
                                                                  f"of {k!r} is cut off)")
        return out

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(self._shards[shard][0], os.O_RDONLY)
        return self._fds[shard]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        self.close()


def _read_at(fd: int, buffer: np.ndarray, offset: int) -> int:
    """Fill `buffer` from file offset `offset`; the number of bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    chunk = os.pread(fd, buffer.nbytes, offset)          # platforms without preadv: one more copy
    buffer[:len(chunk)] = np.frombuffer(chunk, dtype=buffer.dtype)
    return len(chunk)


def _shard_layout(path: Path) -> tuple[int, dict, dict]:
    """(rows, {name: (row shape, file offset of row 0, bytes per row, dtype)}, the header's metadata)
    from a safetensors shard's header, checking that every tensor is of DTYPES, has the same row count and lies
    inside the file (a truncated shard fails here, by name)."""
    import struct

    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):   # a link or a FIFO in a cache folder is no shard this writer made
            raise DataError(path, "not a regular file (a feature cache shard is never a link, a FIFO or a device)")
        size = st.st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise DataError(path, "feature cache shard missing") from None
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise DataError(path, f"not a readable safetensors shard ({e})") from None
    fields, counts = {}, set()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape, (begin, end) = info["shape"], info["data_offsets"]
        if info["dtype"] not in DTYPES or not shape:
            raise DataError(path, f"field {name!r} is {info['dtype']} {shape}, expected rows of "
                                  f"{', '.join(DTYPES)}")
        if 8 + length + end > size:
            raise DataError(path, f"truncated: field {name!r} ends at byte {8 + length + end}, the file has {size}")
        counts.add(shape[0])
        fields[name] = (tuple(shape[1:]), 8 + length + begin, (end - begin) // max(shape[0], 1), info["dtype"])
    if len(counts) > 1:
        raise DataError(path, "fields hold different row counts")
    metadata = header.get("__metadata__")
    return (counts.pop() if counts else 0), fields, metadata if isinstance(metadata, dict) else {}


class Heartbeat:
    """Redraws a progress bar every STEP_SECONDS while a batch is encoded: a CPU encodes ViT-B/16
    at 448 px at seconds an image, so a batch would otherwise be a silent minute. Only the bar's
    elapsed time moves; the batches stay as they are, so the features do not depend on timing."""
    STEP_SECONDS = 2.0

    def __init__(self, bar):
        import threading

        self.bar, self.stop = bar, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.STEP_SECONDS):
            self.bar.refresh()

    def __enter__(self):
        if not self.bar.disable:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        return False


def encode_images(dataset, encode: Callable, batch_size: int = 64, workers: int = 0, device: str = "cpu",
                  desc: str = "encoding", pin_memory: bool = False, progress: bool = True):
    """The one encode loop: yields (ids, dataset indices, `encode(uint8 batch on device)`) per
    batch of a MultiLabelImages yielding fixed-size uint8 images, under no_grad, with a progress
    bar in images; skipped images are counted and summarised in one line at the end."""
    import torch
    from tqdm import tqdm

    report = SkipReport()
    bar = tqdm(total=len(dataset), desc=desc, unit="img", file=sys.stderr, mininterval=2, miniters=1,
               disable=not progress)
    try:                  # closed on an error too, so that the error line stands on a line of its own
        with torch.no_grad():
            for batch in image_batches(dataset, batch_size, workers, pin_memory):
                report.update(batch)
                if batch["id"]:
                    with Heartbeat(bar):
                        out = encode(batch["image"].to(device, non_blocking=True))
                    bar.update(batch["skipped"] + len(batch["id"]))
                    yield batch["id"], batch["index"], out
                else:
                    bar.update(batch["skipped"])
    finally:
        bar.close()
    if report.skipped:
        print(f"{getattr(dataset, 'name', 'images')}: {report.summary()}", file=sys.stderr)


class _StreamEnd(Exception):
    """The reader has handed over its last batch."""


class _StagingRing:
    """Host buffers for a streamed cache's batches, reused in turn: the batches queued, the one
    being read, the one the consumer holds (`count` in all; page-locked with `pin`). A fresh
    buffer per batch cost a page fault per 4 KB: measured, random 400 KB rows read from the page
    cache at 1.7 GiB/s into fresh buffers and at 10 GiB/s into reused ones."""

    def __init__(self, count: int, pin: bool, stop):
        import queue

        self.free, self.pin, self.stop = queue.Queue(), pin, stop
        for _ in range(count):
            self.free.put(None)         # None: a buffer not made yet

    def take(self, feats: CachedFeatures, keys: Sequence[str], rows: int) -> dict | None:
        """A free buffer for `rows` stored rows of `keys` (None for a cache held on a device, or
        once the stream stops); waits until the consumer gives one back."""
        import queue

        import torch

        if feats.tensors is not None:
            return None
        while not self.stop.is_set():
            try:
                slot = self.free.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        else:
            return None
        if slot is not None and slot["copied"] is not None:
            slot["copied"].synchronize()            # the device's copy out of it has finished
        layout = {k: (feats.stored_shapes[k], feats.stored_dtypes[k]) for k in feats.stored_keys(keys)}
        if slot is None or slot["layout"] != layout or slot["rows"] < rows:
            slot = {"layout": layout, "rows": rows, "copied": None,
                    "tensors": {k: torch.empty((rows, *shape), dtype=kind, pin_memory=self.pin)
                                for k, (shape, kind) in layout.items()}}
        return slot

    def give_back(self, slot: dict) -> None:
        """`slot` is free once the copies queued from it so far have run (CUDA), or now."""
        import torch

        if self.pin:
            slot["copied"] = torch.cuda.Event()
            slot["copied"].record()
        self.free.put(slot)


def stream(items, keys: Sequence[str], device: str, dtype, depth: int = PREFETCH_DEPTH, decoded: bool = True):
    """The rows of `keys` of each (features, rows) in `items`, on `device`, read `depth` batches
    ahead in a thread into reused staging buffers (page-locked on CUDA), so file reads overlap the
    compute. Rows cross to the device as stored (a compact field as int8 and its scales) and are
    decoded there into `dtype` (not with `decoded=False`, what bench/cache_scale.py times as the
    epoch's read: then a batch's tensors on the CPU are valid until the next is asked for); a cache
    held on the device is gathered there, no batch touching the host."""
    import queue
    import threading

    from cli import signals_held

    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    pin = device.startswith("cuda")
    ring = _StagingRing(depth + 2, pin, stop)
    held: list = []                 # the staging buffer of the batch the consumer has now (CPU)

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read():
        try:
            for feats, idx in items:
                slot = ring.take(feats, keys, len(idx))
                if stop.is_set():
                    return
                rows = feats.gather_stored(idx, keys, slot and slot["tensors"])   # on the device if held there
                if not offer((rows, slot)):
                    return
            offer(None)
        except Exception as e:  # handed to the consumer, which raises it in its own thread
            offer(e)

    def arrive() -> dict:
        while held:                 # the consumer asks for the next batch: it is done with the last
            ring.give_back(held.pop())
        got = ready.get()
        if got is None:
            raise _StreamEnd
        if isinstance(got, Exception):
            raise got
        rows, slot = got
        rows = {k: v.to(device, non_blocking=True) for k, v in rows.items()}
        if slot is not None and pin:
            ring.give_back(slot)    # free for the reader once the copy out of it has run
        elif slot is not None:
            held.append(slot)       # the rows are views of it until the consumer asks for more
        return decode(rows, dtype) if decoded else rows

    worker = threading.Thread(target=read, daemon=True)
    try:
        with signals_held():
            worker.start()
        # `yield arrive()` binds no name in this frame: a batch the consumer has let go of is freed
        # before the next is decoded (two fp32 batches of ViT-B/16 at 448 px are 200 MB).
        while True:
            yield arrive()
    except _StreamEnd:
        return
    finally:
        with signals_held():
            stop.set()
            if worker.ident is not None:
                worker.join()
