"""Keep one pretrain or precompute-targets job alive on a spot (or on-demand) TPU slice until it is
finished: create the slice, set it up, launch; poll the slice and the job; on a preemption, a hung
job or a job that died, stop what is left, delete the slice, recreate it and relaunch (the trainer
resumes from its newest intact checkpoint); once the job's completion record exists, delete the slice
and exit 0. Run through tpu_scripts/supervise.sh (see tpu_scripts/README.md for the flags).

Python rather than bash because this is a state machine with counters, back-off, a JSON status file
and a lock: that reads (and is tested) better here. It uses the standard library only, so it runs
from the checkout on any workstation without the trainer's environment, and it drives the slice
through the same tpu_scripts (create, setup, launch, stop, delete) a person uses, so that there is one
gcloud invocation of each kind; it calls gcloud itself only for the two questions those scripts do
not ask: the slice's state, and the job's state on every worker.

Safety: it only ever deletes the slice it was given by --name (which it created or adopted); a
second supervisor for the same name refuses to start (a lock in --state-dir); killed and started
again, it adopts the slice and the job it finds instead of creating another."""
from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
SUBCOMMANDS = ("pretrain", "precompute-targets")
NOT_RETRIED = {2: "a configuration or input error", 3: "the run diverged (non-finite loss)"}
GONE_STATES = {"SUSPENDED", "FAILED", "PREEMPTED", "TERMINATED", "STOPPED", "DELETING"}
GOING_STATES = {"SUSPENDING", "STOPPING"}  # the workers are saving: wait for the end of it
PROBE_TAG = "xla-trainer-job"
# The trainer's exit 2 for a run lock still held: a job killed on a lost slice (no time to release
# it) leaves a gs:// lease that stays live for up to 10 minutes (runlock.py). That one is waited out.
LOCK_HELD = ("is in use by another run", "has a stale run lock")
LOCK_WAIT_SECONDS, LOCK_WAITS = 60, 12


class SupervisorError(Exception):
    """Bad input or a refused start: exit 2 with this message."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="supervise.sh", description=__doc__.split("\n\n")[0],
        usage="tpu_scripts/supervise.sh --name NAME --zone ZONE --type TYPE [options] "
              "{pretrain,precompute-targets} [--config FILE] [key=value ...]")
    a = p.add_argument
    a("--name", required=True, help="the TPU (and its queued resource with --spot)")
    a("--zone", required=True)
    a("--type", required=True, help="accelerator type, e.g. v4-32")
    a("--project", help="GCP project (default: gcloud's configured project)")
    a("--version", help="runtime version (default: create.sh's, from the type)")
    a("--spot", action="store_true", help="spot capacity through a queued resource")
    a("--repo-url", help="setup.sh --repo-url (default: copy this checkout)")
    a("--repo-dir", help="setup.sh/launch.sh --repo-dir (default ~/xla-trainer)")
    a("--job", help="launch.sh --job: the job's log/pid/rc names on the workers (default: the subcommand)")
    a("--poll-seconds", type=float, default=60.0, help="between two looks at the slice and the job")
    a("--stall-minutes", type=float, default=30.0,
      help="a job whose log has not changed for this long on a worker counts as hung")
    a("--max-restarts", type=int, default=20, help="relaunches after which the supervisor gives up")
    a("--ssh-retries", type=int, default=5, help="failed looks at the workers in a row that count as a lost slice")
    a("--create-backoff-seconds", type=float, default=60.0,
      help="wait after the first failed create (stock-out); doubled after each, up to --max-backoff-minutes")
    a("--max-backoff-minutes", type=float, default=30.0)
    a("--max-failed-creates", type=int, default=100, help="failed creates in a row after which it gives up")
    a("--stop-grace", type=int, default=300, help="stop.sh --grace: seconds for the job to save after SIGTERM")
    a("--keep", action="store_true", help="keep the slice when the run has finished")
    a("--state-dir", help="where the supervisor log, status.json and lock go (default ~/xla-trainer-supervisor/NAME)")
    a("--dry-run", action="store_true", help="print the commands of a first start (create, setup, launch), run none")
    a("command", nargs=argparse.REMAINDER, help="the xla-trainer subcommand and its arguments, as for launch.sh")
    args = p.parse_args(argv)
    check_args(args)
    return args


def override(command: list[str], key: str) -> str | None:
    """The value of the last `key=value` override in the xla-trainer command line, or None."""
    values = [w.split("=", 1)[1] for w in command if w.startswith(f"{key}=")]
    return values[-1] if values else None


def completion_url(command: list[str]) -> str:
    """Where the finished job leaves its record: pretrain's <train.output_dir>/done.json,
    precompute-targets' <targets.prefix>/manifest.json (written once every shard is)."""
    key, name = ("train.output_dir", "done.json") if command[0] == "pretrain" else ("targets.prefix", "manifest.json")
    where = override(command, key)
    if not where:
        raise SupervisorError(f"give {key}=... on the command line: the supervisor reads {name} there to know the "
                              f"job is finished (gs://bucket/..., where a new slice can resume from)")
    if "://" not in where and not where.startswith("/"):
        raise SupervisorError(f"{key}={where} is relative to a worker's disk, which a preemption takes with it: "
                              f"use gs://bucket/... (or an absolute path on storage the supervisor can read)")
    return f"{where.rstrip('/')}/{name}"


