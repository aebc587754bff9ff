"""The bench matrix of gpu_scripts/device_check.sh: ViT-B/16 D-iGPT steps on one CUDA GPU, then the
input pipeline, as one JSON file and a Markdown table.

Rows, most wanted first (a row that no longer fits the time budget is recorded as skipped):
  precomputed b256   targets in the batch (the teacher leaves the step), torch.compile
  online b256        the ViT-H/14 teacher in the step (random weights: no download); b128 on OOM
  baseline b256      the precomputed step through `xla-trainer bench --baseline official` (its
                     result keys baseline_images_per_sec, baseline_ms_per_step, speedup_vs_baseline)
  bench-data         `xla-trainer bench-data`, 16 loader workers, on synthetic ImageNet-sized shards
  precomputed b512   the larger batch, where it fits
  FSDP2 b256         the precomputed row with runtime.mesh=[1,-1] under torchrun over every visible
                     GPU (FSDP2 over NCCL, bf16 params, fp32 reduction); skipped on fewer than 2 GPUs
                     (NCCL takes one process per GPU: a one-GPU mesh shards nothing)

Each row runs in a child process of its own under a timeout (an OOM or a hung compile costs that row
only, and its peak memory starts from zero): the bench rows call xla_trainer.bench.bench in that
child and read the runtime's peak_memory() after it; the baseline and data rows run the CLI,
so this file depends on no internals of theirs. Run from the repository root:

    python3 -m gpu_scripts.bench_matrix --out device_check_out/device_check.json [--budget 300] [--dry-run]
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/digpt/vit_b16_in1k.yaml"
# cuda, compiled; a random teacher (teacher.pretrained=null): open_clip builds ViT-H-14 without a download
COMMON = ["runtime.backend=cuda", "runtime.torch_compile=true", "teacher.pretrained=null"]
MIN_ROW_SECONDS = 45  # a row with less time left than this is skipped, not started
ROW_MARK = "BENCH_ROW "  # the child's result line


# --- a child: one bench row in this process -----------------------------------------------------
def bench_row(overrides: list[str], steps: int, warmup: int) -> dict:
    import torch
    from xla_trainer.bench import bench
    from xla_trainer.config import load_config
    from xla_trainer.loop import make_runtime
    cfg = load_config(CONFIG, overrides)
    runtime = make_runtime(cfg)
    runtime.reset_peak_memory()
    try:
        result = bench(cfg, steps=steps, warmup=warmup, runtime=runtime)
    except Exception as e:  # an OOM can surface wrapped (e.g. by the compiler): judge by its text
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return {"status": "oom", "error": str(e).strip().splitlines()[0][:300]}
        raise
    return {"status": "ok", **result, "peak_memory_gib": runtime.peak_memory() / 2**30}


# --- the parent: rows as child processes ----------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_child(argv: list[str], timeout: float, log: Path) -> tuple[int | None, str]:
    """(exit code or None on timeout, stdout). In a session of its own, so that a timeout also
    ends the compiler's worker processes; stdout and stderr also go to `log`."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    log.write_text(out)
    return code, out


def last_json(out: str, mark: str = "") -> dict | None:
    for line in reversed(out.splitlines()):
        if line.startswith(mark):
            try:
                return json.loads(line[len(mark):])
            except json.JSONDecodeError:
                continue
    return None


