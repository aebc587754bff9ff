"""Run in a subprocess by test_xla_checkpoints.py: on one placement, perturb a tiny D-iGPT, take one
optimizer step and save it; on another placement, restore it and print whether every weight and
optimizer tensor is identical to what was saved. Several jobs run one after the other in one
process (one XLA start-up for all).

Usage: python dcp_roundtrip.py save|restore DATA_ROOT PLACEMENT=OUTPUT_DIR [PLACEMENT=OUTPUT_DIR ...]
PLACEMENT: an XLA mesh ("[-1,1]", "[2,2]") or "cpu" (the eager CPU backend). A restore prints one
JSON line per job.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_overrides  # noqa: E402
from xla_trainer.checkpoint import model_state  # noqa: E402
from xla_trainer.config import load_config  # noqa: E402
from xla_trainer.optim import build_optimizer  # noqa: E402
from xla_trainer.loop import make_runtime  # noqa: E402
from xla_trainer.pretrain import build_models, fsdp_blocks  # noqa: E402


def snapshot(method, optimizer) -> dict:
    state = {f"model.{k}": v for k, v in model_state(method).items()}
    for i, s in optimizer.state_dict()["state"].items():
        state.update({f"opt.{i}.{k}": v for k, v in s.items()})
    return {k: v.detach().cpu() for k, v in state.items()}


def roundtrip(mode: str, data_root: str, placement: str, out: str):
    on = {"runtime.backend": "cpu"} if placement == "cpu" else {"runtime.backend": "xla", "runtime.mesh": placement}
    cfg = load_config(None, tiny_overrides(data_root, out, **on))
    runtime = make_runtime(cfg)
    method, _, _ = build_models(cfg)
    runtime.wrap_model(method, fsdp_blocks(cfg, method))
    optimizer = build_optimizer(method, 1e-3, 0.05, [0.9, 0.95], **runtime.optimizer_options())
    store = runtime.checkpoints(out, keep=2)
    if mode == "save":
        torch.manual_seed(5)
        for p in method.parameters():
            p.grad = torch.randn(p.shape).to(p.device)
        optimizer.step()  # real optimizer state to save
        store.save(7, method, optimizer, {"step": 7, "note": (1, (2, 3)), "config": {"a": [1, 2], "b": None}})
        store.close()
        torch.save(snapshot(method, optimizer), os.path.join(out, "reference.pt"))
        return
    extra = store.restore(store.latest(), method, optimizer, {"step": 0, "note": (0, (0, 0)),
                                                               "config": {"a": [0, 0], "b": 1}})
    reference, restored = torch.load(os.path.join(out, "reference.pt")), snapshot(method, optimizer)
    same = sorted(reference) == sorted(restored) and all(torch.equal(reference[k], restored[k]) for k in reference)
    print(json.dumps({"out": out, "identical": same, "tensors": len(reference), "extra": extra}), flush=True)


if __name__ == "__main__":
    mode, data_root, *jobs = sys.argv[1:]
    for job in jobs:
        roundtrip(mode, data_root, *job.split("=", 1))
