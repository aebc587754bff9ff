"""FSDP2 on the eager CPU backend over gloo with real processes (torchrun): runtime.mesh [1, 2]
(FSDP2), [2, 2] (HSDP) and [-1, 1] (DDP) train the toy objective along one process's curve, with
gradient accumulation, under torch.compile, and hold about 1/N of the parameters and optimizer
state per process; a classifier trains and evaluates on DDP and FSDP2 as on one process. Each
launch runs several trainings (eager_runs.py)."""
import json

import pytest

import eager_runs
from conftest import read_metrics, run_here, tiny_eval_overrides, toy_overrides
from xla_trainer.checkpoint import newest_checkpoint, read_checkpoint
from xla_trainer.config import ConfigError
from xla_trainer.runtime import create_runtime

STEPS = 5
# Runs that differ only in how the step is split over processes: their float32 sums are ordered
# differently (measured: 1e-7 relative); the tolerance leaves room for that alone.
TOL = 1e-5
BENCH = ["--steps", "1", "--warmup", "1"]


@pytest.mark.parametrize("world, mesh", [(4, [3, -1]), (4, [1, 3]), (2, [2, 2]), (1, [1, 2])])
def test_a_mesh_that_does_not_fit_the_processes_is_refused_before_any_work(monkeypatch, world, mesh):
    """Raised before the process group is joined: WORLD_SIZE > 1 without a rendezvous would hang."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=rf"runtime.mesh \[.*\] does not fit {world} devices; give \[data, fsdp\] "
                                          rf"with data x fsdp = {world}.*{world} started"):
        create_runtime("cpu", "fp32", mesh=mesh)


def test_one_process_on_a_one_device_mesh_is_the_plain_model():
    runtime = create_runtime("cpu", "fp32", mesh=[1, -1])
    assert runtime.mesh_shape == (1, 1) and runtime.fsdp_size == 1


def pretrain(roots, out, **extra) -> list[str]:
    return ["pretrain", *toy_overrides(roots["embedded"], out, **{"train.stop_at_step": STEPS, **extra})]


def classifier(roots, out, **extra) -> list[str]:
    """`train` of a tiny ViT classifier on the digits, then its evaluation (and best checkpoint)."""
    return ["train", *tiny_eval_overrides(roots["digits"], out, **{"runtime.backend": "cpu",
                                                                   "runtime.precision": "fp32", **extra})]


def bench(roots, out, mesh: str) -> list[str]:
    return ["bench", *BENCH, *toy_overrides(roots["embedded"], out, **{"runtime.mesh": mesh})]


TWO = {  # name -> (command, the run's overrides) on 2 processes
    "ddp": (pretrain, {}),
    "fsdp2": (pretrain, {"runtime.mesh": "[1,2]"}),
    "fsdp2-accum2": (pretrain, {"runtime.mesh": "[1,2]", "train.accum_steps": 2}),
    "fsdp2-compiled": (pretrain, {"runtime.mesh": "[1,2]", "runtime.torch_compile": "true"}),
    "ddp-bf16": (pretrain, {"runtime.precision": "bf16"}),
    "fsdp2-bf16": (pretrain, {"runtime.mesh": "[1,2]", "runtime.precision": "bf16"}),
    "ddp-classifier": (classifier, {}),
    "fsdp2-classifier": (classifier, {"runtime.mesh": "[1,2]"}),
}
FOUR = {
    "hsdp-accum2": (pretrain, {"runtime.mesh": "[2,2]", "train.accum_steps": 2}),
}


def launch(processes: int, runs: dict, roots, tmp) -> dict:
    commands = [command(roots, tmp / name, **extra) for name, (command, extra) in runs.items()]
    commands += [bench(roots, tmp / f"bench{mesh}", mesh) for mesh in ("[-1,1]", f"[1,{processes}]")]
    if processes == 4:
        commands.append(bench(roots, tmp / "bench-hsdp", "[2,2]"))
    tmp.mkdir()
    results = eager_runs.run(processes, commands, tmp / "spec.json")
    for per_process in results:
        for r in per_process:
            assert r.returncode == 0, (r.args, r.stderr[-3000:])
    benches = [[json.loads(r.stdout.splitlines()[-1]) for r in per_process] for per_process in results[len(runs):]]
    return {"runs": {name: read_metrics(tmp / name) for name in runs}, "benches": benches, "dirs": tmp}


@pytest.fixture(scope="module")
def runs(embedded_root, digits_root, tmp_path_factory):
    """One process in this one, then one launch of 2 processes and one of 4, each several runs."""
    tmp = tmp_path_factory.mktemp("fsdp")
    roots = {"embedded": embedded_root, "digits": digits_root}
    for command, name in ((pretrain, "one"), (classifier, "one-classifier")):
        one = run_here(command(roots, tmp / name))
        assert one.returncode == 0, one.stderr[-3000:]
    one_bench = run_here(bench(roots, tmp / "one-bench", "[-1,1]"))
    assert one_bench.returncode == 0, one_bench.stderr[-3000:]
    optimized = len(read_checkpoint(newest_checkpoint(str(tmp / "one")), ("optimizer",))["optimizer"])
    return {"one": read_metrics(tmp / "one"), "optimized_tensors": optimized,
            "one_bench": json.loads(one_bench.stdout.splitlines()[-1]),
            "one_classifier": read_metrics(tmp / "one-classifier"),
            2: launch(2, TWO, roots, tmp / "two"), 4: launch(4, FOUR, roots, tmp / "four")}


def assert_same_curve(reference, rows, tol):
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for x, y in zip(reference, rows):
        for key in ("loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=tol, abs=tol), (x["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("processes, name", [(2, "ddp"), (2, "fsdp2"), (2, "fsdp2-accum2"), (4, "hsdp-accum2")])
def test_sharded_runs_follow_one_process(runs, processes, name):
    """Losses and (global) gradient norms of every step equal one process's and DDP's."""
    one = runs["one"]
    assert one[0]["loss"] != pytest.approx(one[-1]["loss"], abs=1e-3)  # a curve, not a constant
    assert_same_curve(one, runs[processes]["runs"][name], TOL)
    assert_same_curve(runs[2]["runs"]["ddp"], runs[processes]["runs"][name], TOL)


@pytest.mark.slow
def test_fsdp2_saves_the_models_own_names_and_the_same_state_as_ddp(runs):
    """The checkpoint of an FSDP2 run holds the model's names (no FSDP prefixes) and, assembled
    from its shards, the tensors DDP's holds; fp32 master weights under bf16 too."""
    dirs = runs[2]["dirs"]
    ddp, fsdp2 = (read_checkpoint(newest_checkpoint(str(dirs / name))) for name in ("ddp", "fsdp2"))
    assert sorted(fsdp2["model"]) == sorted(ddp["model"]) and "encoder.blocks.0.norm1.weight" in fsdp2["model"]
    for name, tensor in ddp["model"].items():
        assert fsdp2["model"][name].shape == tensor.shape
        assert (fsdp2["model"][name] - tensor).abs().max() <= 1e-5, name
    assert fsdp2["optimizer"].keys() == ddp["optimizer"].keys()
    bf16 = read_checkpoint(newest_checkpoint(str(dirs / "fsdp2-bf16")), ("model",))["model"]
    assert {t.dtype for t in bf16.values()} == {ddp["model"]["encoder.pos_embed"].dtype}


