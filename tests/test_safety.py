"""A user's data is never deleted or overwritten, and every bad input is one clear line with exit
code 2 (in-process: no subprocess start-up)."""
import importlib.util
import inspect
import json
import re
import subprocess
from dataclasses import replace

import pytest
import torch

from conftest import REPO, fails_cleanly
from xla_trainer.data import remote_io
from xla_trainer.checkpoint import Checkpoints
from xla_trainer.cli import main
from xla_trainer.config import ConfigError
from xla_trainer.data.generated import MARKER, generated_kind, prepare_digits, prepare_embedded
from xla_trainer.metrics import MetricsLogger
from xla_trainer.runtime import CudaRuntime, EagerRuntime, MachineDevices, Runtime, choose_backend
from xla_trainer.data.shards import make_shards


@pytest.fixture
def user_dir(tmp_path):
    """A directory of the user's, which no command may touch."""
    root = tmp_path / "imagenet"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "cat" / "1.jpg").write_bytes(b"precious")
    (root / "notes.txt").write_text("mine")
    return root


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- generated trees never replace a user's directory -------------------------------------------
def test_prepare_data_refuses_a_directory_with_files(user_dir, capsys):
    before = snapshot(user_dir)
    err = fails_cleanly(capsys, ["prepare-data", "--out", str(user_dir)])
    assert f"'{user_dir}' holds files this program did not write" in err and "Pass another --out" in err
    assert snapshot(user_dir) == before


def test_pretrain_with_data_root_on_the_embedded_source_keeps_the_directory(user_dir, capsys):
    """The default config has data.source=embedded: pointing data.root at one's data used to
    delete it and write the embedded photos there."""
    before = snapshot(user_dir)
    err = fails_cleanly(capsys, ["pretrain", f"data.root={user_dir}", "runtime.backend=cpu",
                                 f"train.output_dir={user_dir.parent / 'out'}"])
    assert "pass data.source=imagefolder" in err and str(user_dir) in err
    assert snapshot(user_dir) == before


def test_digits_source_keeps_the_directory(user_dir, capsys):
    before = snapshot(user_dir)
    err = fails_cleanly(capsys, ["linprobe", f"data.root={user_dir}", "train.init=null", "runtime.backend=cpu",
                                 f"train.output_dir={user_dir.parent / 'out'}"])
    assert "data.source=digits writes its own images" in err
    assert snapshot(user_dir) == before


