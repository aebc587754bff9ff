"""Reading and writing local paths and gs:// URLs alike, on fsspec/gcsfs.

* :func:`filesystem` hands out one filesystem instance per process: a gcsfs instance holds an
  aiohttp session bound to an event-loop thread, neither of which survives a fork, so a DataLoader
  worker must never use its parent's instance.
* :class:`RetryingReader` streams one file forwards and survives transient errors (a restarted
  server, a reset connection, a 5xx, a stalled request) by asking again for the bytes from where
  it stopped, so the caller sees every byte exactly once.
* :func:`read_bytes`, :func:`write_bytes_atomic` and :func:`exists` for small whole files.
* :func:`claim_output` and :func:`remove_temporaries`: a command writes only into a prefix that is
  new, empty or its own job's, and cleans up the temporaries its own interrupted writes left.

gcsfs must be imported with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false against an emulator (otherwise
it tries gRPC first and each operation stalls ~60 s); this module therefore imports it only
through fsspec, when a gs:// URL is first used.
"""
from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.utils import get_protocol

from ..config import ConfigError, blocking_file

log = logging.getLogger(__name__)

# (pid, protocol) -> filesystem. The pid in the key is what makes it fork-safe: a forked child
# finds no entry of its own and builds a new instance instead of inheriting its parent's.
_FILESYSTEMS: dict[tuple[int, str], fsspec.AbstractFileSystem] = {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Like ``fsspec.core.url_to_fs(url)``, with one filesystem instance per process and protocol."""
    key = (os.getpid(), get_protocol(str(url)))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        # skip_instance_cache: never take an instance from fsspec's own cache, which may have been
        # created by (and still be tied to the event loop of) another process.
        fs, _ = fsspec.core.url_to_fs(str(url), skip_instance_cache=True)
        _FILESYSTEMS[key] = fs
    return fs, fs._strip_protocol(str(url))


# Errors that retrying cannot fix. They are OSErrors, which are otherwise treated as transient.
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def is_transient(exc: BaseException) -> bool:
    """Whether an error from opening or reading a file is worth retrying.

    Transient: OSError (which includes connection refused/reset, TimeoutError, fsspec's
    FSTimeoutError, aiohttp's connection errors and gcsfs's ProxyError for a 502) unless it says
    the file is missing or forbidden; any aiohttp client error (e.g. a truncated body); an HTTP
    status of 5xx, 408 or 429 (gcsfs's HttpError, aiohttp's ClientResponseError); and whatever
    gcsfs itself classes as retriable.
    """
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (OSError, asyncio.TimeoutError)):  # separate classes before Python 3.11
        return True
    status = getattr(exc, "code", None) or getattr(exc, "status", None)
    if isinstance(status, int) and (status >= 500 or status in (408, 429)):
        return True
    aiohttp = sys.modules.get("aiohttp")  # loaded only if some filesystem talks HTTP
    if aiohttp is not None and isinstance(exc, aiohttp.ClientError):
        return True
    gcsfs_retry = sys.modules.get("gcsfs.retry")
    return gcsfs_retry is not None and gcsfs_retry.is_retriable(exc)


class RemoteReadError(OSError):
    """A read that still failed after all the attempts; names the url and the byte offset."""


class RetryingReader(io.RawIOBase):
    """A read-only, forward-only file object over one local file or gs:// object, that retries.

    It reads ``block_size`` bytes at a time, each block one ranged read
    (``fs.cat_file(path, start, end)``: for gcsfs exactly the ranged GET its own file object would
    send). So after an error there is no half-read handle to repair: the failed block is simply
    asked for again from the same offset. On a transient error (:func:`is_transient`) it logs a
    warning naming the url, the offset and the attempt, waits ``backoff`` s (doubling on each
    consecutive failure, capped at ``max_backoff``) and tries again; ``attempts`` tries in a row
    fail -> :class:`RemoteReadError`. Other errors (a missing file, ...) are raised at once.

    On remote (async) filesystems each block must arrive within ``timeout`` s. This matters
    because gcsfs retries a failing request itself, silently, for ~30 s (6 tries, sleeping 1, 2, 4,
    8, 16 s plus jitter) before it raises, and a stalled connection can hang much longer; the
    timeout cancels the request, and the retry (with its warning) happens here instead.

    The file is opened lazily, on the first read, in the process that reads it. Works as the
    ``fileobj`` of ``tarfile.open(mode="r|")``; wrap it in ``io.BufferedReader`` for small reads.
    """

    def __init__(self, url: str, *, block_size: int = 8 << 20, attempts: int = 8,
                 backoff: float = 0.2, max_backoff: float = 5.0, timeout: float | None = 60.0):
        super().__init__()
        self.url = str(url)
        self.block_size, self.attempts = block_size, attempts
        self.backoff, self.max_backoff, self.timeout = backoff, max_backoff, timeout
        self._size: int | None = None  # known once opened
        self._pos = 0  # offset in the file of the first byte not yet fetched
        self._buf = memoryview(b"")  # fetched bytes not yet handed to the caller

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError(f"read from a closed RetryingReader ({self.url})")
        if len(b) == 0:
            return 0
        if not self._buf:
            self._buf = memoryview(self._retry(self._next_block))
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n  # 0 only at the end of the file

    def readall(self) -> bytes:
        chunks = [bytes(self._buf)]
        self._buf = memoryview(b"")
        while block := self._retry(self._next_block):
            chunks.append(block)
        return b"".join(chunks)

    def tell(self) -> int:
        return self._pos - len(self._buf)  # bytes handed to the caller so far

    def close(self) -> None:
        self._buf = memoryview(b"")
        super().close()

    def _next_block(self) -> bytes:
        # The filesystem is looked up on every call (a dict lookup), so that a reader created in
        # one process and read in a forked one uses the reading process's instance.
        fs, path = filesystem(self.url)
        # Only async filesystems (gcsfs) take a timeout: fsspec's sync() cancels the coroutine.
        kwargs = {"timeout": self.timeout} if isinstance(fs, AsyncFileSystem) and self.timeout else {}
        if self._size is None:  # "open": a missing file raises FileNotFoundError here, untried
            self._size = fs.size(path, **kwargs)
        end = min(self._pos + self.block_size, self._size)
        if self._pos >= end:
            return b""
        data = fs.cat_file(path, start=self._pos, end=end, **kwargs)
        if len(data) != end - self._pos:  # e.g. a connection cut that the client did not notice
            raise OSError(f"short read: {len(data)} of {end - self._pos} bytes")
        self._pos = end
        return data

    def _retry(self, fn):
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:
                if not is_transient(e):
                    raise
                if attempt == self.attempts:
                    raise RemoteReadError(f"{self.url}: read failed at byte {self._pos} after "
                                          f"{attempt} attempts: {e!r}") from e
                delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
                reason = (f"no answer within {self.timeout} s" if isinstance(e, asyncio.TimeoutError)
                          else repr(e))
                log.warning("%s: %s at byte %d (attempt %d of %d); retrying in %.1f s",
                            self.url, reason, self._pos, attempt, self.attempts, delay)
                time.sleep(delay)


def read_bytes(url: str, **reader_kwargs) -> bytes:
    """The whole content of a local file or gs:// object, read with retries."""
    with RetryingReader(url, **reader_kwargs) as f:
        return f.readall()


TEMPORARY = ".{name}.tmp-"  # + a random suffix: write_bytes_atomic's temporary names


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that no reader ever sees a partial file under that name.

    The bytes go to a hidden temporary name in the same directory first, which is then moved onto
    ``url``: a rename on a local disk; on GCS a server-side move (gcsfs falls back to copy + delete
    where the server lacks the move API). An upload is atomic on GCS anyway, but the temporary
    name also keeps a failed or killed upload from ever appearing under the final name.
    """
    fs, path = filesystem(url)
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/{TEMPORARY.format(name=name)}{uuid.uuid4().hex}"
    if not isinstance(fs, AsyncFileSystem):  # object stores have no directories to create
        fs.makedirs(parent, exist_ok=True)
    try:
        fs.pipe_file(tmp, data)
        on_disk = get_protocol(str(url)) == "file"
        if on_disk:  # the bytes on the disk before the name points at them (see sync_to_disk)
            _fsync(tmp)
        fs.mv(tmp, path)
        if on_disk:
            _fsync(parent)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # keep the original error
            log.warning("could not remove the temporary file %s", tmp, exc_info=True)
        raise


def sync_to_disk(url: str) -> None:
    """On a local disk, every file of the folder `url`, and the folder's own entries, forced onto
    the disk (fsync): a record written after them (a checkpoint's commit.json) never outlives them
    in a host crash or power loss. DCP's writer does not do it for us on every torch: 2.9 calls
    os.sync(), 2.14 only flushes. An object store (gs://) holds an upload durably once it returns:
    nothing to do."""
    if get_protocol(str(url)) != "file":
        return
    path = filesystem(url)[1]
    for entry in os.scandir(path):
        if entry.is_file():
            _fsync(entry.path)
    _fsync(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_aside(url: str, label: str) -> str:
    """`url` (a file or a folder) renamed <url>.<label>-<UTC time>: kept, never deleted. A name
    already taken (set aside twice within a second) gets -1, -2, ... after the time: moved onto the
    first, the second would replace or merge into it. Returns the new path."""
    fs, path = filesystem(url)
    aside = stamped = f"{path}.{label}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    for n in itertools.count(1):
        if not fs.exists(aside):
            break
        aside = f"{stamped}-{n}"
    fs.mv(path, aside, recursive=fs.isdir(path))
    return aside


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def list_names(prefix: str) -> list[str]:
    """The names directly under a local directory or gs:// prefix (one listing; [] if missing)."""
    fs, root = filesystem(prefix)
    if not fs.isdir(root):
        return []
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]


def temporary_of(entry: str) -> str | None:
    """The file name a write_bytes_atomic temporary stands for, or None if `entry` is not one."""
    if not entry.startswith(".") or ".tmp-" not in entry:
        return None
    return entry[1:].split(".tmp-", 1)[0]


def remove_temporaries(prefix: str, mine) -> list[str]:
    """Delete the temporaries that killed write_bytes_atomic calls left under `prefix` for the
    files `mine(name)` says this process writes (one listing). Only this process writes those
    names, so a temporary of theirs is a leftover of an earlier, interrupted run."""
    fs, root = filesystem(prefix)
    removed = []
    for entry in list_names(prefix):
        target = temporary_of(entry)
        if target is not None and mine(target):
            fs.rm(f"{root.rstrip('/')}/{entry}")
            removed.append(entry)
    if removed:
        log.info("removed %d temporary files of an interrupted run under %s", len(removed), prefix)
    return removed


JOB_FILE = ".xla-trainer-job.json"


def claim_output(prefix: str, job: dict, fix: str):
    """Make `prefix` the output of `job` (a dict naming the command and its parameters), or
    raise ConfigError naming the path and `fix`. A prefix is taken when it is missing or empty
    (temporaries aside), or when it holds the file of this same job (a re-run resumes it):
    a program never writes over what it did not create."""
    blocker = blocking_file(prefix)
    if blocker is not None:
        where = "is a file" if str(blocker) == str(Path(prefix)) else f"lies under '{blocker}', which is a file"
        raise ConfigError(f"'{prefix}' {where}, not a directory; nothing was written. {fix}")
    found = [n for n in list_names(prefix) if temporary_of(n) is None]
    job_url = f"{prefix.rstrip('/')}/{JOB_FILE}"
    if JOB_FILE in found:
        theirs = json.loads(read_bytes(job_url))
        if theirs == job:
            return
        changed = sorted(k for k in set(job) | set(theirs) if job.get(k) != theirs.get(k))
        raise ConfigError(f"'{prefix}' holds the output of another {theirs.get('command', 'job')} "
                          f"(it differs in {', '.join(changed)}); nothing there was touched. {fix}")
    if found:
        shown = ", ".join(sorted(found)[:3]) + (", ..." if len(found) > 3 else "")
        raise ConfigError(f"'{prefix}' is not empty ({shown}) and was not written by this command; "
                          f"nothing there was touched. {fix}")
    write_bytes_atomic(job_url, json.dumps(job, indent=1, sort_keys=True).encode())
