"""xla_trainer.data.remote_io against a real GCS server (fake-gcs-server, see gcs_fixtures.py)."""
import io
import logging
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request

import pytest

from conftest import run_here, toy_overrides
from gcs_fixtures import FakeGcsServer, _free_port
from xla_trainer.data import remote_io
from xla_trainer.data.remote_io import RetryingReader, exists, filesystem, read_bytes, write_bytes_atomic


def upload(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def test_fake_gcs_server_keeps_objects_over_restart_and_leaves_no_process(tmp_path):
    server = FakeGcsServer(tmp_path)
    with server:
        server.create_bucket("kept")
        req = urllib.request.Request(f"{server.url}/upload/storage/v1/b/kept/o?uploadType=media&name=a",
                                     data=b"payload", method="POST")
        urllib.request.urlopen(req, timeout=10).close()
        port, proc = server.port, server._proc
        server.restart()
        assert server.port == port and server._proc is not proc and proc.poll() is not None
        with urllib.request.urlopen(f"{server.url}/download/storage/v1/b/kept/o/a?alt=media", timeout=10) as r:
            assert r.read() == b"payload"
        proc = server._proc
    assert not server.running and proc.poll() is not None


def test_reader_survives_server_restart_mid_read(gcs_server, gcs_bucket, caplog):
    data = os.urandom(3 << 20)
    url = f"{gcs_bucket}/shard.bin"
    upload(url, data)
    # timeout=1: gcsfs retries a refused connection by itself for ~30 s; the timeout hands the
    # retry to RetryingReader after 1 s, which logs it.
    reader = RetryingReader(url, block_size=128 << 10, backoff=0.2, max_backoff=1.0, timeout=1.0)
    out = bytearray()
    t_stop = None
    restarter = threading.Thread(target=lambda: (time.sleep(1.5), gcs_server.start()))
    caplog.set_level(logging.WARNING, logger=remote_io.__name__)
    try:
        while chunk := reader.read(50_000):  # chunks that do not line up with the blocks
            out += chunk
            if t_stop is None and len(out) > len(data) // 3:
                gcs_server.stop()
                t_stop = time.monotonic()
                restarter.start()
        elapsed = time.monotonic() - t_stop
    finally:
        if restarter.is_alive():
            restarter.join()
        gcs_server.start()  # no-op when it is running: the session's server must stay up
    assert bytes(out) == data
    retries = [r for r in caplog.records if r.name == remote_io.__name__ and r.levelno == logging.WARNING]
    assert retries, "expected a retry warning"
    assert url in retries[0].getMessage() and "attempt 1 of 8" in retries[0].getMessage()
    assert elapsed < 15


def test_reader_through_tarfile_stream_mode(gcs_bucket):
    members = {f"img{i:03d}.bin": os.urandom(1000 + 37 * i) for i in range(40)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    url = f"{gcs_bucket}/shard-000.tar"
    upload(url, buf.getvalue())
    got = {}
    with RetryingReader(url, block_size=7_000) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            got[member.name] = tar.extractfile(member).read()
    assert got == members


def test_missing_object_is_not_retried(gcs_bucket, caplog):
    caplog.set_level(logging.WARNING, logger=remote_io.__name__)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        RetryingReader(f"{gcs_bucket}/missing.bin", backoff=1.0).read(10)
    assert time.monotonic() - t0 < 1.0
    assert not [r for r in caplog.records if r.name == remote_io.__name__]


def test_gives_up_naming_url_and_offset(gcs_server, monkeypatch, caplog):
    # A server that is gone for good: nothing listens on this port (the session's server stays up).
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_free_port()}")
    caplog.set_level(logging.WARNING, logger=remote_io.__name__)
    reader = RetryingReader("gs://gone/x.bin", attempts=3, backoff=0.05, timeout=0.5)
    with pytest.raises(remote_io.RemoteReadError, match=r"gs://gone/x\.bin.*byte 0 after 3 attempts"):
        reader.read(10)
    assert len([r for r in caplog.records if r.name == remote_io.__name__]) == 2


@pytest.mark.parametrize("where", ["gcs", "local"])
def test_write_bytes_atomic_round_trip(where, gcs_bucket, tmp_path):
    root = gcs_bucket if where == "gcs" else str(tmp_path)
    url = f"{root}/run1/checkpoint-00000010.pt"
    assert not exists(url)
    write_bytes_atomic(url, b"first")
    write_bytes_atomic(url, b"second version")  # replaces
    assert exists(url)
    assert read_bytes(url) == b"second version"
    fs, path = filesystem(url)
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[1] for p in fs.ls(path.rsplit("/", 1)[0], detail=False)] == [
        "checkpoint-00000010.pt"]  # no temporary file left behind