def check_args(args):
    if not args.command or args.command[0] not in SUBCOMMANDS:
        got = f"'{args.command[0]}'" if args.command else "nothing"
        raise SupervisorError(f"the command to keep alive must be pretrain or precompute-targets (got {got}), "
                              f"e.g. ... pretrain --config FILE train.output_dir=gs://bucket/run")
    args.done_url = completion_url(args.command)
    if not args.dry_run and not shutil.which("gcloud"):
        raise SupervisorError("gcloud not found on PATH (https://cloud.google.com/sdk/docs/install)")
    args.job = args.job or args.command[0]
    args.state_dir = Path(args.state_dir or Path.home() / "xla-trainer-supervisor" / args.name)


# --- the slice and the job, through gcloud and tpu_scripts -------------------------------------------
class Slice:
    def __init__(self, args, log):
        self.args, self.log = args, log
        self.loc = ["--zone", args.zone] + (["--project", args.project] if args.project else [])

    def script(self, name: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
        a = self.args
        flags = ["--name", a.name, "--zone", a.zone] + (["--project", a.project] if a.project else [])
        argv = [str(SCRIPTS / name), *flags, *extra]
        if self.log:
            self.log.event(f"run {shlex.join([f'tpu_scripts/{name}', *flags[:2], *extra])}")
        return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})

    def state(self) -> str | None:
        """The queued resource's (--spot) or the VM's state; None if there is none; '?' if gcloud failed."""
        kind = ["queued-resources", "describe", self.args.name, *self.loc, "--format=value(state.state)"] \
            if self.args.spot else ["tpu-vm", "describe", self.args.name, *self.loc, "--format=value(state)"]
        p = subprocess.run(["gcloud", "compute", "tpus", *kind], capture_output=True, text=True)
        if p.returncode == 0:
            return p.stdout.strip() or "?"
        return None if "NOT_FOUND" in p.stderr else "?"

    def ssh(self, worker: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.args.name, *self.loc,
                               f"--worker={worker}", "--command", command], capture_output=True, text=True)

    def probe(self) -> list[dict] | None:
        """The job on every worker: running / exited with a status / vanished (neither), the age of
        its log in seconds and the progress its bar showed last; None if ssh failed."""
        f = f"~/xla-trainer-logs/{self.args.job}"
        cmd = (f"f={f}; now=$(date +%s); "
               # the status file first: a job.sh that wrote it has ended, even if not yet reaped (a zombie)
               'if [ -e $f.rc ]; then s="exited $(cat $f.rc)"; '
               'elif [ -e $f.pid ] && kill -0 "$(cat $f.pid)" 2>/dev/null; then s="running -"; '
               'elif [ -e $f.log ]; then s="vanished -"; '
               'else s="none -"; fi; '
               'age=$((now - $(stat -c %Y $f.log 2>/dev/null || echo $now))); '
               "bar=$(tail -c 4000 $f.log 2>/dev/null | tr '\\r' '\\n' | grep -o '[0-9][0-9]*/[0-9][0-9]*' | tail -n 1); "
               f'echo "{PROBE_TAG} $(hostname) $age ${{bar:--}} $s"')
        p = self.ssh("all", cmd)
        rows = [line.split() for line in p.stdout.splitlines() if line.startswith(PROBE_TAG + " ")]
        if p.returncode != 0 or not rows:
            return None
        return [{"host": r[1], "log_age": int(r[2]), "progress": r[3], "state": r[4],
                 "rc": int(r[5]) if r[5].lstrip("-").isdigit() else None} for r in rows]

    def last_lines(self, n: int = 30) -> str:
        p = self.ssh("0", f"tail -n {n} ~/xla-trainer-logs/{self.args.job}.log | tr '\\r' '\\n' | tail -n {n}")
        return p.stdout if p.returncode == 0 else f"(could not read the log: {p.stderr.strip()[-300:]})"


