"""Low-level storage: atomic writes, file locks, blob hashing and a strict safetensors reader.

Nothing here knows about names or versions (that is `registry.hub`). No pickle anywhere:
tensors are written with `safetensors.torch.save` and read back by `read_safetensors`, a
validating reader that builds tensors straight over the bytes read (no second copy).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from registry.errors import IntegrityError, RegistryError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {k: v.itemsize for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
MAX_DIMS = 16

# ----------------------------------------------------------------------------- parallel hashing

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="registry-hash")
        return _pool


def _reset_pool_after_fork() -> None:  # a forked child has none of the parent's threads
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_reset_pool_after_fork)

MIN_CHUNK = 256 * 1024


def chunk_size_for(size: int) -> int:
    """Chunk length for per-chunk digests: one chunk per hashing thread, at least 256 KiB,
    a multiple of 64 KiB. Chunks let a pull verify every byte on several cores at once."""
    workers = _workers()
    if workers < 4 or size < 4 * MIN_CHUNK:  # too few cores (or bytes) to gain: one chunk, the whole file
        return max(size, 1)
    per = -(-size // workers)
    return max(MIN_CHUNK, -(-per // 65536) * 65536)


def _sha(view: memoryview | bytes) -> str:
    return hashlib.sha256(view).hexdigest()


def digests(data: bytes | bytearray, chunk_size: int) -> tuple[str, list[str]]:
    """(sha256 of all of `data`, sha256 of each `chunk_size` piece), hashed in parallel."""
    started = start_chunk_check(data, chunk_size)
    whole = _sha(memoryview(data)) if len(started) > 1 else None  # one chunk: its digest is the whole file's
    chunks = finish_chunk_check(started)
    return whole or chunks[0], chunks


def start_chunk_check(data: bytes | bytearray, chunk_size: int) -> list:
    """Start hashing the chunks of `data` on the pool; `finish_chunk_check` collects them.
    The caller parses the header meanwhile (hashlib releases the GIL on big buffers)."""
    view = memoryview(data)
    pieces = [view[i : i + chunk_size] for i in range(0, max(len(view), 1), chunk_size)]
    return pieces if len(pieces) == 1 else [get_pool().submit(_sha, p) for p in pieces]


def finish_chunk_check(started: list) -> list[str]:
    return [_sha(s) if isinstance(s, memoryview) else s.result() for s in started]


# ----------------------------------------------------------------------------- files


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_temp(tmp_dir: Path, label: str, data: bytes | bytearray | memoryview, fsync: bool = True) -> Path:
    """Write `data` to a new temp file in `tmp_dir` (fsync'd if asked); return its path."""
    path = tmp_dir / f"{label}.{os.getpid()}.{threading.get_ident()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: Path, obj: dict, fsync: bool = True) -> None:
    """Append one JSON line with a single write (O_APPEND); a torn last line is skipped by readers."""
    line = (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:  # a crash may have left a line without its newline: start a fresh one
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        os.write(fd, line)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path) -> Iterator[dict]:
    """The complete, well-formed JSON-object lines of a log (torn or damaged lines skipped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if data.endswith(b"\n"):  # fast path: the whole log as one JSON array (falls back line by line)
        try:
            objs = json.loads(b"[" + data[:-1].replace(b"\n", b",") + b"]")
        except ValueError:
            objs = None
        if isinstance(objs, list) and all(isinstance(o, dict) for o in objs):
            yield from objs
            return
    for raw in data.split(b"\n")[:-1]:  # the last piece is empty or a torn line
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


@contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """fcntl.flock on `path` (created if missing); released on exit and when the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


# ----------------------------------------------------------------------------- safetensors


def serialize(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of `tensors`; equal tensors give equal bytes (so equal blobs dedupe)."""
    from safetensors.torch import save

    try:
        return save({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()})
    except Exception as e:  # noqa: BLE001  (safetensors raises several kinds)
        raise RegistryError(f"cannot serialize the delta's tensors with safetensors: {e}") from e


def read_header(buf: bytes | bytearray | memoryview, what: str) -> tuple[dict[str, dict], int]:
    """Parse and check a safetensors header: (entries without __metadata__, start of the data)."""
    size = len(buf)
    if size < 8:
        raise IntegrityError(f"{what}: {size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > MAX_HEADER or n > size - 8:
        raise IntegrityError(f"{what}: safetensors header length {n} exceeds the file ({size} bytes)")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IntegrityError(f"{what}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{what}: safetensors header is not a JSON object")
    start, data_len = 8 + n, size - 8 - n
    entries: dict[str, dict] = {}
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict):
                raise IntegrityError(f"{what}: __metadata__ is not an object")
            continue
        if not isinstance(info, dict):
            raise IntegrityError(f"{what}: header entry {key!r} is not an object")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise IntegrityError(f"{what}: tensor {key!r} has unknown dtype {dt!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(type(d) is int and 0 <= d < 2**48 for d in shape)
        ):
            raise IntegrityError(f"{what}: tensor {key!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1] <= data_len
        ):
            raise IntegrityError(f"{what}: tensor {key!r} has invalid data_offsets {offs!r} (data is {data_len} bytes)")
        nbytes = math.prod(shape) * ITEMSIZE[dt]
        if nbytes != offs[1] - offs[0]:
            raise IntegrityError(
                f"{what}: tensor {key!r} of shape {shape} and dtype {dt} needs "
                f"{nbytes} bytes but its offsets span {offs[1] - offs[0]}"
            )
        spans.append((offs[0], offs[1], key))
        entries[key] = {"dtype": dt, "shape": shape, "offsets": offs}
    spans.sort()
    end = 0
    for b, stop, key in spans:  # as safetensors requires: the tensors tile the data, no gap, no overlap
        if b != end:
            raise IntegrityError(
                f"{what}: tensor {key!r} starts at byte {b} of the data, not at {end} "
                "(tensors must tile the data without gaps or overlaps)"
            )
        end = stop
    if end != data_len:
        raise IntegrityError(f"{what}: the tensors cover {end} bytes of data but the file holds {data_len}")
    return entries, start


def tensors_from(buf: bytearray, entries: dict[str, dict], start: int, order: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tensors over `buf` (no copy where alignment allows), in `order`."""
    out: dict[str, torch.Tensor] = {}
    for key in order:
        e = entries[key]
        dtype = DTYPES[e["dtype"]]
        b, end = e["offsets"]
        item = ITEMSIZE[e["dtype"]]
        numel = (end - b) // item
        if numel == 0:
            out[key] = torch.empty(e["shape"], dtype=dtype)
        elif (start + b) % item == 0:
            out[key] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=start + b).view(e["shape"])
        else:
            out[key] = torch.frombuffer(bytearray(buf[start + b : start + end]), dtype=dtype).view(e["shape"])
    return out


def stat_key(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever a file's bytes are changed in place or the file is replaced."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class CheckedCache:
    """Files whose bytes were checked in this process, keyed by `stat_key`: a write to the file
    (which moves mtime and ctime) or a new file at the path makes the entry stale."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._d: dict[str, tuple[tuple[int, ...], object]] = {}
        self._lock = threading.Lock()

    def get(self, path: str, key: tuple[int, ...]) -> object | None:
        hit = self._d.get(path)
        return hit[1] if hit is not None and hit[0] == key else None

    def put(self, path: str, key: tuple[int, ...], value: object) -> None:
        # file timestamps tick coarsely (a few ms): a write within the same tick as the check would
        # leave the key unchanged, so (as git does with its index) files changed in the last
        # second are not remembered and are checked again next time
        if time.time_ns() - key[4] < 1_000_000_000:
            return
        with self._lock:
            if len(self._d) >= self.limit:
                self._d.pop(next(iter(self._d)))
            self._d[path] = (key, value)


def read_file(path: Path) -> tuple[bytearray, tuple[int, ...]]:
    """All of a file, into a fresh bytearray (tensors built over it own it), and its `stat_key`."""
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    return (buf if got == size else buf[:got]), stat_key(st)