class Matrix:
    def __init__(self, args):
        self.args, self.rows = args, []
        self.budget = Budget(args.budget)
        self.logs = Path(args.out).parent / "logs"
        self.py = sys.executable

    def attempt(self, name: str, argv: list[str], cap: float, parse) -> dict:
        """One child run of at most `cap` seconds (less if the budget has less left)."""
        if self.args.dry_run:
            print("+ " + shlex.join(argv))
            return {"status": "dry-run"}
        timeout = min(cap, self.budget.left())
        if timeout < MIN_ROW_SECONDS:
            return {"status": "skipped", "error": f"out of time ({self.budget.left():.0f} s of the budget left)"}
        self.logs.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        code, out = run_child(argv, timeout, self.logs / f"{name}.log")
        if code is None:
            row = {"status": "timeout", "error": f"not done in {timeout:.0f} s"}
        else:
            row = parse(code, out)
        row["seconds"] = round(time.monotonic() - started, 1)
        return row

    def add(self, name: str, kind: str, batch: int, row: dict):
        row = {"row": name, "kind": kind, "batch": batch, **row}
        self.rows.append(row)
        if not self.args.dry_run:
            print(f"bench_matrix: {name}: {row['status']} ({row.get('seconds', 0)} s)", file=sys.stderr, flush=True)
        return row

    # --- the rows --------------------------------------------------------------------------------
    def steps(self) -> list[str]:
        return ["--steps", str(self.args.steps), "--warmup", str(self.args.warmup)]

    def bench(self, name: str, targets: str, batches: list[int], cap: float):
        """A bench row in a child; on OOM the next (smaller) batch."""
        for batch in batches:
            overrides = [*COMMON, f"targets.source={targets}", f"train.global_batch={batch}"]
            argv = [self.py, "-m", "gpu_scripts.bench_matrix", "--row", *self.steps(), *overrides]

            def parse(code, out):
                row = last_json(out, ROW_MARK)
                return row if row else {"status": "failed", "error": f"exit {code}: {tail(out)}"}
            row = self.add(f"{name} b{batch}", targets, batch, self.attempt(f"{name}-b{batch}", argv, cap, parse))
            if row["status"] not in ("oom", "dry-run"):  # a dry run shows the fallbacks too
                return

    def fsdp2(self, batch: int, cap: float):
        """The precomputed bench row sharded over every visible GPU, one process each (torchrun)."""
        gpus = visible_gpus()
        name = f"FSDP2 x{gpus} b{batch}"
        if gpus < 2 and not self.args.dry_run:
            self.add(name, "precomputed", batch, {"status": "skipped", "error": f"FSDP2 needs 2+ GPUs ({gpus} visible)"})
            return
        overrides = [*COMMON, "targets.source=precomputed", f"train.global_batch={batch}", "runtime.mesh=[1,-1]"]
        argv = [self.py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={max(gpus, 2)}",
                "-m", "gpu_scripts.bench_matrix", "--row", *self.steps(), *overrides]

        def parse(code, out):
            row = last_json(out, ROW_MARK)  # process 0's
            return row if code == 0 and row else {"status": "failed", "error": f"exit {code}: {tail(out)}"}
        self.add(name, "precomputed", batch, self.attempt(f"fsdp2-b{batch}", argv, cap, parse))

    def baseline(self, batch: int, cap: float):
        overrides = [*COMMON, "targets.source=precomputed", f"train.global_batch={batch}"]
        argv = [self.py, "-m", "xla_trainer", "bench", "--config", CONFIG, *self.steps(), "--baseline", "official",
                *overrides]

        def parse(code, out):
            if code == 2 and "--baseline" in out:  # argparse: this checkout's bench has no such flag
                return {"status": "n/a", "error": "this checkout's `xla-trainer bench` has no --baseline official"}
            result = last_json(out, "{")
            if code != 0 or result is None:
                return {"status": "failed", "error": f"exit {code}: {tail(out)}"}
            if "speedup_vs_baseline" not in result:
                return {"status": "n/a", **result, "error": "bench reported no baseline keys"}
            return {"status": "ok", **result}
        self.add(f"official baseline b{batch}", "precomputed", batch, self.attempt(f"baseline-b{batch}", argv, cap, parse))

    def data(self, batch: int, workers: int, cap: float):
        shards = Path(self.args.out).parent / "data" / "shards"
        make = [self.py, "-m", "gpu_scripts.bench_matrix", "--make-data", str(shards)]
        argv = [self.py, "-m", "xla_trainer", "bench-data", "--config", CONFIG, "--batches", "20",
                "data.source=shards", f"data.shards={shards}", f"data.num_workers={workers}",
                f"train.global_batch={batch}", "teacher.pretrained=null"]

        def parse(code, out):
            result = last_json(out, "{")
            return {"status": "ok", **result} if code == 0 and result else {"status": "failed",
                                                                            "error": f"exit {code}: {tail(out)}"}
        made = self.attempt("make-data", make, 120, lambda code, out: {"status": "ok" if code == 0 else "failed",
                                                                        "error": tail(out)})
        row = self.attempt("bench-data", argv, cap, parse) if made["status"] in ("ok", "dry-run") else made
        self.add(f"bench-data {workers} workers", "data", batch, row)

    def run(self):
        self.bench("precomputed", "precomputed", [256], 150)
        self.bench("online ViT-H/14", "online", [256, 128], 180)
        self.baseline(256, 180)
        self.data(256, 16, 120)
        self.bench("precomputed", "precomputed", [512], 150)
        self.fsdp2(256, 150)
        return self.rows


def visible_gpus() -> int:
    try:
        from xla_trainer.runtime import MachineDevices
    except ImportError:
        return 0
    return MachineDevices.probe().gpus