@pytest.mark.slow
def test_bf16_fsdp2_follows_bf16_ddp(runs):
    """bf16 parameters in the forward and backward (FSDP2's MixedPrecisionPolicy), under the same
    autocast as DDP's fp32 weights: the curves agree to bf16's precision (8 bits: ~4e-3 a value)."""
    assert_same_curve(runs[2]["runs"]["ddp-bf16"], runs[2]["runs"]["fsdp2-bf16"], 3e-2)


@pytest.mark.slow
def test_compiled_fsdp2_step_equals_eager(runs):
    """runtime.torch_compile on the CPU: inductor's C++ kernels around the FSDP2 hooks; they
    reorder float32 sums (fused kernels), hence a tolerance above TOL's."""
    assert_same_curve(runs[2]["runs"]["fsdp2"], runs[2]["runs"]["fsdp2-compiled"], 1e-4)


def local_bytes(benches, key) -> list[int]:
    return [b[key] for b in benches]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_each_process_holds_its_share_of_parameters_and_optimizer_state(runs, processes):
    """bench's parameter_bytes_per_device / optimizer_bytes_per_device: DDP's and one process's are
    the whole; FSDP2's shards on N processes add up to the whole, each about 1/N (dim-0 chunks:
    a process holds at most one row more per tensor than its share)."""
    whole = runs["one_bench"]
    data_parallel, sharded = runs[processes]["benches"][:2]
    for key in ("parameter_bytes_per_device", "optimizer_bytes_per_device"):
        assert local_bytes(data_parallel, key) == [whole[key]] * processes
        shards = local_bytes(sharded, key)
        # AdamW's step count, a float32 scalar per parameter, is whole on every process
        step_counts = 4 * runs["optimized_tensors"] * (processes - 1) if key.startswith("optimizer") else 0
        assert sum(shards) == whole[key] + step_counts
        assert max(shards) <= 1.1 * whole[key] / processes, (key, shards, whole[key])
    if processes == 4:  # HSDP [2, 2]: sharded over 2, replicated over 2
        hsdp = local_bytes(runs[4]["benches"][2], "parameter_bytes_per_device")
        assert sum(hsdp) == 2 * whole["parameter_bytes_per_device"] and max(hsdp) <= 0.55 * whole["parameter_bytes_per_device"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp-classifier", "fsdp2-classifier"])
def test_a_classifier_trains_and_evaluates_as_on_one_process(runs, name):
    """`train` on 2 processes: the evaluation calls the classifier inside the wrapped objective on
    its own (FSDP2: its root's parameters gathered, runtime.gathered), and the last and best
    checkpoints save at the same step, each store over its own process group. The training rows
    and the evaluation equal one process's."""
    one, rows = runs["one_classifier"], runs[2]["runs"][name]
    assert [r["step"] for r in rows] == [r["step"] for r in one]
    for x, y in zip(one, rows):
        for key in ("loss", "grad_norm", "val_top1", "val_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=TOL, abs=TOL), (x["step"], key)
    assert one[-1]["val_images"] == rows[-1]["val_images"] > 0