def test_generated_tree_goes_into_new_or_empty_directories_only(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".empty.tmp-{dead.pid}-0000"  # left by a killed writer
    stale.mkdir()
    (stale / "half.png").write_bytes(b"")
    root = prepare_digits(empty)
    assert root == empty and generated_kind(empty) == "digits" and (empty / "val").is_dir()
    assert not stale.exists()
    assert not list(tmp_path.glob(".empty.tmp-*"))
    mtime = (empty / MARKER).stat().st_mtime_ns
    assert prepare_digits(empty) == empty and (empty / MARKER).stat().st_mtime_ns == mtime  # once
    with pytest.raises(ConfigError, match="holds the generated 'digits' dataset"):
        prepare_embedded(empty)


# --- other outputs: never over what the command did not write ------------------------------------
def test_make_shards_refuses_a_foreign_prefix_and_resumes_its_own(embedded_root, user_dir, tmp_path, capsys):
    before = snapshot(user_dir)
    err = fails_cleanly(capsys, ["make-shards", str(embedded_root / "train"), str(user_dir)])
    assert f"'{user_dir}' is not empty (notes.txt, train) and was not written by this command" in err
    assert snapshot(user_dir) == before

    images = tmp_path / "few"
    for name in ("a", "b"):
        (images / name).mkdir(parents=True)
        for src in sorted((embedded_root / "train" / "astronaut").glob("*.jpg"))[:3]:
            (images / name / src.name).write_bytes(src.read_bytes())
    out = tmp_path / "shards"
    first = make_shards(str(images), str(out), 4, workers=1)
    leftover = out / (remote_io.TEMPORARY.format(name="shard-000001.tar") + "deadbeef")
    leftover.write_bytes(b"half a shard")  # what a write killed midway leaves
    theirs = out / ".results.csv.tmp-1"  # not a name make-shards writes: kept
    theirs.write_text("x")
    again = make_shards(str(images), str(out), 4, workers=1)  # the same job: a re-run is fine
    assert again == first and not leftover.exists() and theirs.exists()
    err = fails_cleanly(capsys, ["make-shards", str(images), str(out), "--shard-size", "3"])
    assert "holds the output of another make-shards (it differs in shard_size)" in err


def test_index_shards_and_export_keep_existing_files(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{}")
    err = fails_cleanly(capsys, ["index-shards", str(tmp_path)])
    assert "manifest.json exists already and is left as it is" in err
    assert (tmp_path / "manifest.json").read_text() == "{}"
    (tmp_path / "vit.safetensors").write_text("mine")
    err = fails_cleanly(capsys, ["export-timm", str(tmp_path), str(tmp_path / "vit.safetensors")])
    assert "vit.safetensors exists already" in err and (tmp_path / "vit.safetensors").read_text() == "mine"


@pytest.mark.parametrize("where", ["local", "gs"])
def test_claimed_output_takes_only_its_own_job(where, tmp_path, request):
    prefix = str(tmp_path / "targets") if where == "local" else f"{request.getfixturevalue('gcs_bucket')}/targets"
    job = {"command": "precompute-targets", "teacher": "ViT-H-14", "num_views": 5}
    remote_io.claim_output(prefix, job, "fix")
    remote_io.claim_output(prefix, job, "fix")  # a re-run of the same job resumes
    with pytest.raises(ConfigError, match=r"another precompute-targets \(it differs in num_views\)"):
        remote_io.claim_output(prefix, {**job, "num_views": 1}, "fix")
    other = str(tmp_path / "other") if where == "local" else f"{request.getfixturevalue('gcs_bucket')}/other"
    remote_io.write_bytes_atomic(f"{other}/data.bin", b"theirs")
    with pytest.raises(ConfigError, match=r"is not empty \(data.bin\) and was not written by this command"):
        remote_io.claim_output(other, job, "fix")
    assert remote_io.read_bytes(f"{other}/data.bin") == b"theirs"


def test_checkpoint_store_removes_its_own_interrupted_save(tmp_path):
    """A save killed mid-way leaves DCP's files of its step without commit.json: removed at the
    next start. A step folder holding anything else, and other folders, are left alone."""
    folder = tmp_path / "checkpoints"
    for name, files in {"4": ["__0_0.distcp", ".metadata"], "5": ["__0_0.distcp", "notes.txt"],
                        "scratch": ["__0_0.distcp"]}.items():
        (folder / name).mkdir(parents=True)
        for f in files:
            (folder / name / f).write_bytes(b"x")
    Checkpoints(str(tmp_path), 2, Runtime("fp32"))
    assert sorted(p.name for p in folder.iterdir()) == ["5", "scratch"]


def test_knn_appends_to_a_shared_metrics_file(tmp_path):
    """k-NN logs into any output_dir, e.g. the pre-training run's: its rows must stay."""
    rows = '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    (tmp_path / "metrics.jsonl").write_text(rows)
    MetricsLogger(str(tmp_path), True).close()  # as knn() opens it
    assert (tmp_path / "metrics.jsonl").read_text() == rows
    MetricsLogger(str(tmp_path), True, start_step=1).close()  # a training run resumed at step 1
    assert (tmp_path / "metrics.jsonl").read_text() == rows.splitlines(keepends=True)[0]
    moved, = tmp_path.glob("metrics.jsonl.replaced-*")  # the row after step 1 moved aside, not deleted
    assert moved.read_text() == rows.splitlines(keepends=True)[1]


# --- bad input: one line, exit 2 ------------------------------------------------------------------
def test_malformed_yaml_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: tiny\n  segments: [2, 2\ntrain:\n  epochs: 1\n")
    err = fails_cleanly(capsys, ["pretrain", "--config", str(bad)])
    assert f"{bad}:4:6: malformed YAML" in err
    err = fails_cleanly(capsys, ["pretrain", "objective.segments=[2,"])
    assert "override 'objective.segments=[2,':1:4: malformed YAML" in err


# Whether torch_xla is installed here: the tests below hold in both test environments (make test,
# with it; make test-current-torch, without it).
TORCH_XLA = importlib.util.find_spec("torch_xla") is not None


@pytest.mark.parametrize("argv", [["pretrain", "runtime.backend=cuda"], ["info", "--backend", "cuda"]])
def test_unavailable_backend_says_what_was_found(argv, capsys, monkeypatch):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)  # an in-process XLA runtime of another test sets it
    err = fails_cleanly(capsys, argv)
    found = f"no TPU, 0 CUDA GPUs, torch_xla {'installed' if TORCH_XLA else 'not installed'}"
    assert f"runtime.backend=cuda, but no CUDA GPU is visible (found: {found})" in err
    assert f"pass runtime.backend={'xla' if TORCH_XLA else 'cpu'} or auto" in err


# --- the auto backend: a TPU, else a GPU, else XLA:CPU, else the CPU --------------------------------
@pytest.mark.parametrize("seen,backend", [
    (MachineDevices(None, tpu=True, gpus=0, torch_xla=True), "xla"),
    (MachineDevices(None, tpu=True, gpus=8, torch_xla=True), "xla"),
    (MachineDevices(None, tpu=False, gpus=1, torch_xla=True), "cuda"),  # the README's install on a GPU box
    (MachineDevices(None, tpu=False, gpus=2, torch_xla=False), "cuda"),
    (MachineDevices(None, tpu=False, gpus=0, torch_xla=True), "xla"),
    (MachineDevices(None, tpu=False, gpus=0, torch_xla=False), "cpu"),
    (MachineDevices("CPU", tpu=False, gpus=1, torch_xla=True), "xla"),  # the user asked for XLA
])
def test_auto_backend_order(seen, backend):
    chosen, why = choose_backend("auto", seen)
    assert chosen == backend and why.startswith("auto: ")


def test_auto_backend_errors():
    with pytest.raises(ConfigError, match="a TPU is visible but torch_xla is not installed"):
        choose_backend("auto", MachineDevices(None, tpu=True, gpus=0, torch_xla=False))
    with pytest.raises(ConfigError, match="needs torch_xla, which is not installed.*runtime.backend=cuda"):
        choose_backend("xla", MachineDevices(None, tpu=False, gpus=1, torch_xla=False))


def test_probe_sees_what_the_machine_shows(monkeypatch):
    """The probe reads the environment and whether torch_xla is installed; with torch_xla, as a
    TPU VM has it, the environment decides the auto backend (without: test_auto_backend_errors)."""
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    here = MachineDevices.probe()
    assert (here.pjrt_device, here.tpu, here.gpus, here.torch_xla) == (None, False, 0, TORCH_XLA)  # this machine: CPUs
    assert choose_backend("auto", here) == (
        ("xla", "auto: no TPU or GPU visible; torch_xla is installed (XLA:CPU)") if TORCH_XLA else
        ("cpu", "auto: no TPU or GPU visible and torch_xla is not installed"))
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # what a TPU VM sets
    tpu_vm = replace(MachineDevices.probe(), torch_xla=True)
    assert tpu_vm.tpu and choose_backend("auto", tpu_vm)[1] == "auto: a TPU is visible"
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    asked = MachineDevices.probe()
    assert asked.pjrt_device == "CPU" and asked.torch_xla == TORCH_XLA
    assert choose_backend("auto", replace(asked, torch_xla=True))[1] == "auto: PJRT_DEVICE=CPU is set"


def test_only_the_runtime_calls_torch_cuda():
    """Device code stays in runtime.py: the rest asks the runtime (synchronize, peak_memory, ...)."""
    cuda = re.compile(r"\btorch\.cuda\b|^\s*from torch import cuda", re.M)
    sources = [*(REPO / "xla_trainer").rglob("*.py"), REPO / "gpu_scripts" / "bench_matrix.py"]
    callers = sorted(str(p.relative_to(REPO)) for p in sources if cuda.search(p.read_text()))
    assert callers == ["xla_trainer/runtime.py"]


def test_the_eager_runtime_knows_no_device_but_its_device_type():
    """A new eager device (TorchTPU's `tpu`, docs/torchtpu.md) is a small subclass: the base
    classes name no device; CUDA lives in CudaRuntime (and the machine probe) alone."""
    for cls in (Runtime, EagerRuntime):
        source = inspect.getsource(cls)
        assert not re.search(r"torch\.cuda|\.CUDA\b|\"cuda\"|\"nccl\"", source), cls.__name__
    assert (EagerRuntime.device_type, EagerRuntime.process_group_backend) == ("cpu", "gloo")
    assert (CudaRuntime.device_type, CudaRuntime.process_group_backend) == ("cuda", "nccl")


@pytest.fixture
def tf32_flags():
    """torch's process-wide TF32 flags put back as they were after the test (monkeypatch cannot:
    they are properties of torch's backend modules, which it would delete)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("flags", [True, False])
def test_cuda_runtime_without_options_applies_the_default_tf32(flags, tf32_flags, monkeypatch):
    """options=None means RuntimeConfig's defaults (tf32 off), applied to torch's real backend
    flags; only the GPU selection, which needs a GPU, is left out here."""
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = flags
    runtime = CudaRuntime("bf16", options=None)
    assert runtime.options.tf32 is False
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False


def test_info_says_which_backend_and_why(capsys):
    assert main(["info", "--backend", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "cpu" and info["backend_reason"] == "runtime.backend=cpu"
