"""The real XLA SPMD path on CPU: every objective/backbone pair that has XLA coverage gives the
same losses on a 4-device mesh as on 1 device, and compiles its step once. Each device count is
one process (PJRT_DEVICE=CPU, CPU_NUM_DEVICES=1 or 4) running every case in turn (xla_runs.py)."""
import os
import re

import pytest

import xla_runs
from conftest import read_metrics, toy_overrides
from plugin_sizes import TINY

pytestmark = [pytest.mark.slow, pytest.mark.xla]  # make test-fast leaves slow out

STEPS = 4
XLA = {"runtime.backend": "xla", "runtime.precision": "fp32", "train.stop_at_step": STEPS, "train.log_every": 1,
       "data.num_workers": 0}


def sized(kind: str, name: str) -> dict:
    return {f"{kind}.name": name, **{f"{kind}.{k}": v for k, v in TINY[kind][name].items()}}


TINY_DIGPT = {"objective.decoder_width": 32, "objective.decoder_depth": 1, "objective.decoder_heads": 2,
              "train.global_batch": 8, "optim.base_lr": 0.02, "optim.warmup_epochs": 0.1}

# pair -> (--config, overrides): the shipped demo shrunk to the tiny sizes of tests/plugin_sizes.py
PAIRS = {
    "toy/vit": (None, {}),  # tests/toy.yaml, below
    "toy/crate_alpha": (None, sized("backbone", "crate_alpha")),
    "xtra/vit": ("configs/xtra/demo.yaml", {
        "backbone.image_size": 32, "backbone.width": 32, "backbone.depth": 2, "backbone.heads": 2,
        "objective.proj_hidden": 64, "objective.predictor_width": 32, "objective.predictor_depth": 1,
        "objective.predictor_heads": 2, "objective.head_hidden": 64, "train.global_batch": 8, "optim.lr": 0.01,
        "optim.warmup_epochs": 0}),
    "saim/vit": ("configs/saim/demo.yaml", {
        "backbone.image_size": 32, "backbone.width": 32, "backbone.depth": 2, "backbone.heads": 2,
        "train.global_batch": 8, "optim.base_lr": 0.05, "optim.warmup_epochs": 0}),
    # a patch-14 teacher (2x2 grid at 32 px): each 2x2 student segment is resized to the teacher's 1x1
    "digpt/adventurer": ("configs/adventurer/digpt_demo.yaml", {**TINY_DIGPT, **sized("backbone", "adventurer"),
                                                               "teacher.arch": "probe-ViT-14-out1024"}),
    # three blocks: taps 2 and 3 (an inner block's output too), under the block-causal mask
    "digpt/vit": ("configs/digpt/demo.yaml", {**TINY_DIGPT, **sized("backbone", "vit"), "backbone.depth": 3}),
}
# runtime.scan_blocks: the same D-iGPT with its student's blocks run as one XLA scan (data-parallel only)
SCAN = {"runtime.scan_blocks": "true"}
# runtime.dynamo_step: the same D-iGPT, its step traced once by dynamo and replayed, in two accumulated
# micro-batches (one device here; on 4 the move-between-backends chain of test_resume.py runs it)
DYNAMO = {"runtime.dynamo_step": "true"}
# the toy pair also on the other meshes: accumulated micro-batches, FSDP alone, 2 (data) x 2 (fsdp)
TOY_MESHES = {"4, accum 2": {"train.accum_steps": 2}, "4, dp": {"runtime.mesh": "[-1,1]"}, "2x2": {"runtime.mesh": "[2,2]"}}


def pretrain_args(pair: str, out, data_root, **extra) -> list[str]:
    config, values = PAIRS[pair]
    values = {**values, **XLA, **extra}
    if config is None:
        return ["pretrain", *toy_overrides(data_root, out, **values)]
    values.update({"data.root": data_root, "train.output_dir": out})
    return ["pretrain", "--config", config, *[f"{k}={v}" for k, v in values.items()]]


