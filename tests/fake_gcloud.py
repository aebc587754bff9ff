"""A stand-in for `gcloud` in the preemption simulation (tests/test_supervise.py): exactly the
commands tpu_scripts/ and xla_trainer/supervise.py send, for one one-host slice whose worker is this
machine. Anything else exits 64, so a script that starts using a new command fails loudly here.

State lives in $FAKE_TPU_DIR: cloud.json (the slice: name, kind, state, generation; absent when
there is none), faults.json (the faults still to inject, in order), home/ (the worker's $HOME, wiped
when the slice is deleted, as a new VM's disk is empty), shims/ (the worker image's python3, put first
on the worker's PATH), calls.log (every call) and events.log (every fault injected).

Faults, consumed in order: {"kind": "stockout"} makes the next create fail (a queued resource goes
FAILED; an on-demand create exits 1). {"kind": "preempt", "at_step": N} and {"kind": "hang",
"at_step": N} are injected by a watcher process (started with the slice, like the cloud's own
maintenance) once the job's progress reaches step N: a preemption sends SIGTERM to the worker's jobs'
process groups, SIGKILL after $FAKE_TPU_GRACE seconds, and leaves the slice SUSPENDED (an on-demand VM
PREEMPTED); a hang SIGSTOPs them (alive, silent). Progress is the last "step" of $FAKE_TPU_METRICS (a
metrics.jsonl) or, with $FAKE_TPU_PROGRESS_GLOB, the number of files that glob matches.

Run with `python -S` (no site-packages): it is called twice per supervisor poll."""
import contextlib
import fcntl
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

DIR = os.environ["FAKE_TPU_DIR"]
CLOUD, FAULTS, HOME = (os.path.join(DIR, n) for n in ("cloud.json", "faults.json", "home"))
LIVE = ("ACTIVE", "READY")


