"""runtime.dynamo_step's refusals, in-process (no device); on XLA, its losses against the traced
step are in test_xla_spmd.py, its one replayed graph per step in test_cli.py, its checkpoints
resumed by other backends in test_resume.py."""
from types import SimpleNamespace

import pytest
import torch

from xla_trainer.config import ConfigError
from xla_trainer.dynamo_step import DynamoStep
from xla_trainer.optim import build_optimizer
from xla_trainer.runtime import create_runtime


def test_dynamo_step_is_refused_off_xla():
    with pytest.raises(ConfigError, match="runtime.dynamo_step is for the xla backend"):
        create_runtime("cpu", dynamo_step=True)


@pytest.mark.parametrize("optimizer, ema", [("sgd", None), ("adamw", lambda applied: None)])
def test_dynamo_step_takes_stacked_adamw_without_ema(optimizer, ema):
    model = torch.nn.Linear(3, 2)
    options = {"stacked": True} if optimizer == "adamw" else {}
    job = SimpleNamespace(ema=ema, optimizer=build_optimizer(model, 1e-3, 0.05, name=optimizer, **options))
    with pytest.raises(ConfigError, match="runtime.dynamo_step runs AdamW"):
        DynamoStep(job, runtime=None)
    DynamoStep(SimpleNamespace(ema=None, optimizer=build_optimizer(model, 1e-3, 0.05, stacked=True)), runtime=None)