def first_start(a) -> list[tuple[str, list[str]]]:
    """(script, its arguments past --name/--zone/--project) for create, setup and launch."""
    repo_dir = ["--repo-dir", a.repo_dir] if a.repo_dir else []
    return [("create.sh", ["--type", a.type, *(["--version", a.version] if a.version else []),
                           *(["--spot"] if a.spot else [])]),
            ("setup.sh", [*(["--repo-url", a.repo_url] if a.repo_url else []), *repo_dir]),
            ("launch.sh", ["--job", a.job, *repo_dir, *a.command])]


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def read_url(url: str) -> bytes | None:
    """A small file at a local path or a gs:// URL (through gcloud storage), None if absent."""
    if "://" not in url:
        try:
            return Path(url).read_bytes()
        except FileNotFoundError:
            return None
    p = subprocess.run(["gcloud", "storage", "cat", url], capture_output=True)
    return p.stdout if p.returncode == 0 else None


# --- the supervisor's own records -----------------------------------------------------------------
@dataclass
class Status:
    slice: str
    job: str
    state: str = "starting"
    restarts: int = 0
    failed_creates: int = 0
    last_progress: str | None = None
    last_event: str = ""
    updated: str = ""
    supervisor_pid: int = field(default_factory=os.getpid)


class Records:
    """One timestamped line per event in supervise.log, and status.json rewritten (atomically) on each."""

    def __init__(self, state_dir: Path, status: Status):
        self.dir, self.status = state_dir, status
        self.path = state_dir / "supervise.log"

    def event(self, message: str, **changes):
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        line = f"{now} {self.status.slice}: {message}"
        print(line, file=sys.stderr, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        self.update(last_event=message, **changes)

    def update(self, **changes):
        for k, v in changes.items():
            setattr(self.status, k, v)
        self.status.updated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        tmp = self.dir / ".status.json.tmp"
        tmp.write_text(json.dumps(asdict(self.status), indent=1) + "\n")
        tmp.replace(self.dir / "status.json")


def take_lock(state_dir: Path, name: str):
    """An flock held for the supervisor's life: a second one for the same TPU refuses, naming the first."""
    state_dir.mkdir(parents=True, exist_ok=True)
    f = open(state_dir / "supervise.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise SupervisorError(f"another supervisor (pid {f.read().strip() or '?'}) is keeping {name} alive; "
                              f"see {state_dir}/status.json (stop that one first)") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def previous_status(state_dir: Path, name: str, job: str) -> Status:
    """The counts a killed supervisor left, so that they go on (the bounds hold across its restarts);
    fresh ones after a supervisor that ended (finished, or gave up and a person looked)."""
    try:
        old = json.loads((state_dir / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return Status(name, job)
    if old.get("state", "").startswith(("finished", "stopped")):
        return Status(name, job)
    return Status(name, job, restarts=old.get("restarts", 0), failed_creates=old.get("failed_creates", 0),
                  last_progress=old.get("last_progress"))


# --- the state machine ------------------------------------------------------------------------------
class GiveUp(Exception):
    """The supervisor stops; exit with `code`, keeping the slice."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Supervisor:
    def __init__(self, args, records: Records):
        self.args, self.rec = args, records
        self.tpu = Slice(args, records)
        self.ssh_failures = self.describe_failures = self.lock_waits = 0

    # one pass of the loop: look, then act --------------------------------------------------------
    def run(self) -> int:
        self.rec.event(f"supervising `{shlex.join(self.args.command)}`; done when {self.args.done_url} exists")
        self.adopt_or_create()
        while True:
            verdict = self.look()
            if verdict == "finished":
                return self.finish()
            if verdict == "run lock held":
                self.relaunch_after_lock_wait()
            elif verdict != "running":
                self.restart(verdict)
            time.sleep(self.args.poll_seconds)

    def look(self) -> str:
        """'running', 'finished', or why the job needs a restart; raises GiveUp for a job not to retry."""
        state = self.tpu.state()
        if state == "?":  # gcloud itself failed (network, auth): look again next time, and say so
            self.describe_failures += 1
            if self.describe_failures % (self.args.ssh_retries + 1) == 0:
                self.rec.event(f"gcloud failed to describe {self.args.name} {self.describe_failures} times in a row")
            return "running"
        self.describe_failures = 0
        if state is None or state in GONE_STATES:
            return f"slice {state or 'gone'}"
        if state in GOING_STATES:
            self.rec.update(state=f"slice {state}")
            return "running"  # the workers got SIGTERM and are saving: the next look sees it end
        if state not in ("ACTIVE", "READY"):
            return "running"  # still being created or repaired
        workers = self.tpu.probe()
        if workers is None:
            self.ssh_failures += 1
            return f"ssh failed {self.ssh_failures} times" if self.ssh_failures > self.args.ssh_retries else "running"
        self.ssh_failures = 0
        return self.judge(workers)

    def judge(self, workers: list[dict]) -> str:
        progress = next((w["progress"] for w in workers if w["progress"] != "-"), self.rec.status.last_progress)
        if progress != self.rec.status.last_progress:
            self.rec.update(last_progress=progress, state="running")
        states = {w["state"] for w in workers}
        if "running" in states:
            stale = [w for w in workers if w["state"] == "running" and w["log_age"] > self.args.stall_minutes * 60]
            return f"hung on {stale[0]['host']} (log silent {stale[0]['log_age']} s)" if stale else "running"
        codes = [w["rc"] for w in workers if w["state"] == "exited"]
        for code, why in NOT_RETRIED.items():
            if code in codes:
                lines = self.tpu.last_lines()
                if code == 2 and any(m in lines for m in LOCK_HELD) and self.lock_waits < LOCK_WAITS:
                    return "run lock held"
                raise GiveUp(f"the job exited {code}: {why}; not relaunched (a relaunch would fail the same "
                             f"way). Its last lines on worker 0:\n{lines}", code)
        if codes and all(c == 0 for c in codes) and len(codes) == len(workers):
            if read_url(self.args.done_url) is not None:
                return "finished"
            return "exited 0 before its schedule was complete (stopped by SIGTERM?)"
        if states == {"none"}:
            return "no job on the slice"
        return f"job ended ({', '.join(sorted(states))}, exit {sorted(set(c for c in codes if c is not None))})"

    # actions --------------------------------------------------------------------------------------
    def adopt_or_create(self):
        state = self.known_state()
        if state in ("ACTIVE", "READY"):
            workers = self.tpu.probe()
            if workers and any(w["state"] != "none" for w in workers):
                self.rec.event(f"adopted {self.args.name} ({state}) and its job {self.args.job}", state="running")
                return
            self.rec.event(f"adopted {self.args.name} ({state}); no job there yet")
            self.set_up_and_launch()
            return
        if state is not None:
            self.rec.event(f"found {self.args.name} {state}: deleting it to create it again")
            self.delete()
        self.create()
        self.set_up_and_launch()

    def known_state(self) -> str | None:
        """The slice's state, asking again while gcloud fails: an unknown state must not get a slice deleted."""
        for _ in range(self.args.ssh_retries + 1):
            state = self.tpu.state()
            if state != "?":
                return state
            time.sleep(self.args.poll_seconds)
        raise GiveUp(f"gcloud could not describe {self.args.name} {self.args.ssh_retries + 1} times in a row "
                     f"(run it by hand: is it logged in, and the zone and project right?)")

    def restart(self, why: str):
        status = self.rec.status
        if status.restarts >= self.args.max_restarts:
            raise GiveUp(f"{why}; --max-restarts {self.args.max_restarts} reached, giving up")
        self.rec.event(f"restart {status.restarts + 1} (job at {status.last_progress or '?'}): {why}",
                       restarts=status.restarts + 1, state="restarting")
        same_slice = why.startswith(("exited 0", "no job", "job ended"))
        if same_slice or why.startswith("hung"):  # a lost slice has nothing left to stop
            self.stop_job()
        if not same_slice:  # a lost or hung slice: a new one (a hung host does not heal by a relaunch)
            self.delete()
            self.create()
        self.set_up_and_launch()

    def relaunch_after_lock_wait(self):
        """Relaunch (not a restart: nothing failed) once the lease of the killed job may be stale, taking
        it over then (train.take_over takes only a stale lease, never a live one)."""
        self.lock_waits += 1
        self.rec.event(f"the run lock in {override(self.args.command, 'train.output_dir')} is still held (by the job "
                       f"killed before, or by another run); relaunching with train.take_over=true in "
                       f"{LOCK_WAIT_SECONDS} s (wait {self.lock_waits} of {LOCK_WAITS})", state="waiting for the run lock")
        time.sleep(LOCK_WAIT_SECONDS)
        if override(self.args.command, "train.take_over") != "true":
            self.args.command.append("train.take_over=true")
        self.launch()

    def stop_job(self):
        p = self.tpu.script("stop.sh", "--job", self.args.job, "--grace", str(self.args.stop_grace))
        if p.returncode != 0:
            self.rec.event(f"stop.sh failed: {last_line(p.stderr)}")

    def delete(self):
        p = self.tpu.script("delete.sh", "--yes", *(["--spot"] if self.args.spot else []))
        if p.returncode != 0 and self.tpu.state() is not None:
            raise GiveUp(f"could not delete {self.args.name}: {p.stderr.strip()[-500:]}")

    def create(self):
        """create.sh until it succeeds, backing off (doubling) after each failure: a stock-out."""
        a, wait, failures = self.args, self.args.create_backoff_seconds, 0
        extra = first_start(a)[0][1]
        while True:
            p = self.tpu.script("create.sh", *extra, env={"POLL_SECONDS": str(a.poll_seconds)})
            if p.returncode == 0:
                self.rec.event(f"created {a.name}", state="setting up")
                return
            failures += 1
            self.rec.event(f"create failed ({last_line(p.stderr) or p.returncode}); "
                           f"retrying in {wait:g} s", failed_creates=self.rec.status.failed_creates + 1,
                           state="waiting for capacity")
            if failures >= a.max_failed_creates:
                raise GiveUp(f"{failures} creates failed in a row (--max-failed-creates)")
            if self.tpu.state() is not None:  # a FAILED queued resource keeps the name until deleted
                self.delete()
            time.sleep(wait)
            wait = min(wait * 2, a.max_backoff_minutes * 60)

    def set_up_and_launch(self):
        if self.run_script(*first_start(self.args)[1]):
            self.launch()

    def launch(self):
        if self.run_script(*first_start(self.args)[2]):
            self.rec.event(f"launched {self.args.job}", state="running")

    def run_script(self, script: str, extra: list[str]) -> bool:
        """True if it succeeded; False if the slice was lost meanwhile (the next look sees that)."""
        p = self.tpu.script(script, *extra)
        if p.returncode == 0:
            return True
        if self.tpu.state() in ("ACTIVE", "READY"):  # not a lost slice: a person must look
            raise GiveUp(f"{script} failed on a live slice:\n{p.stderr.strip()[-2000:]}")
        self.rec.event(f"{script} failed; the slice is no longer ACTIVE")
        return False

    def finish(self) -> int:
        self.rec.event(f"finished: {self.args.done_url} exists", state="finished")
        if self.args.keep:
            self.rec.event(f"kept {self.args.name} (--keep)")
        else:
            self.delete()
            self.rec.event(f"deleted {self.args.name}", state="finished, slice deleted")
        return 0


def dry_run(args) -> int:
    """The first start's commands, as the scripts' own --dry-run prints them."""
    tpu = Slice(args, None)
    for name, extra in first_start(args):
        p = tpu.script(name, "--dry-run", *extra)
        sys.stdout.write(p.stdout)
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            return p.returncode
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.dry_run:
            return dry_run(args)
        lock = take_lock(args.state_dir, args.name)
    except SupervisorError as e:
        print(f"supervise.sh: error: {e}", file=sys.stderr)
        return 2
    records = Records(args.state_dir, previous_status(args.state_dir, args.name, args.job))
    try:
        return Supervisor(args, records).run()
    except GiveUp as e:
        records.event(f"stopped: {e}", state=f"stopped ({e.code})")
        where = f"--name {args.name} --zone {args.zone}" + (f" --project {args.project}" if args.project else "")
        print(f"the slice {args.name} is kept: inspect it (tpu_scripts/logs.sh {where}), then "
              f"tpu_scripts/delete.sh{' --spot' if args.spot else ''} {where}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        records.event("interrupted: the slice and the job are left as they are; run again to adopt them",
                      state="supervisor interrupted")
        return 130
    finally:
        lock.close()


if __name__ == "__main__":
    sys.exit(main())