def test_a_local_checkpoint_is_on_disk_before_its_commit_marker(embedded_root, tmp_path, monkeypatch):
    """Every file DCP wrote is fsynced, then commit.json's temporary file, then the rename is made
    durable (the folder): a host crash never leaves a marker vouching for files not on the disk
    (DCP's writer on torch 2.14 only flushes)."""
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    out = tmp_path / "run"
    assert run_here(["pretrain", *toy_overrides(embedded_root, out, **{"train.stop_at_step": 1})]).returncode == 0
    folder = out / "checkpoints" / "1"
    written = sorted(str(p) for p in folder.iterdir() if p.name != "commit.json")
    assert any(w.endswith(".distcp") for w in written) and str(folder / ".metadata") in written
    marker = next(i for i, p in enumerate(synced) if p.startswith(str(folder / ".commit.json.tmp-")))
    assert all(synced.index(w) < marker for w in written), synced
    assert str(folder) in synced[marker:]  # the rename onto commit.json made durable


@pytest.mark.parametrize("where", ["gcs", "local"])
def test_move_aside_twice_within_a_second_keeps_both(where, gcs_bucket, tmp_path):
    """A file and a folder each set aside twice under one label: four distinct names, every byte kept."""
    root = gcs_bucket if where == "gcs" else str(tmp_path)
    fs, _ = filesystem(root)
    moved = []
    for version in (b"first", b"second"):
        write_bytes_atomic(f"{root}/done.json", version)
        write_bytes_atomic(f"{root}/6/data.bin", version)
        moved += [remote_io.move_aside(f"{root}/done.json", "replaced"), remote_io.move_aside(f"{root}/6", "damaged")]
    assert len(set(moved)) == 4 and not exists(f"{root}/done.json") and not exists(f"{root}/6/data.bin")
    files, folders = moved[0::2], moved[1::2]
    assert all(re.fullmatch(r".*/done\.json\.replaced-\d{8}T\d{6}Z(-\d+)?", f) for f in files), files
    assert [fs.cat_file(f) for f in files] == [b"first", b"second"]
    assert [fs.cat_file(f"{d}/data.bin") for d in folders] == [b"first", b"second"]


def test_filesystem_is_one_instance_per_process(gcs_server):
    fs1, path = filesystem("gs://bucket/a/b")
    fs2, _ = filesystem("gs://other/c")
    assert fs1 is fs2 and path == "bucket/a/b"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child must get its own instance
        try:
            os.write(write, b"1" if filesystem("gs://bucket/a")[0] is not fs1 else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"


def test_subprocess_inherits_the_server_settings(gcs_bucket):
    # STORAGE_EMULATOR_HOST, FSSPEC_GCS_TOKEN=anon and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false reach
    # a child through os.environ (without the last one each operation would stall ~60 s).
    url = f"{gcs_bucket}/from-parent.bin"
    upload(url, b"hello child")
    child = ("import sys, fsspec.config; from xla_trainer.data.remote_io import read_bytes; "
             "assert fsspec.config.conf['gcs']['token'] == 'anon'; "
             "sys.stdout.buffer.write(read_bytes(sys.argv[1]))")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", child, url], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b"hello child"
    assert time.monotonic() - t0 < 10