@pytest.fixture(scope="module")
def runs(embedded_root, tmp_path_factory):
    """(case -> metrics rows, case -> parameter MiB per device, case -> stderr of the refused ones,
    case -> stderr of the others)."""
    tmp = tmp_path_factory.mktemp("xla")
    one = {pair: pretrain_args(pair, tmp / f"1-{i}", embedded_root) for i, pair in enumerate(PAIRS)}
    four = {pair: pretrain_args(pair, tmp / f"4-{i}", embedded_root, **{"runtime.mesh": "[1,-1]"})
            for i, pair in enumerate(PAIRS)}  # FSDP: parameters and optimizer state sharded too
    four.update({f"toy/vit {mesh}": pretrain_args("toy/vit", tmp / f"mesh-{i}", embedded_root, **extra)
                 for i, (mesh, extra) in enumerate(TOY_MESHES.items())})
    one["digpt/vit scan"] = pretrain_args("digpt/vit", tmp / "1-scan", embedded_root, **SCAN)
    four["digpt/vit scan"] = pretrain_args("digpt/vit", tmp / "4-scan", embedded_root, **SCAN,
                                           **{"runtime.mesh": "[-1,1]"})
    one["digpt/vit dynamo"] = pretrain_args("digpt/vit", tmp / "1-dynamo", embedded_root, **DYNAMO,
                                            **{"train.accum_steps": 2})
    refused = {  # fail before compiling: exit 2, no metrics written
        "batch 6": pretrain_args("toy/vit", tmp / "batch6", embedded_root, **{"train.global_batch": 6}),
        "mesh [3,-1]": pretrain_args("toy/vit", tmp / "mesh3", embedded_root, **{"runtime.mesh": "[3,-1]"}),
        "scan fsdp": pretrain_args("toy/vit", tmp / "scan-fsdp", embedded_root, **SCAN, **{"runtime.mesh": "[1,-1]"}),
        "scan drop_path": pretrain_args("toy/vit", tmp / "scan-drop", embedded_root, **SCAN,
                                        **{"runtime.mesh": "[-1,1]", "backbone.drop_path": 0.1}),
        "dynamo fsdp": pretrain_args("toy/vit", tmp / "dynamo-fsdp", embedded_root, **DYNAMO,
                                     **{"runtime.mesh": "[1,-1]"})}
    four.update(refused)
    procs = {devices: xla_runs.start(devices, list(cases.values()), tmp / f"dev{devices}.json")
             for devices, cases in ((1, one), (4, four))}
    rows, mib, errors, logs = {}, {}, {}, {}
    for devices, cases in ((1, one), (4, four)):
        results = xla_runs.results(procs[devices], tmp / f"dev{devices}.json", timeout=1500)
        for (case, args), result in zip(cases.items(), results):
            key = (devices, case)
            if case in refused:
                assert result.returncode == 2, result.stderr[-3000:]
                assert not os.path.exists(os.path.join(output_dir(args), "metrics.jsonl")), case
                errors[case] = result.stderr
                continue
            assert result.returncode == 0, (key, result.stderr[-3000:])
            rows[key], logs[key] = read_metrics(output_dir(args)), result.stderr
            mib[key] = float(re.search(r"parameters:\s+([\d.]+) MiB per device", result.stdout).group(1))
    return rows, mib, errors, logs


def output_dir(args: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith("train.output_dir="))


@pytest.mark.parametrize("pair", PAIRS)
def test_four_devices_match_one_and_compile_once(runs, pair):
    """Same global batch, same samples, same noise: the same losses and gradient norms on a
    4-device FSDP mesh (parameters sharded) as on one device; the step compiles once."""
    rows = runs[0]
    one, four = rows[(1, pair)], rows[(4, pair)]
    assert [r["step"] for r in one] == [r["step"] for r in four] == list(range(1, STEPS + 1))
    for a, b in zip(one, four):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-3), (a["step"], key)
    assert one[0]["loss"] != pytest.approx(one[-1]["loss"], abs=1e-4)  # frozen models would "match" too
    for r in (one, four):
        assert 0 < r[0]["compiles"] == r[-1]["compiles"], [x["compiles"] for x in r]