def tail(out: str, lines: int = 3) -> str:
    return " | ".join(out.strip().splitlines()[-lines:])[-500:]


# --- synthetic data: ImageNet-sized JPEGs of the photos scikit-image ships, as shards ---------------
def make_data(shards: Path, images: int = 1536, shard_size: int = 48):
    """`images` JPEGs of 500x375 (ImageNet's typical size), random crops and flips of scikit-image's
    photos, in two classes, then `xla-trainer make-shards` into shard_size-image shards (32: every
    one of 16 workers gets shards to read)."""
    import numpy as np
    from PIL import Image
    from skimage import data
    if (shards / "manifest.json").exists():
        return
    tree = shards.parent / "images"
    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "chelsea", "coffee", "rocket")]
    rng = np.random.default_rng(0)
    for i in range(images):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = rng.uniform(0.5, 1.0)
        cw, ch = int(w * side), int(h * side)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = photo.crop((x, y, x + cw, y + ch)).resize((500, 375) if i % 3 else (375, 500), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out = tree / f"class{i % 2}" / f"{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        crop.save(out, quality=90)
    subprocess.run([sys.executable, "-m", "xla_trainer", "make-shards", str(tree), str(shards), "--shard-size",
                    str(shard_size), "--workers", str(min(8, os.cpu_count() or 1))], check=True)


# --- the report ------------------------------------------------------------------------------------
def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"GPU check on {device}: ViT-B/16 D-iGPT ({CONFIG}), bf16, torch.compile; a synthetic batch on the device.",
             "", "| row | batch | images/s | ms/step | TFLOP/s | MFU | peak memory GiB | params + AdamW MiB per GPU "
             "| vs official baseline | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "data":
            speed = f"{fmt(r.get('images_per_sec'), '.0f')} ({fmt(r.get('images_per_sec_per_core'), '.0f')}/worker)"
            cells = [speed, "", "", "", "", "", ""]
        else:
            baseline = r.get("speedup_vs_baseline")
            vs = (f"{baseline:.2f}x ({fmt(r.get('baseline_images_per_sec'), '.0f')} images/s)" if baseline is not None
                  else "n/a")
            cells = [fmt(r.get("images_per_sec"), ".0f"), fmt(r.get("ms_per_step"), ".1f"),
                     fmt(r.get("achieved_tflops"), ".1f"), fmt(r.get("mfu"), ".1%"),
                     fmt(r.get("peak_memory_gib"), ".1f"), fmt(state_bytes(r), ".0f", 2**-20),
                     vs if r["row"].startswith("official") else ""]
        status = r["status"] + (f": {r['error']}" if r["status"] != "ok" and r.get("error") else "")
        lines.append("| " + " | ".join([r["row"], str(r["batch"]), *cells, status.replace("|", "/")]) + " |")
    return "\n".join(lines)


def state_bytes(row: dict) -> int | None:
    """The parameters and optimizer state one GPU holds (its shards under FSDP2)."""
    parts = [row.get("parameter_bytes_per_device"), row.get("optimizer_bytes_per_device")]
    return None if None in parts else sum(parts)


def device_name() -> str:
    try:
        from xla_trainer.config import ConfigError
        from xla_trainer.runtime import create_runtime
    except ImportError:
        return "unknown (no torch)"
    try:
        return create_runtime("cuda").device_kind()
    except ConfigError:  # no CUDA GPU visible
        return "no CUDA GPU"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="device_check_out/device_check.json", help="the JSON report")
    p.add_argument("--budget", type=float, default=300, help="seconds for all rows together (default 300)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per bench row (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    p.add_argument("--dry-run", action="store_true", help="print each row's command and run none")
    p.add_argument("--row", action="store_true", help=argparse.SUPPRESS)  # a child: one bench row
    p.add_argument("--make-data", metavar="DIR", help=argparse.SUPPRESS)  # a child: the synthetic shards
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.row:
        row = bench_row(args.overrides, args.steps, args.warmup)
        if os.environ.get("RANK", "0") == "0":  # under torchrun: process 0 reports
            print(ROW_MARK + json.dumps(row), flush=True)
        return
    if args.make_data:
        make_data(Path(args.make_data))
        return
    rows = Matrix(args).run()
    if args.dry_run:
        return
    device = device_name()
    report = {"device": device, "config": CONFIG, "steps": args.steps, "warmup": args.warmup, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(markdown(rows, device))
    print(f"\nbench_matrix: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
