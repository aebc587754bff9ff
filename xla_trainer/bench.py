"""`bench`: time the compiled train step of any config on a fixed batch already on the device, so
the figure is the step's speed, not the input pipeline's. With targets.source=precomputed the
batch carries stored-dtype targets and the teacher leaves the step. With a baseline
(bench_official.py), a step written as another codebase trains is timed after ours, on the same
config and batch."""
import cProfile
import gc
import itertools
import os
import pstats
import time

from .bench_official import bench_batch, check_baseline, official_style_bench
from .config import Config
from .data import open_data
from .flops import peak_flops, step_flops
from .loop import Schedule, make_runtime, step_function, train_step
from .optim import peak_lr
from .pretrain import build_job, check_config
from .runtime import GraphCounters, Runtime, create_runtime


def bench(cfg: Config, steps: int = 10, warmup: int = 3, runtime: Runtime | None = None,
          baseline: str | None = None, profile_host: bool = False) -> dict:
    runtime = runtime or make_runtime(cfg)
    check_config(cfg, runtime, for_bench=True)
    if baseline is not None:
        check_baseline(baseline, runtime)  # before either model is built
    result, batch = time_our_step(cfg, runtime, steps, warmup, profile_host)
    if baseline is None:
        return result
    gc.collect()  # our model is gone with time_our_step: its memory goes back before the baseline builds its own
    runtime.free_memory()
    theirs = official_style_bench(cfg, runtime, steps, warmup, batch)
    return {**result, "baseline": baseline, "baseline_images_per_sec": theirs["images_per_sec"],
            "baseline_ms_per_step": theirs["ms_per_step"],
            "speedup_vs_baseline": result["images_per_sec"] / theirs["images_per_sec"]}


class StepTimer:
    """Calls the compiled train step of `job` on device batches and times it: the seconds the
    calls took, the part of them spent tracing train_step (Python), and the seconds then waited
    for the device."""

    def __init__(self, job, runtime: Runtime, lr: float):
        self.job, self.runtime, self.lr = job, runtime, lr
        self.traced = []  # when train_step's Python ended, each step: the rest of the call hands the graph over
        # runtime.dynamo_step replays a graph traced once: its "tracing" is the whole call
        self.step = step_function(job, runtime, "train_step") if runtime.dynamo_step else train_step
        self.step_fn = self._traced_step if runtime.dynamo_step else runtime.compile_fn(self._traced_step, "train_step")

    def _traced_step(self, *args, **kwargs):
        metrics = self.step(*args, **kwargs)
        self.traced.append(time.perf_counter())
        return metrics

    def run(self, batches, one_at_a_time: bool = False) -> tuple[float, float, float, float]:
        """Runs the steps, then waits for the device; `one_at_a_time`: waits after each step too.
        (seconds the calls took, of which tracing, seconds waited for the device after them, CPU
        seconds of this thread in the calls)."""
        called = tracing = waited = cpu = 0.0
        for step, device_batch in batches:
            start, start_cpu = time.perf_counter(), time.thread_time()
            self.step_fn(self.job.step_model, self.job.teacher, self.job.optimizer, device_batch, self.lr, step,
                         runtime=self.runtime, settings=self.job.settings)
            returned, cpu = time.perf_counter(), cpu + time.thread_time() - start_cpu
            called, tracing = called + returned - start, tracing + self.traced[-1] - start
            if one_at_a_time:
                self.runtime.synchronize()
                waited += time.perf_counter() - returned
        start = time.perf_counter()
        self.runtime.synchronize()
        return called, tracing, waited + time.perf_counter() - start, cpu


