"""runtime.scan_blocks without a device: which block stacks become scans, that the state dict
keeps its names and values, and what is refused. (Losses and compiles on XLA:CPU, 1 and 4
devices: tests/test_xla_spmd.py; IR nodes: tests/test_cli.py.)"""
import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from xla_trainer.config import ConfigError
from xla_trainer_models.objectives.digpt_decoder import DecoderBlock
from xla_trainer.runtime import create_runtime


@pytest.fixture
def xla_scan():
    """The module, imported by the test: it imports torch_xla, which the current-torch
    environment lacks (the tests that use it are marked xla; collection must not import it)."""
    import xla_trainer.xla_scan
    return xla_trainer.xla_scan


class Student(nn.Module):
    def __init__(self, depth: int = 3, drop_path: float = 0.0):
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.Sequential(*(Block(16, 2, drop_path=r) for r in rates))  # as timm's ViT
        self.single = nn.ModuleList([Block(16, 2)])  # one block: nothing to scan
        self.decoder = nn.ModuleList([DecoderBlock(16, 2), DecoderBlock(16, 2)])  # block(q, kv, mask)
        self.head = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])  # not blocks


@pytest.mark.xla
def test_the_blocks_become_a_scan_under_the_same_names(xla_scan):
    model = Student()
    before = model.state_dict()
    xla_scan.scan_identical_blocks(model, (Block, DecoderBlock))
    assert isinstance(model.blocks, xla_scan.ScannedBlocks)
    assert all(type(m) is nn.ModuleList for m in (model.single, model.decoder, model.head))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(2, 5, 16)
    assert torch.equal(model.blocks(x), nn.Sequential(*model.blocks)(x))  # called: the blocks in turn


@pytest.mark.xla
def test_blocks_that_drop_at_random_are_refused(xla_scan):
    with pytest.raises(ConfigError, match=r"blocks drop at random in training \(blocks\.1\.drop_path1, "
                                          r"blocks\.1\.drop_path2, blocks\.2\.drop_path1, \.\.\.\); "
                                          r"set backbone.drop_path=0"):
        xla_scan.scan_identical_blocks(Student(drop_path=0.1), (Block,))


@pytest.mark.xla
def test_blocks_of_different_structure_are_refused(xla_scan):
    model = Student()
    model.blocks[2] = Block(16, 4)  # other heads, same parameter shapes
    with pytest.raises(ConfigError, match="the blocks of blocks differ in structure"):
        xla_scan.scan_identical_blocks(model, (Block,))


def test_scan_blocks_is_refused_off_xla():
    with pytest.raises(ConfigError, match="runtime.scan_blocks is for the xla backend"):
        create_runtime("cpu", scan_blocks=True)