@pytest.mark.parametrize("mesh", TOY_MESHES)
def test_the_toy_pair_matches_on_every_mesh(runs, mesh):
    """Two accumulated micro-batches per step, a data-parallel mesh and a 2 x 2 mesh: one device's
    losses, one compilation."""
    rows = runs[0]
    one, other = rows[(1, "toy/vit")], rows[(4, f"toy/vit {mesh}")]
    for a, b in zip(one, other, strict=True):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-3), (a["step"], key)
    assert 0 < other[0]["compiles"] == other[-1]["compiles"]


@pytest.mark.parametrize("devices", [1, 4])
def test_scanned_blocks_give_the_loops_losses(runs, devices):
    """runtime.scan_blocks on 1 device and on 4 (data-parallel): the losses and gradient norms of
    the Python loop over the blocks on one device (1 device: to 1e-5, the order of float32 sums
    may differ inside XLA's loop; 4 devices: 2e-3, as every mesh here), one compilation."""
    rows, logs = runs[0], runs[3]
    assert "encoder.blocks (3 Block) may run as one scan" in logs[(devices, "digpt/vit scan")]
    assert "run as one scan" not in logs[(1, "digpt/vit")]
    loop, scanned = rows[(1, "digpt/vit")], rows[(devices, "digpt/vit scan")]
    tolerance = 1e-5 if devices == 1 else 2e-3
    for a, b in zip(loop, scanned, strict=True):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=tolerance, abs=tolerance), (a["step"], key)
    assert 0 < scanned[0]["compiles"] == scanned[-1]["compiles"], [x["compiles"] for x in scanned]


def test_the_dynamo_step_gives_the_traced_steps_losses(runs):
    """runtime.dynamo_step in 2 accumulated micro-batches: the losses and gradient norms of the
    step traced at every call in one batch, to 1e-5; one compilation; the step noise is drawn inside
    the graph from the same seed."""
    rows = runs[0]
    traced, replayed = rows[(1, "digpt/vit")], rows[(1, "digpt/vit dynamo")]
    for a, b in zip(traced, replayed, strict=True):
        for key in ("loss", "grad_norm", "loss_ar", "loss_kd"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
    assert 0 < replayed[0]["compiles"] == replayed[-1]["compiles"], [x["compiles"] for x in replayed]


def test_fsdp_shrinks_parameter_bytes_per_device(runs):
    mib = runs[1]
    dp, mixed, fsdp = mib[(4, "toy/vit 4, dp")], mib[(4, "toy/vit 2x2")], mib[(4, "toy/vit")]
    assert mixed < 0.6 * dp and fsdp < 0.6 * mixed
    assert dp == mib[(1, "toy/vit")]  # data-parallel: every device holds every parameter


def test_refused_before_compiling(runs):
    errors = runs[2]
    assert "train.global_batch 6 is not divisible by data-parallel size 4" in errors["batch 6"]
    assert "runtime.mesh [3, -1] does not fit 4 devices" in errors["mesh [3,-1]"]
    assert "FSDPv2's per-block sharding does not cover" in errors["scan fsdp"]
    assert "set runtime.scan_blocks=false, or runtime.mesh=[-1, 1]" in errors["scan fsdp"]
    assert "blocks drop at random in training (encoder.blocks.1.drop_path1" in errors["scan drop_path"]
    assert "runtime.dynamo_step replays one graph" in errors["dynamo fsdp"]
    assert "set runtime.dynamo_step=false, or runtime.mesh=[-1, 1]" in errors["dynamo fsdp"]