def time_our_step(cfg: Config, runtime: Runtime, steps: int, warmup: int,
                  profile_host: bool = False) -> tuple[dict, dict]:
    """(the report of our compiled step, the host batch it ran on). On XLA, after the timed steps,
    as many again each started on an idle device: their host time (tracing + dispatch) alone;
    `profile_host`: then one more under cProfile, where that time goes."""
    lr = peak_lr(cfg.optim.base_lr, cfg.train.global_batch, cfg.optim.lr)
    job = build_job(cfg, runtime, Schedule(1, warmup + steps, 0, lr, lr), count_flops=True)  # the peak lr throughout
    flops = job.flops
    if job.teacher is not None and cfg.targets.source == "precomputed":  # the teacher leaves the step
        job.teacher = None
        flops = step_flops(flops["student_forward"])
    batch = bench_batch(cfg, cfg.train.global_batch // runtime.process_count, job.target_info)
    timer = StepTimer(job, runtime, lr)
    xla = runtime.graph_counters() is not None
    batches = enumerate(runtime.device_batches([batch] * (warmup + steps + ((steps + profile_host) if xla else 0))))
    counters = [runtime.graph_counters()]  # before the warm-up, after it, after the timed steps
    timer.run(itertools.islice(batches, warmup))  # compiles
    compiles_after_warmup = runtime.compiles()
    counters.append(runtime.graph_counters())
    start = time.perf_counter()
    timer.run(itertools.islice(batches, steps))
    seconds = time.perf_counter() - start
    counters.append(runtime.graph_counters())
    images_per_sec = steps * cfg.train.global_batch / seconds
    achieved = images_per_sec * flops["train_step"]
    peak = peak_flops(runtime.device_kind())
    report = {"device": runtime.device_kind(), "devices": runtime.num_devices, "targets": cfg.targets.source,
              "global_batch": cfg.train.global_batch, "steps": steps,
              "images_per_sec": images_per_sec, "ms_per_step": 1000 * seconds / steps,
              "gflops_per_image": flops["train_step"] / 1e9, "achieved_tflops": achieved / 1e12,
              "mfu": achieved / (peak * runtime.num_devices) if peak else None,
              "compiles": runtime.compiles(), "compiles_after_warmup": compiles_after_warmup,
              "parameter_bytes_per_device": runtime.parameter_bytes_per_device(job.step_model),
              "optimizer_bytes_per_device": runtime.optimizer_bytes_per_device(job.optimizer)}
    if xla:
        report.update(host_side(timer, batches, counters, steps, seconds, flops["train_step"], profile_host))
    return report, batch


def host_side(timer: StepTimer, batches, counters: list, steps: int, seconds: float, flops_per_image: float,
              profile_host: bool) -> dict:
    """The XLA step's graph and host figures: `steps` more steps, each started on an idle device
    (their host time alone), against the counters before the warm-up, after it and after the
    timed steps; `profile_host`: one more step under cProfile."""
    host_seconds, tracing, waited, cpu = timer.run(itertools.islice(batches, steps), one_at_a_time=True)
    counters.append(timer.runtime.graph_counters())
    warm, timed, host_timed = (later - earlier for earlier, later in zip(counters, counters[1:]))
    report = graph_report(warm, timed, steps, seconds, host_seconds / steps)
    report["trace_ms_per_step"] = 1000 * tracing / steps  # the rest of host_ms: hash, look up, dispatch
    # the calling thread's CPU time: unlike wall time, not stretched when XLA:CPU's threads run the
    # graph on the same cores (runtime.dynamo_step hands the graph over mid-call)
    report["host_cpu_ms_per_step"] = 1000 * cpu / steps
    # ~ device_ms_per_step when a step call returns as soon as its graph is dispatched (the next
    # step's tracing may then overlap this one's execution); less: part of it ran inside the call
    report["device_ms_after_return"] = 1000 * waited / steps
    report["same_graph_every_step"] = timed.compiles == 0 and graph_shape(timed) == graph_shape(host_timed)
    # the host's CPU time, not its wall time: on XLA:CPU the graph runs on the host's own cores
    # and stretches the call (a TPU host's cores are its own)
    report["host_vs_tpu_step"] = host_vs_tpu_step(report["host_cpu_ms_per_step"], flops_per_image)
    if profile_host:
        report["host_profile"] = host_profile(lambda: timer.run(itertools.islice(batches, 1), one_at_a_time=True))
    return report


def graph_report(warmup: GraphCounters, timed: GraphCounters, steps: int, seconds: float,
                 host_seconds: float) -> dict:
    """Per step of the timed steps, from torch_xla's counters: how many graphs ran and how big the
    traced step is; host (trace + dispatch) and device (execution) time, and how much of the
    shorter one hid behind the longer (overlap 1: wall = max(host, device); 0: wall = their sum or
    more)."""
    wall, device = seconds / steps, timed.execute_seconds / steps
    hidden = (host_seconds + device - wall) / min(host_seconds, device) if device else None
    return {"executions_per_step": timed.executions / steps, "graphs_traced_per_step": timed.graphs_traced / steps,
            "ir_nodes_per_step": timed.ir_nodes / steps, "host_fallbacks_per_step": timed.host_fallbacks / steps,
            "host_ms_per_step": 1000 * host_seconds, "device_ms_per_step": 1000 * device,
            "overlap": None if hidden is None else min(1.0, max(0.0, hidden)),
            "step_compiles": warmup.compiles, "step_compile_seconds": warmup.compile_seconds}


def host_profile(run_one_step, top: int = 15) -> list[list]:
    """[[function, ms], ...]: the `top` functions by their own time (callees excluded) in one step
    under cProfile; C++ work such as tracing the backward shows as the builtin that runs it.
    cProfile slows Python code: shares, not timings."""
    profiler = cProfile.Profile()
    profiler.runcall(run_one_step)
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive calls, own, cumulative, callers)
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [[f"{func} ({os.path.basename(file)}:{line})", round(1000 * own, 1)]
            for (file, line, func), (_, _, own, _, _) in rows]


def graph_shape(counters: GraphCounters) -> tuple:
    """What two runs of the same steps share: graphs traced and run, their IR nodes, compiles."""
    return counters.graphs_traced, counters.ir_nodes, counters.executions, counters.compiles, counters.host_fallbacks


# The chips the host must keep up with: a step of 256 images per chip (the D-iGPT recipe: 4,096 on
# a v4-32) at 50% MFU, from the step's FLOPs and the chip's bf16 peak (flops.PEAK_TFLOPS).
TPU_CHIPS = ("v4", "v5p", "v6e")
IMAGES_PER_CHIP = 256


def host_vs_tpu_step(host_ms: float, flops_per_image: float) -> dict:
    """Host ms per step / the ms a chip needs for the step at 50% MFU, per TPU generation: above
    0.25 the host no longer hides behind the chip's execution; above 1 the chip waits for it."""
    return {chip: host_ms / (1000 * IMAGES_PER_CHIP * flops_per_image / (0.5 * peak_flops(chip)))
            for chip in TPU_CHIPS}


def bench_data(cfg: Config, batches: int = 20, warmup: int = 2) -> dict:
    """Images/s of the input pipeline alone (decode, crop, targets) in this process and its
    data.num_workers loader workers, as one host of a run would read."""
    runtime = create_runtime("cpu", cfg.runtime.precision)
    check_config(cfg, runtime)
    data = open_data(cfg, runtime)
    loader = iter(data.loader(0, warmup + batches))
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    images = sum(len(next(loader)["images"]) for _ in range(batches))
    seconds = time.perf_counter() - start
    workers = runtime.loader_workers(cfg.data.num_workers)
    return {"source": cfg.data.shards or cfg.data.root or cfg.data.source, "targets": cfg.targets.source,
            "workers": workers, "images": images, "images_per_sec": images / seconds,
            "images_per_sec_per_core": images / seconds / max(1, workers)}