@contextlib.contextmanager
def locked():
    with open(os.path.join(DIR, "lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def read(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def write(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def note(name, line):
    with open(os.path.join(DIR, name), "a") as f:
        f.write(line + "\n")


def fail(message, code=1):
    print(f"ERROR: (gcloud) {message}", file=sys.stderr)
    sys.exit(code)


def job_groups():
    """The process groups of the jobs launch.sh started on the worker (their pid files)."""
    groups = []
    for f in glob.glob(os.path.join(HOME, "xla-trainer-logs", "*.pid")):
        with contextlib.suppress(ValueError, FileNotFoundError):
            groups.append(int(open(f).read()))
    return groups


def signal_jobs(sig):
    for g in job_groups():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, sig)


def any_job_alive():
    for g in job_groups():
        try:
            os.killpg(g, 0)
            return True
        except ProcessLookupError:
            pass
    return False


# --- the slice ------------------------------------------------------------------------------------
def create(name, kind):
    with locked():
        cloud = read(CLOUD, None)
        if cloud:
            fail(f"ALREADY_EXISTS: {kind} {name} exists ({cloud['state']})")
        faults = read(FAULTS, [])
        stockout = bool(faults) and faults[0]["kind"] == "stockout"
        if stockout:
            write(FAULTS, faults[1:])
            note("events.log", "stockout")
            if kind == "vm":
                fail("RESOURCE_EXHAUSTED: there is no more capacity in the zone")
        generation = read(os.path.join(DIR, "generation.json"), 0) + 1
        write(os.path.join(DIR, "generation.json"), generation)
        state = "FAILED" if stockout else ("ACTIVE" if kind == "queued" else "READY")
        write(CLOUD, {"name": name, "kind": kind, "state": state, "generation": generation})
        os.makedirs(HOME, exist_ok=True)
    if not stockout:
        subprocess.Popen([sys.executable, "-S", __file__, "--watch", str(generation)], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def describe(name, kind):
    cloud = read(CLOUD, None)
    if not cloud or cloud["name"] != name or cloud["kind"] != kind:
        fail(f"NOT_FOUND: {name}")
    print(cloud["state"])


def delete(name, kind):
    with locked():
        cloud = read(CLOUD, None)
        if not cloud or cloud["name"] != name or cloud["kind"] != kind:
            fail(f"NOT_FOUND: {name}")
        signal_jobs(signal.SIGKILL)  # the VM is gone, and with it its disk
        shutil.rmtree(HOME, ignore_errors=True)
        os.remove(CLOUD)
    print(f"Deleted {name}.", file=sys.stderr)


def live_or_fail(name):
    cloud = read(CLOUD, None)
    if not cloud or cloud["name"] != name or cloud["state"] not in LIVE:
        fail(f"ssh: connect to host {name} port 22: Connection refused", 255)


def ssh(name, command):
    live_or_fail(name)
    env = {**os.environ, "HOME": HOME, "PATH": f"{os.path.join(DIR, 'shims')}:{os.environ['PATH']}"}
    os.chdir(HOME)
    os.execvpe("bash", ["bash", "-c", command], env)


def scp(source, target):
    name, dest = target.split(":", 1)
    live_or_fail(name)
    shutil.copy(source, os.path.join(HOME, dest))


# --- the faults the watcher injects -------------------------------------------------------------------
def progress():
    pattern = os.environ.get("FAKE_TPU_PROGRESS_GLOB")
    if pattern:
        return len(glob.glob(pattern))
    try:
        with open(os.environ["FAKE_TPU_METRICS"], "rb") as f:
            lines = f.read().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def preempt():
    live = "ACTIVE" if read(CLOUD, {}).get("kind") == "queued" else "READY"
    set_state("SUSPENDING" if live == "ACTIVE" else "STOPPING")
    signal_jobs(signal.SIGTERM)
    deadline = time.time() + float(os.environ.get("FAKE_TPU_GRACE", "5"))
    while any_job_alive() and time.time() < deadline:
        time.sleep(0.05)
    signal_jobs(signal.SIGKILL)
    set_state("SUSPENDED" if live == "ACTIVE" else "PREEMPTED")


def set_state(state):
    with locked():
        cloud = read(CLOUD, None)
        if cloud:
            write(CLOUD, {**cloud, "state": state})


def watch(generation):
    """Inject the next step-triggered fault once the job's progress reaches its step; end with the slice."""
    while True:
        cloud = read(CLOUD, None)
        if not cloud or cloud["generation"] != generation or cloud["state"] not in LIVE:
            return
        faults = read(FAULTS, [])
        if faults and "at_step" in faults[0] and progress() >= faults[0]["at_step"]:
            fault = faults[0]
            with locked():
                write(FAULTS, read(FAULTS, [])[1:])
            note("events.log", f"{fault['kind']} at step {progress()}")
            if fault["kind"] == "preempt":
                return preempt()
            signal_jobs(signal.SIGSTOP)  # a hang: alive, silent
        time.sleep(0.05)


def main(argv):
    if argv[:1] == ["--watch"]:
        return watch(int(argv[1]))
    note("calls.log", " ".join(argv))
    words = [w for w in argv if not w.startswith("--")]
    flags = dict(w[2:].split("=", 1) for w in argv if w.startswith("--") and "=" in w)
    if "--command" in argv:
        flags["command"] = argv[argv.index("--command") + 1]
    kinds = {"queued-resources": "queued", "tpu-vm": "vm"}
    if words[:2] != ["compute", "tpus"] or len(words) < 5 or words[2] not in kinds:
        fail(f"the fake gcloud does not know `gcloud {' '.join(argv)}`", 64)
    kind, verb, name = kinds[words[2]], words[3], words[4]
    if verb == "create":
        return create(name, kind)
    if verb == "describe":
        return describe(name, kind)
    if verb == "delete":
        return delete(name, kind)
    if kind == "vm" and verb == "ssh":
        return ssh(name, flags["command"])
    if kind == "vm" and verb == "scp":
        return scp(words[4], words[5])
    fail(f"the fake gcloud does not know `gcloud {' '.join(argv)}`", 64)


if __name__ == "__main__":
    main(sys.argv[1:])
