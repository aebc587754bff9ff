"""One writer per run directory: a lock at ``<output_dir>/.xla-trainer.lock``.

Two launches writing one output_dir would interleave checkpoints and duplicate metrics rows, so
process 0 of a run takes this lock before it writes anything (the caller makes every process
agree on the outcome). The lock holds JSON naming its holder: host, pid, started, refreshed.

* A local directory (a path or file://): an exclusive ``fcntl.flock`` on the open lock file, held
  for the life of the process. The kernel drops it when the process ends, however it ends (a
  crash, ``kill -9``), so a relaunch after a crash just takes it, overwriting (and logging) the
  content it left. A live holder cannot be forced out: there is nothing stale to take over.
  flock is per host: it does not lock across machines sharing a network mount (gcsfuse, NFS).
* Anything else (gs://): an object created only if it does not exist (GCS ``ifGenerationMatch=0``),
  then refreshed as a lease every ``refresh_every`` s, each rewrite conditional on the generation
  still being ours. A lease whose ``refreshed`` time is more than ``stale_after`` s old is stale:
  its holder is presumed gone, and ``take_over=True`` (``train.take_over=true``) replaces it, again
  conditionally, so of two takers only one wins. A live lease is never taken. A holder whose
  refresh finds another generation has been taken over: :attr:`RunLock.lost` becomes True and
  the training loop stops.

Defaults: refresh every 60 s, stale after 600 s. A TPU host can stall for minutes in an XLA
compilation or a checkpoint save (the refresh runs on its own thread, but a GIL-holding
compilation or a slow network can still delay it), so a lease must survive several missed
refreshes; 10 minutes is also a tolerable wait before a crashed run may be taken over. GCS
object writes and reads are strongly consistent, so a lease written is at once seen by all.
Staleness compares the holder's clock (``refreshed``) with the reader's: fine for NTP-synced
cloud machines, not for clocks minutes apart.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from fsspec.asyn import sync

from .config import ConfigError
from .data.remote_io import filesystem

log = logging.getLogger(__name__)

LOCK_FILE = ".xla-trainer.lock"
REQUEST_TIMEOUT = 60.0  # s per GCS request: a stalled connection must not hang acquire or release
# s to wait for a lock whose holder on this host has ended: its forked loader workers share the
# flock until they notice (torch checks its parent every 5 s)
ORPHAN_WAIT = 15.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _age(holder: dict) -> float:
    """Seconds since the holder last refreshed its lease (inf if that is not readable)."""
    try:
        then = datetime.datetime.fromisoformat(holder["refreshed"])
    except (KeyError, TypeError, ValueError):
        return float("inf")
    return (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()


def describe(holder: dict) -> str:
    if not holder:
        return "its holder is not recorded yet"
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}, "
            f"last refreshed {holder.get('refreshed')}")


class RunLock:
    def __init__(self, output_dir: str, take_over: bool = False, *, stale_after: float = 600.0,
                 refresh_every: float = 60.0):
        self.output_dir, self.take_over = output_dir, take_over
        self.stale_after, self.refresh_every = stale_after, refresh_every
        self.local = "://" not in output_dir or output_dir.startswith("file://")
        self.url = f"{output_dir.rstrip('/')}/{LOCK_FILE}"
        self._fd: int | None = None  # local: the descriptor that holds the flock
        self._generation: str | None = None  # gs: the generation of our lease object
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False
        self._holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
                        "token": uuid.uuid4().hex}  # tells this launch's writes from any other's

    @property
    def lost(self) -> bool:
        """True once another launch took the lock over (remote leases)."""
        return self._lost

    def _content(self) -> bytes:
        return json.dumps({**self._holder, "refreshed": _now()}, indent=1).encode()

    def acquire(self) -> "RunLock":
        """Take the lock, or raise ConfigError naming the holder and how to take over."""
        self._acquire_local() if self.local else self._acquire_remote()
        return self

    def release(self):
        """Give the lock back (only if it is still ours)."""
        self._release_local() if self.local else self._release_remote()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    # --- a local directory: flock --------------------------------------------------------------
    def _acquire_local(self):
        directory = self.output_dir.removeprefix("file://")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, LOCK_FILE)
        deadline = time.monotonic() + ORPHAN_WAIT
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):  # e.g. ENOLCK: an NFS mount without locking
                    raise ConfigError(f"cannot lock {path} ({e.strerror}): this filesystem does not support "
                                      f"flock; use a local disk or a gs:// train.output_dir") from None
                if _ended_here(_parse(_read_file(path))) and time.monotonic() < deadline:
                    time.sleep(0.2)  # its loader workers (forked: they share the lock) end within seconds
                    continue
                raise ConfigError(
                    f"{self.output_dir} is in use by another run ({describe(_parse(_read_file(path)))}; lock file "
                    f"{path}). Stop that run or use another train.output_dir. A local lock frees itself when its "
                    f"process ends, however it ends, so there is nothing to take over (train.take_over does not "
                    f"apply).") from None
            # A releasing holder unlinks the file: if we locked a name that is gone or now another
            # file, another launch may hold the new one. Lock whatever the name points at now.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        left = _parse(os.pread(fd, 1 << 16, 0))
        if left:
            log.warning("%s: taking the run lock that %s left behind (that process ended without releasing "
                        "it, e.g. a crash or kill -9)", path, describe(left))
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._content(), 0)
        os.fsync(fd)
        self._fd, self._path = fd, path

    def _release_local(self):
        if self._fd is None:
            return
        try:
            if os.stat(self._path).st_ino == os.fstat(self._fd).st_ino:  # still the file we hold
                os.unlink(self._path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    # --- gs://: a lease object with generation preconditions -----------------------------------
    def _call(self, *args, **kwargs):
        fs, _ = filesystem(self.url)
        return sync(fs.loop, fs._call, *args, timeout=REQUEST_TIMEOUT, **kwargs)

    def _where(self) -> tuple[str, str]:
        fs, path = filesystem(self.url)
        bucket, key, _ = fs.split_path(path)
        return bucket, key

    def _write(self, if_generation: str) -> str:
        """Upload our lease if the object's generation is `if_generation` ("0": if there is none);
        the new generation. FileExistsError (HTTP 412) when the precondition fails."""
        fs, _ = filesystem(self.url)
        bucket, key = self._where()
        # gcsfs's own uploads can only ask for "no object yet" (mode="create"), not "still
        # generation N"; so the upload is made here. Multipart, like gcsfs's small uploads:
        # fake-gcs-server honours ifGenerationMatch on it (not on uploadType=media).
        body = (b'--==0==\nContent-Type: application/json; charset=UTF-8\n\n' + json.dumps({"name": key}).encode()
                + b'\n--==0==\nContent-Type: application/json\n\n' + self._content() + b"\n--==0==--")
        try:
            out = self._call("POST", f"{fs._location}/upload/storage/v1/b/{bucket}/o", uploadType="multipart",
                             headers={"Content-Type": 'multipart/related; boundary="==0=="'}, data=body,
                             json_out=True, ifGenerationMatch=if_generation)
        except FileExistsError:
            # gcsfs retries a request whose reply was lost; if the first try landed, the retry
            # fails the precondition against our own write. Only this launch writes its token.
            found = self._read()
            if found and found[1].get("token") == self._holder["token"]:
                return found[0]
            raise
        return str(out["generation"])

    def _read(self) -> tuple[str, dict] | None:
        """The lease's (generation, content), or None if there is none."""
        bucket, key = self._where()
        try:
            meta = self._call("GET", "b/{}/o/{}", bucket, key, json_out=True)
            _, data = self._call("GET", "b/{}/o/{}", bucket, key, alt="media", generation=meta["generation"])
        except FileNotFoundError:  # none, or it was just replaced or released: the caller looks again
            return None
        return str(meta["generation"]), _parse(data)

    def _acquire_remote(self):
        for _ in range(5):  # the lease changed between our read and our write: look again
            try:
                self._generation = self._write("0")
                break
            except FileExistsError:
                pass
            found = self._read()
            if found is None:
                continue
            generation, holder = found
            age = _age(holder)
            if age < self.stale_after:
                raise ConfigError(
                    f"{self.output_dir} is in use by another run ({describe(holder)}; lock {self.url}): its lease "
                    f"was refreshed {age:.0f} s ago, and a lease is stale only after {self.stale_after:.0f} s. Stop "
                    f"that run or use another train.output_dir; if it is gone, relaunch once its lease is stale, "
                    f"with train.take_over=true.")
            if not self.take_over:
                raise ConfigError(
                    f"{self.output_dir} has a stale run lock ({describe(holder)}; lock {self.url}): not refreshed "
                    f"for {age:.0f} s (stale after {self.stale_after:.0f} s), so that run looks gone. If it is, "
                    f"relaunch with train.take_over=true to take the lock over.")
            try:
                self._generation = self._write(generation)
            except FileExistsError:  # its holder refreshed it, or another taker won: look again
                continue
            log.warning("%s: took over the stale run lock of %s (not refreshed for %.0f s)", self.url,
                        describe(holder), age)
            break
        else:
            raise ConfigError(f"{self.url} kept changing while this launch tried to take it; is another "
                              f"launch starting on {self.output_dir}?")
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep_alive, name="run-lock-lease", daemon=True)
        self._thread.start()

    def _keep_alive(self):
        while not self._stop.wait(self.refresh_every):
            try:
                self._generation = self._write(self._generation)
            except (FileExistsError, FileNotFoundError):
                self._lost = True
                log.error("%s: this run lost its lock: another launch took %s over (this run's lease must have "
                          "looked stale); stopping so that two runs do not write one output_dir", self.url,
                          self.output_dir)
                return
            except Exception as e:  # a network error: the lease holds for stale_after s, try again later
                log.warning("%s: could not refresh the run lock (%r); trying again in %.0f s", self.url, e,
                            self.refresh_every)

    def _release_remote(self):
        try:
            self._give_back()
        except Exception as e:  # release runs in a `finally`: never hide what ended the run
            log.warning("%s: could not remove the run lock (%r); it goes stale %.0f s after its last refresh",
                        self.url, e, self.stale_after)

    def _give_back(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._generation is None:
            return
        generation, self._generation = self._generation, None
        found = self._read()
        if self._lost or found is None or found[0] != generation:
            log.warning("%s: not removed: it is no longer this run's lock", self.url)
            return
        bucket, key = self._where()
        try:
            # the precondition closes the gap since the read on GCS (fake-gcs-server ignores it on DELETE)
            self._call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=generation)
        except (FileExistsError, FileNotFoundError):
            log.warning("%s: not removed: it is no longer this run's lock", self.url)


def _ended_here(holder: dict) -> bool:
    """Whether the holder is a process of this host that has ended."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _parse(data: bytes) -> dict:
    """The holder a lock's content names ({} if it is empty or unreadable: a crash mid-write)."""
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}
