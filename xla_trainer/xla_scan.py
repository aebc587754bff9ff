"""runtime.scan_blocks (XLA only): a stack of identical blocks run as one XLA While loop whose body
is one block, with torch_xla's `scan`, instead of a Python loop that traces every block again at
every step. The step's graph then holds one block's forward and backward whatever the depth, so
tracing, the IR and the compile shrink. Imported by XlaRuntime.wrap_model only (torch_xla)."""
import inspect
import logging

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch_xla.experimental.scan import _scan_impl_pytree, value_and_grad_partitioned

from .config import ConfigError

log = logging.getLogger(__name__)


class ScannedBlocks(nn.ModuleList):
    """The same blocks under the same names (blocks.0, blocks.1, ...: the state dict does not
    change), which `block_outputs` (models/layers/taps.py) runs through `run_taps` as one scan over
    their stacked weights. Called or iterated, they run one after another as before."""

    def __init__(self, blocks):
        super().__init__(blocks)
        self._layer_fns = {}  # one per autocast state and mode: scan caches its traced graphs per function

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        for block in self:
            x = block(x, **kwargs)
        return x

    def run_taps(self, x: torch.Tensor, attn_mask: torch.Tensor | None, taps) -> list[torch.Tensor]:
        """The outputs of blocks `taps` (1-based) run in turn over x under attn_mask (None: full)."""
        weights = {name: torch.stack([block.get_parameter(name) for block in self])
                   for name, _ in self[0].named_parameters()}
        # the mask rides along as a scanned input (a broadcast, no copy): closed over, it would be a
        # constant of the cached graph
        inputs = {"weights": weights}
        if attn_mask is not None:  # (scan takes no None)
            inputs["mask"] = attn_mask.expand(len(self), *attn_mask.shape)
        _, outputs = scan(self._layer_fn(x.device.type), x, inputs)
        return [outputs[i - 1] for i in taps]

    def _layer_fn(self, device: str):
        """The scan body, one function per autocast state and train / eval mode: scan reuses the
        forward and backward graphs it traced for a function (is_fn_pure), and they hold both."""
        key = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), self.training)
        if key not in self._layer_fns:
            template = self[0]

            def one_block(x, inputs):
                x = torch.func.functional_call(template, inputs["weights"], (x,),
                                               {"attn_mask": inputs.get("mask")}, strict=True)
                return x, x.clone()  # the carry and the stacked output (scan's graphs want them distinct)

            self._layer_fns[key] = one_block
        return self._layer_fns[key]


def scan(fn, init: torch.Tensor, xs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """torch_xla.experimental.scan.scan(fn, init, xs, is_fn_pure=True) of one carried tensor and
    one stacked output, its backward without the gradient shardings that torch_xla 2.9 sets under
    SPMD through jax (shard_as), which this project does not install: on the data-parallel mesh
    (the only one scan_blocks takes) XLA's own propagation shards them as their inputs."""
    forward, alias_input, backward = value_and_grad_partitioned(fn, init, xs, is_fn_pure=True)
    flat_xs, spec = tree_flatten(xs)
    return _Scan.apply(forward, alias_input, backward, spec, init, *flat_xs)


class _Scan(torch.autograd.Function):
    """torch_xla's Scan (experimental/scan.py) on flat inputs, less its SPMD shard_as."""

    @staticmethod
    def forward(ctx, forward, alias_input, backward, spec, init, *flat_xs):
        xs = tree_unflatten(list(flat_xs), spec)
        # the traced graph holds autocast's casts already: replayed under autocast, its ops were cast again
        with torch.no_grad(), torch.autocast(init.device.type, enabled=False):
            carry, (ys, partial_activations) = _scan_impl_pytree(forward, init, xs)
        ctx.backward = backward
        ctx.save_for_backward(*alias_input(partial_activations, xs))
        return carry, ys

    @staticmethod
    def backward(ctx, grad_carry, grad_ys):
        with torch.no_grad():  # from the last block to the first
            grad_init, grad_xs = _scan_impl_pytree(ctx.backward, grad_carry, (grad_ys, ctx.saved_tensors),
                                                   reverse=True)
        return None, None, None, None, grad_init, *tree_flatten(grad_xs)[0]


def stochastic_modules(block: nn.Module) -> list[str]:
    """The names of `block`'s dropout and drop-path modules that drop anything in training."""
    return [name for name, m in block.named_modules()
            if (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) or getattr(m, "drop_prob", 0) > 0]


def takes_x_and_mask(block: nn.Module) -> bool:
    """Whether `block` runs as block_outputs calls it, block(x, attn_mask=...) (a decoder block
    that also reads the encoder's features does not)."""
    params = list(inspect.signature(block.forward).parameters.values())[1:]
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params) and any(p.name == "attn_mask" for p in params)


def structure(block: nn.Module) -> str:
    """What two blocks must share to run as one scan body: each submodule's class and settings
    (its public attributes: heads, eps, drop rates), each tensor's shape and dtype."""
    modules = [(name, type(m).__name__, sorted((k, v) for k, v in vars(m).items() if not k.startswith("_")))
               for name, m in block.named_modules()]
    tensors = [(name, t.shape, t.dtype) for name, t in [*block.named_parameters(), *block.named_buffers()]]
    return repr((modules, tensors))


def scan_identical_blocks(model: nn.Module, block_types: tuple[type, ...]):
    """Every ModuleList / Sequential of two or more `block_types` modules of one structure that run
    as block(x, attn_mask=...) made a ScannedBlocks, in place (those `block_outputs` runs become
    scans; the rest still loop). Blocks that drop at random are refused: the scan would run the
    first block's drop rate in every block (timm's drop path grows with depth), and its random
    numbers differ from the loop's."""
    for name, container in list(model.named_modules()):
        if not (type(container) in (nn.ModuleList, nn.Sequential) and len(container) > 1
                and all(isinstance(b, block_types) for b in container) and takes_x_and_mask(container[0])):
            continue
        dropping = [f"{name}.{i}.{n}" for i, b in enumerate(container) for n in stochastic_modules(b)]
        if dropping:
            raise ConfigError(f"runtime.scan_blocks: blocks drop at random in training ({', '.join(dropping[:3])}"
                              f"{', ...' if len(dropping) > 3 else ''}); set backbone.drop_path=0 (and no dropout) "
                              f"or runtime.scan_blocks=false")
        if len({structure(b) for b in container}) > 1:
            raise ConfigError(f"runtime.scan_blocks: the blocks of {name} differ in structure; "
                              f"set runtime.scan_blocks=false")
        model.set_submodule(name, ScannedBlocks(container))
        log.info("runtime.scan_blocks: %s (%d %s) may run as one scan", name, len(container), type(container[0]).__name__)
