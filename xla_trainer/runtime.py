"""Device runtime: the one module that knows about torch_xla (with xla_scan.py, an XLA-only part
it imports for runtime.scan_blocks), CUDA and torch.distributed.

Three backends behind one interface, so the train step is the same everywhere:
  xla  - XlaRuntime: SPMD over a ('data', 'fsdp') mesh of every device of every host (FSDPv2 when
         fsdp > 1); input batches sharded on the batch axis by MpDeviceLoader; the step compiled
         with torch_xla.compile.
  cuda - CudaRuntime: one process per GPU under torchrun, over NCCL: DistributedDataParallel, or
         FSDP2 (fully_shard; HSDP on a 2-D mesh) when runtime.mesh has an fsdp axis > 1.
  cpu  - EagerRuntime: one process, or DDP / FSDP2 over gloo when started by torchrun (debugging,
         tests). It is the eager base: a device is a subclass naming its device type and
         process-group backend (CudaRuntime; docs/torchtpu.md sketches a TorchTPU one).
"""
import contextlib
import datetime
import importlib.util
import itertools
import os
import platform
from dataclasses import astuple, dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map

from .config import ConfigError, RuntimeConfig
from .seeds import derive_seed


def _noise_seed(seed: int, step: int) -> int:
    """Step noise is a function of (seed, step) alone: identical on every replica and process
    count, and exact after a resume without saving device RNG state."""
    return derive_seed(seed, "noise", step)


def _tpu_present() -> bool:
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0") or \
        "TPU_ACCELERATOR_TYPE" in os.environ


@dataclass
class RuntimeInfo:
    backend: str
    device: str
    device_kind: str
    num_devices: int
    process_index: int
    process_count: int
    data_parallel_size: int
    backend_reason: str


class Runtime:
    backend = "cpu"
    backend_reason = "runtime.backend=cpu"
    dynamo_step = False  # xla: the step traced once by dynamo and replayed (dynamo_step.py)

    def __init__(self, precision: str = "bf16"):
        self.precision = precision
        self.device = torch.device("cpu")
        self.process_index, self.process_count = 0, 1
        self.num_devices = 1

    # --- topology ---------------------------------------------------------------------------
    @property
    def data_parallel_size(self) -> int:
        """Ways the global batch is split across devices."""
        return self.num_devices

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def device_kind(self) -> str:
        return platform.processor() or "cpu"

    def info(self) -> RuntimeInfo:
        return RuntimeInfo(self.backend, str(self.device), self.device_kind(), self.num_devices,
                           self.process_index, self.process_count, self.data_parallel_size,
                           self.backend_reason)

    # --- model and step ---------------------------------------------------------------------
    def wrap_model(self, model: torch.nn.Module, blocks: tuple[type, ...] = (),
                   accum_steps: int = 1) -> torch.nn.Module:
        """The model on the device, wrapped for the backend; `blocks`: the module classes FSDP
        shards one at a time (the backbone's and the objective's blocks); `accum_steps`: the
        micro-batches of a step."""
        return model.to(self.device)

    def compile_fn(self, fn, name: str):
        """The function compiled for the device (XLA); as it is elsewhere."""
        return fn

    def optimizer_options(self) -> dict:
        return {}

    def init_optimizer_state(self, optimizer: torch.optim.Optimizer):
        """Eager backends create optimizer state lazily in the first step; nothing to do."""

    def shard_like(self, tensors, like):
        """Each tensor of `tensors` placed as its counterpart in `like` (XLA: the same sharding,
        so that a step taking both compiles once); nothing to do on eager backends."""

    def tensor_bytes_per_device(self, tensors) -> int:
        """The bytes this process's device holds of `tensors`: a sharded tensor's local shard."""
        return sum(t.numel() * t.element_size() for t in map(_local, tensors))

    def parameter_bytes_per_device(self, model) -> int:
        return self.tensor_bytes_per_device(model.parameters())

    def optimizer_bytes_per_device(self, optimizer: torch.optim.Optimizer) -> int:
        """The optimizer state's bytes on this process's device (AdamW's moments, sharded like
        their parameters under FSDP); 0 before its first step."""
        return self.tensor_bytes_per_device(v for state in optimizer.state.values() for v in state.values()
                                            if isinstance(v, torch.Tensor))

    def autocast(self):
        enabled = self.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def step_noise(self, shape: tuple, global_batch: int, seed: int, step: int) -> torch.Tensor:
        """Uniform noise of `shape` per sample, drawn on the device for the global batch; this
        process's rows of it."""
        g = torch.Generator(self.device)
        g.manual_seed(_noise_seed(seed, step))
        noise = torch.rand((global_batch, *shape), generator=g, device=self.device)
        local = global_batch // self.process_count
        return noise[self.process_index * local:(self.process_index + 1) * local]

    def loader_workers(self, requested: int) -> int:
        """data.num_workers; -1: one per core this process gets (the host's cores shared by its
        processes), less one for the process itself."""
        if requested >= 0:
            return requested
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(1, len(os.sched_getaffinity(0)) // local - 1)

    pin_memory = False  # loaders put batches in page-locked memory (a device that copies asynchronously)

    def all_processes_in_step(self, flag: torch.Tensor) -> torch.Tensor:
        """A device bool that is True where `flag` is True on every process: a collective inside
        the step for processes that each see their own rows (DDP); one process, or SPMD, whose
        values are global already, has nothing to agree on."""
        if self.process_count == 1 or not dist.is_initialized() or self.reporting_processes == 1:
            return flag
        agreed = flag.to(torch.int32)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        return agreed.bool()

    def gathered(self, wrapped):
        """A context in which the modules inside `wrapped` (the model as wrap_model returned it)
        may be called directly, outside its forward (evaluation); nothing to do here."""
        return contextlib.nullcontext()

    def no_sync(self, model, last_micro_batch: bool):
        model = getattr(model, "_orig_mod", model)  # under torch.compile
        if isinstance(model, DistributedDataParallel) and not last_micro_batch:
            return model.no_sync()
        return contextlib.nullcontext()

    def device_batches(self, loader):
        for batch in loader:
            yield self.shard_batch(batch)

    def shard_batch(self, batch: dict) -> dict:
        """A host batch (this process's rows) on the device."""
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def compiles(self) -> int:
        return 0

    def graph_counters(self) -> "GraphCounters | None":
        """The compiler's running totals (graphs traced, compiled, executed; bench): None on an
        eager backend, which has no graphs."""
        return None

    # --- collectives (outside the step only) ------------------------------------------------
    @property
    def reporting_processes(self) -> int:
        """How many processes each report a local part of a step's values."""
        return self.process_count

    def sum_over_processes(self, values: list[float]) -> list[float]:
        if self.process_count == 1 or not dist.is_initialized():
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's rows of a batch-split tensor, in process order (outside the step)."""
        if self.process_count == 1 or not dist.is_initialized():
            return t
        parts = [torch.empty_like(t) for _ in range(self.process_count)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    # --- checkpoints (checkpoint.Checkpoints: one DCP format for every backend) -----------------
    def checkpoints(self, output_dir: str, keep: int):
        from .checkpoint import Checkpoints
        return Checkpoints(output_dir, keep, self)

    def checkpoint_group(self):
        """The process group of one checkpoint store's save thread: a gloo group of its own, so
        that its collectives never interleave with the training's (NCCL or gloo) nor with another
        store's (a classifier's last and best checkpoints save at the same step, each from its
        own thread); None for one process. Every process makes its stores in the same order."""
        if self.process_count == 1:
            return None
        return dist.new_group(backend="gloo")

    def stage_state(self, state: dict) -> dict:
        """A host copy of `state` that training may not change while a save writes it; a DTensor
        (FSDP2) stays one, holding a host copy of this process's shard."""
        return tree_map(lambda x: _host_copy(x) if isinstance(x, torch.Tensor) else x, state)

    def checkpoint_planners(self):
        """(save planner, load planner); None: DCP's defaults."""
        return None, None

    def prime_optimizer(self, optimizer: torch.optim.Optimizer):
        """Optimizer state created (a step on zero gradients) so that DCP can load into it; only
        before a restore, which overwrites the parameters it moved."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if all(optimizer.state.get(p) for p in params):
            return
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def any_process(self, flag: bool) -> bool:
        """True on every process if it is True on any (a collective: call it on all of them)."""
        if self.process_count == 1 or not dist.is_initialized():
            return flag
        t = torch.tensor([int(flag)], device=self.collective_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @property
    def collective_device(self):
        return self.device

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()

    # --- device memory and waiting (bench) -------------------------------------------------
    def synchronize(self):
        """Wait until the device has run all the work queued on it (CPU work has run already)."""

    def free_memory(self):
        """Hand the device memory the allocator keeps cached back to the device (none on the CPU)."""

    def reset_peak_memory(self):
        """peak_memory counts from the memory in use now."""

    def peak_memory(self) -> int | None:
        """The most device memory in use since reset_peak_memory, in bytes; None where the
        backend does not count it."""
        return None

    # --- profiling --------------------------------------------------------------------------
    def profiler_activities(self) -> list:
        from torch.profiler import ProfilerActivity
        return [ProfilerActivity.CPU]

    def start_trace(self, logdir: str):
        from torch.profiler import profile, tensorboard_trace_handler
        self._profile = profile(activities=self.profiler_activities(), on_trace_ready=tensorboard_trace_handler(logdir))
        self._profile.__enter__()

    def stop_trace(self):
        self._profile.__exit__(None, None, None)

    def shutdown(self):
        if dist.is_initialized():
            dist.destroy_process_group()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, DTensor):  # copy the local shard alone: no collective, whatever the mesh's device
        return DTensor.from_local(t.to_local().detach().to("cpu", copy=True), t.device_mesh, t.placements,
                                  run_check=False, shape=t.shape, stride=t.stride())
    return t.detach().to("cpu", copy=True)


SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def check_sdpa_backends(backends):
    unknown = [b for b in backends if b not in SDPA_BACKENDS]
    if unknown or not backends:
        raise ConfigError(f"runtime.sdpa_backends {list(backends)}: give one or more of {list(SDPA_BACKENDS)}")


class EagerRuntime(Runtime):
    """Eager PyTorch on one device type (`device_type`): one process as it is; launched by torchrun
    with WORLD_SIZE > 1, its processes joined over `process_group_backend` into a ('data', 'fsdp')
    mesh (runtime.mesh, as on XLA): DDP when fsdp = 1, FSDP2 (fully_shard) when fsdp > 1, HSDP
    (replicated over 'data', sharded over 'fsdp') when both are > 1. This class is the CPU (gloo);
    a device is a small subclass naming both and overriding the hooks below (CudaRuntime; a
    TorchTPU backend would be another, docs/torchtpu.md). `options`: RuntimeConfig's keys of the
    eager step (default: RuntimeConfig's)."""
    backend = device_type = "cpu"
    process_group_backend = "gloo"

    def __init__(self, precision: str = "bf16", options: RuntimeConfig | None = None, mesh=(-1, 1)):
        super().__init__(precision)
        self.options = options or RuntimeConfig()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.mesh_shape = eager_mesh_shape(world, mesh)  # before any work: a mesh that does not fit fails here
        self.device = self.local_device(int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(self.process_group_backend, timeout=datetime.timedelta(minutes=30))
        if world > 1:
            self.process_index, self.process_count = dist.get_rank(), dist.get_world_size()
        self.num_devices = self.process_count

    @property
    def fsdp_size(self) -> int:
        return self.mesh_shape[1]

    def local_device(self, local_rank: int) -> torch.device:
        """This process's device (the process's share of the host's devices: `local_rank`)."""
        return torch.device(self.device_type)

    def prepare_model(self, model: torch.nn.Module):
        """Device-specific changes to the model on its device, before it is wrapped (none here)."""

    def compile_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The wrapped model as the step calls it: torch.compile'd with runtime.torch_compile,
        around DDP (which then splits graphs at its buckets) or the FSDP2 root (its hooks run
        eagerly between the compiled graphs)."""
        if self.options.torch_compile:
            return torch.compile(model, dynamic=False)  # the mask and the noise have fixed shapes
        return model

    def wrap_model(self, model, blocks=(), accum_steps=1):
        model = model.to(self.device)
        self.prepare_model(model)
        if self.fsdp_size > 1:
            model = self.fully_shard(model, blocks)
        elif self.process_count > 1:
            model = DistributedDataParallel(model, device_ids=None if self.device.index is None else [self.device.index],
                                            gradient_as_bucket_view=True,
                                            # a static graph breaks DDP's no_sync (accumulation)
                                            static_graph=self.options.ddp_static_graph and accum_steps == 1)
        return self.compile_model(model)

    def fully_shard(self, model: torch.nn.Module, blocks=()) -> torch.nn.Module:
        """FSDP2, as XlaRuntime's FSDPv2 wraps: each module of the `blocks` classes a unit of its own
        (its parameters gathered for its forward and backward alone), then the root with the rest.
        Parameters, gradients and optimizer state are DTensors sharded over 'fsdp' (dim 0) and,
        on a 2-D mesh, replicated over 'data' (HSDP). The model keeps its own parameter names."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(self.device_type, self.mesh_shape, mesh_dim_names=("data", "fsdp"))
        mesh = mesh if self.mesh_shape[0] > 1 else mesh["fsdp"]
        # bf16: parameters gathered and used in bf16, gradients reduced in fp32 into fp32 master
        # weights. Inputs are not cast (autocast picks the compute dtypes, as on DDP): the
        # step's uniform noise cast to bf16 would tie and change the masks drawn from it.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                      cast_forward_inputs=False) if self.precision == "bf16" else MixedPrecisionPolicy()
        block_types = tuple(blocks)
        units = [m for m in model.modules() if block_types and isinstance(m, block_types) and m is not model]
        for module in units:
            fully_shard(module, mesh=mesh, mp_policy=policy)
        return fully_shard(model, mesh=mesh, mp_policy=policy)

    @contextlib.contextmanager
    def gathered(self, wrapped):
        """FSDP2: the root's own parameters (those outside its blocks) gathered while modules inside
        it are called directly; each block gathers its own in its forward, as in training."""
        from torch.distributed.fsdp import FSDPModule
        root = getattr(wrapped, "_orig_mod", wrapped)
        if not isinstance(root, FSDPModule):
            yield
            return
        root.unshard()
        try:
            yield
        finally:
            root.reshard()

    def no_sync(self, model, last_micro_batch):
        """FSDP2 reduce-scatters every micro-batch's gradients, so that they stay sharded (the
        memory FSDP is chosen for: unsynced, each process would hold the whole gradient), and
        under HSDP all-reduces them over 'data' on the last micro-batch only."""
        from torch.distributed.fsdp import FSDPModule
        module = getattr(model, "_orig_mod", model)  # under torch.compile
        if isinstance(module, FSDPModule):
            module.set_requires_all_reduce(last_micro_batch)
            return contextlib.nullcontext()
        return super().no_sync(model, last_micro_batch)


def eager_mesh_shape(processes: int, mesh) -> tuple[int, int]:
    """runtime.mesh over the processes (one device each), a ConfigError if it does not fit."""
    try:
        return mesh_shape(processes, mesh)
    except ValueError as e:
        raise ConfigError(f"{e} (cuda and cpu: one device per process, {processes} started)") from None


class CudaRuntime(EagerRuntime):
    """One process per GPU (torchrun), NCCL; the CUDA step's levers are `options`: tf32,
    fused_optimizer, attention_masks, sdpa_backends (torch_compile and ddp_static_graph: every
    eager device's)."""
    backend = device_type = "cuda"
    process_group_backend = "nccl"
    pin_memory = True  # loaders put batches in page-locked memory: copies to the GPU are asynchronous

    def __init__(self, precision: str = "bf16", options: RuntimeConfig | None = None, mesh=(-1, 1)):
        super().__init__(precision, options, mesh)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.options.tf32

    def local_device(self, local_rank):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)

    def device_kind(self) -> str:
        return torch.cuda.get_device_name(self.device)

    def prepare_model(self, model):
        if self.options.attention_masks == "additive":
            additive_masks(model, torch.bfloat16 if self.precision == "bf16" else torch.float32)

    def optimizer_options(self) -> dict:
        return {"fused": True} if self.options.fused_optimizer else {}

    def synchronize(self):
        torch.cuda.synchronize(self.device)

    def free_memory(self):
        torch.cuda.empty_cache()

    def reset_peak_memory(self):
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device)

    def profiler_activities(self) -> list:
        from torch.profiler import ProfilerActivity
        return [ProfilerActivity.CPU, ProfilerActivity.CUDA]

    @contextlib.contextmanager
    def autocast(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
        with super().autocast(), sdpa_kernel([kernels[k] for k in self.options.sdpa_backends]):
            yield


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32, row_align: int = 1) -> torch.Tensor:
    """The additive form of a boolean mask (True = may attend): 0 where True, -inf where False,
    the meaning SDPA gives a float mask; its rows stored `row_align` elements apart (a view)."""
    length = allowed.shape[-1]
    stored = torch.zeros((*allowed.shape[:-1], -(-length // row_align) * row_align), dtype=dtype,
                         device=allowed.device)
    return stored[..., :length].masked_fill_(~allowed, float("-inf"))


def additive_masks(model: torch.nn.Module, dtype: torch.dtype):
    """Every boolean `attn_mask` buffer replaced by the additive mask SDPA would build from it at
    every call, built once here, in the compute dtype, its rows 16 elements aligned: what
    memory-efficient attention needs to read a mask in place rather than copy it each step."""
    for module in model.modules():
        mask = module._buffers.get("attn_mask")
        if mask is not None and mask.dtype == torch.bool:
            module._buffers["attn_mask"] = additive_mask(mask, dtype, row_align=16)


class XlaRuntime(Runtime):
    backend = "xla"

    def __init__(self, precision: str = "bf16", compile_cache: str | None = None, mesh=(-1, 1),
                 slices: int = 1, scan_blocks: bool = False, dynamo_step: bool = False):
        super().__init__(precision)
        self.scan_blocks, self.dynamo_step = scan_blocks, dynamo_step
        os.environ.setdefault("PJRT_DEVICE", "TPU" if _tpu_present() else "CPU")
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.debug.metrics as met
        import torch_xla.distributed.parallel_loader as pl
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        self._torch_xla, self._xm, self._met, self._pl, self._xs = torch_xla, xm, met, pl, xs
        if compile_cache:  # before anything compiles; one cache per host, shared by its runs
            xr.initialize_cache(os.path.expanduser(compile_cache), readonly=False)
        xr.use_spmd()
        self.device = torch_xla.device()
        self.num_devices = xr.global_runtime_device_count()
        self.process_index, self.process_count = xr.process_index(), xr.process_count()
        self.mesh = self._make_mesh(mesh_shape(self.num_devices, mesh), slices)
        if scan_blocks and self.fsdp_size > 1:
            raise ValueError(f"runtime.scan_blocks runs the blocks' stacked weights through one loop, which "
                             f"FSDPv2's per-block sharding does not cover; with runtime.mesh {list(mesh)} (fsdp "
                             f"axis {self.fsdp_size}) set runtime.scan_blocks=false, or runtime.mesh=[-1, 1]")
        if dynamo_step and (self.fsdp_size > 1 or scan_blocks):
            raise ValueError(f"runtime.dynamo_step replays one graph whose outputs are the next step's inputs, "
                             f"sharded as XLA chose (FSDPv2 and runtime.scan_blocks are not covered); with "
                             f"runtime.mesh {list(mesh)} and runtime.scan_blocks={str(scan_blocks).lower()} set "
                             f"runtime.dynamo_step=false, or runtime.mesh=[-1, 1] and runtime.scan_blocks=false")
        xs.set_global_mesh(self.mesh)
        if self.process_count > 1:
            self._ensure_process_group()  # host-side agreement (preemption) from the start

    def _make_mesh(self, shape: tuple[int, int], slices: int):
        """('data', 'fsdp') mesh; over several slices (multi-slice TPU) a HybridMesh whose data
        axis spans the slices over DCN and everything else stays on ICI."""
        if slices > 1:
            if shape[0] % slices:
                raise ValueError(f"runtime.slices {slices} must divide the data axis {shape[0]}")
            return self._xs.HybridMesh(ici_mesh_shape=(shape[0] // slices, shape[1]),
                                       dcn_mesh_shape=(slices, 1), axis_names=("data", "fsdp"))
        import numpy as np
        return self._xs.Mesh(np.arange(self.num_devices), shape, ("data", "fsdp"))

    @property
    def fsdp_size(self) -> int:
        return self.mesh.mesh_shape[1]

    def wrap_model(self, model, blocks=(), accum_steps=1):
        """Data-parallel: parameters replicated. With an fsdp axis > 1: FSDPv2, each module of
        the `blocks` classes wrapped on its own (its parameters, gradients and optimizer state
        sharded over 'fsdp', gathered for its forward), then the rest of the parameters.
        runtime.scan_blocks: each stack of identical `blocks` runs as one scan (xla_scan.py)."""
        model = model.to(self.device)
        if self.scan_blocks:
            from .xla_scan import scan_identical_blocks
            scan_identical_blocks(model, tuple(blocks))
        if self.fsdp_size == 1:
            return model
        from torch_xla.experimental.spmd_fully_sharded_data_parallel import \
            SpmdFullyShardedDataParallel as FSDPv2
        block_types = tuple(blocks)
        for name, module in list(model.named_modules()):
            if block_types and isinstance(module, block_types):
                model.set_submodule(name, FSDPv2(module, mesh=self.mesh, extra_data_axis="data"))
        # the root's output is a dict of scalar losses: nothing to shard there
        return FSDPv2(model, mesh=self.mesh, shard_output=lambda output, mesh: None)

    def tensor_bytes_per_device(self, tensors) -> int:
        from torch_xla.distributed.spmd.xla_sharding import wrap_as_sharded_tensor
        total = 0
        for t in tensors:
            if t.device.type != "xla":  # a host scalar (an optimizer's step count)
                total += t.numel() * t.element_size()
                continue
            shard = wrap_as_sharded_tensor(t).local_shards[0].data
            total += shard.numel() * shard.element_size()
        return total

    def device_kind(self) -> str:
        hw = self._xm.xla_device_hw(self.device)
        if hw == "TPU":
            return os.environ.get("TPU_ACCELERATOR_TYPE", f"TPU v{self._torch_xla.tpu.version()}")
        return f"XLA:{hw}"

    def compile_fn(self, fn, name: str):
        return self._torch_xla.compile(fn, full_graph=True, name=name)

    def synchronize(self):
        self._torch_xla.sync()  # the pending graph runs only once cut here
        self._xm.wait_device_ops()

    def optimizer_options(self) -> dict:
        # StackedAdamW: torch's capturable AdamW (the step count on the device; as host floats
        # its bias corrections round to exactly 1.0 in float32 at steps ~160 and ~340, which XLA
        # folds into a constant: two recompilations in every run), traced once per shape.
        return {"stacked": True}

    def init_optimizer_state(self, optimizer):
        """Adam(W)'s state made on the device before the first step, each tensor sharded like its
        parameter: created lazily, it makes the first step a different graph from every later
        one, a second compilation (minutes for a large model on a TPU)."""
        if not isinstance(optimizer, torch.optim.Adam) or optimizer.defaults.get("amsgrad"):
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if optimizer.state[p]:
                    continue
                if not self._torch_xla._XLAC._get_xla_op_sharding(p):
                    self.replicate([p])  # as the step's outputs are: the same input shardings every step
                step = torch.zeros((), device=p.device) if group["capturable"] else torch.tensor(0.0)
                state = optimizer.state[p] = {"step": step, "exp_avg": torch.zeros_like(p),
                                              "exp_avg_sq": torch.zeros_like(p)}
                if group["capturable"]:
                    self.replicate([step])
                self.shard_like((state["exp_avg"], state["exp_avg_sq"]), (p, p), sync=False)
        self._torch_xla.sync()

    def donate(self, tensors):
        """Their device buffers may be reused for the next replayed graph's outputs
        (compile_replayed): none of them is read after it runs."""
        for t in tensors:
            self._torch_xla._XLAC._set_buffer_donation(t, True)

    def replicate(self, tensors):
        """Each tensor marked replicated over the mesh."""
        for t in tensors:
            self._xs.mark_sharding(t, self.mesh, (None,) * t.dim())
        return tensors

    def shard_like(self, tensors, like, sync: bool = True):
        xla = self._torch_xla._XLAC
        for t, p in zip(tensors, like):
            sharding = xla._get_xla_op_sharding(p)
            if sharding:
                xla._xla_mark_sharding(t, sharding)
            else:  # an unmarked parameter is replicated
                self.replicate([t])
        if sync:
            self._torch_xla.sync()

    def step_noise(self, shape, global_batch, seed, step):
        self.seed_step_noise(seed, step)
        return self.draw_noise(shape, global_batch)

    def seed_step_noise(self, seed: int, step: int):
        # Reseeding the device generator is a scalar upload, not a new graph.
        self._xm.set_rng_state(_noise_seed(seed, step), device=self.device)

    def draw_noise(self, shape, global_batch: int) -> torch.Tensor:
        # under SPMD the step sees the global batch, so it takes every row
        return torch.rand((global_batch, *shape), device=self.device)

    def compile_replayed(self, fn, before_run):
        """`fn` traced once by dynamo into one XLA graph, then replayed at each call
        (runtime.dynamo_step). torch_xla's openxla backend, with `before_run()` called just
        before each replay: its own wrapper (torch._dynamo.backends.torchxla) extracts the graph
        at the first call by running it, which draws from the device's generator, and then
        replays it with the generator's state as the extraction left it."""
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd
        from torch_xla._dynamo import dynamo_bridge

        def forward_compiler(graph, example_inputs):
            extracted = None

            def run(*args):
                nonlocal extracted
                if extracted is None:
                    extracted = dynamo_bridge.extract_compiled_graph(graph, args)
                before_run()
                return extracted(*args)
            return make_boxed_func(run)
        return torch.compile(fn, backend=aot_autograd(fw_compiler=forward_compiler), fullgraph=True, dynamic=False)

    def _batch_sharding(self, batch: dict) -> dict:
        # batch axis over every device ('data' x 'fsdp'); minibatch: each host passes its own rows
        return {k: self._xs.ShardingSpec(self.mesh, (("data", "fsdp"),) + (None,) * (v.dim() - 1),
                                         minibatch=True)
                for k, v in batch.items()}

    def device_batches(self, loader):
        batches = iter(loader)
        first = next(batches, None)
        if first is None:
            return
        errors = []

        def host_batches():  # the upload thread ends quietly on a loader error: keep it to raise here
            try:
                yield from itertools.chain([first], batches)
            except Exception as e:
                errors.append(e)
                raise

        per_device = iter(self._pl.MpDeviceLoader(host_batches(), self.device,
                                                  input_sharding=self._batch_sharding(first)))
        try:
            yield from per_device
            if errors:
                raise RuntimeError(f"the input pipeline failed: {errors[0]!r}") from errors[0]
        finally:
            # stop the upload threads, which hold the DataLoader: its workers then shut down
            # instead of blocking the interpreter's exit (a run stopped early, e.g. by SIGTERM)
            per_device._loader.close()

    def shard_batch(self, batch: dict) -> dict:
        sharding = self._batch_sharding(batch)
        return {k: self._xm.send_cpu_data_to_device(v, self.device, sharding[k])[0] for k, v in batch.items()}

    @property
    def collective_device(self):
        return torch.device("cpu")  # gloo

    def _ensure_process_group(self):
        """Across hosts, a CPU (gloo) process group over the XLA runtime's rendezvous, which
        distributed checkpoints and host-side agreement need (one process needs none)."""
        if dist.is_initialized() or self.process_count == 1:
            return
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers xla://)
        dist.init_process_group("gloo", init_method="xla://")

    def checkpoint_group(self):
        self._ensure_process_group()
        return super().checkpoint_group()

    def stage_state(self, state):
        # the sharded host copy torch_xla's own checkpointing makes (_sharded_cpu_state_dict): each host keeps its shards
        from torch_xla.experimental.distributed_checkpoint._helpers import _sharded_cpu_state_dict
        self._torch_xla.sync()
        self._xm.wait_device_ops()
        return _sharded_cpu_state_dict(state)

    def checkpoint_planners(self):
        from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner
        return _spmd_save_planner(), SPMDLoadPlanner()

    def prime_optimizer(self, optimizer):
        from torch_xla.experimental.distributed_checkpoint import prime_optimizer
        prime_optimizer(optimizer)

    def start_trace(self, logdir: str):
        import torch_xla.debug.profiler as xp
        xp.start_trace(logdir)

    def stop_trace(self):
        import torch_xla.debug.profiler as xp
        xp.stop_trace()

    def _count_and_total(self, metric: str) -> tuple[int, float]:
        data = self._met.metric_data(metric)
        return (int(data[0]), float(data[1])) if data else (0, 0.0)

    def compiles(self) -> int:  # read every log step: this one metric, not graph_counters' scan of all counters
        return self._count_and_total("CompileTime")[0]

    def graph_counters(self) -> "GraphCounters":
        compiles, compile_ns = self._count_and_total("CompileTime")
        graphs, ir_nodes = self._count_and_total("TensorsGraphSize")  # one sample per graph traced: its IR nodes
        executions, execute_ns = self._count_and_total("ExecuteReplicatedTime")  # SPMD: every graph runs replicated
        # an op torch_xla cannot lower, or a value read back (.item()), runs on the host ("aten::"
        # counters): each one cuts the graph
        fallbacks = sum(self._met.counter_value(name) or 0 for name in self._met.counter_names()
                        if name.startswith("aten::"))
        return GraphCounters(compiles, compile_ns / 1e9, graphs, int(ir_nodes), executions, execute_ns / 1e9,
                             fallbacks)

    # Under SPMD every value the step returns is already global: one report, no collective.
    reporting_processes = 1

    def sum_over_processes(self, values):
        return values

    def gather_rows(self, t):
        return t  # a global (sharded) tensor already


@dataclass(frozen=True)
class GraphCounters:
    """torch_xla's running totals (torch_xla.debug.metrics) since the process started; the
    difference of two is what ran between them."""
    compiles: int
    compile_seconds: float
    graphs_traced: int
    ir_nodes: int  # summed over the graphs traced
    executions: int
    execute_seconds: float  # ExecuteReplicatedTime: the device running the graphs
    host_fallbacks: int  # ops run on the host: no lowering, or a value read back (aten:: counters)

    def __sub__(self, earlier: "GraphCounters") -> "GraphCounters":
        return GraphCounters(*(a - b for a, b in zip(astuple(self), astuple(earlier))))


def _spmd_save_planner():
    """torch_xla's SPMD save planner, keeping one of the identical shards a process holds of a
    tensor sharded over 'fsdp' and replicated over 'data': its own deduplication (torch_xla 2.9)
    drops every copy of such a shard, and with it the tensor (seen on a 2 x 2 CPU mesh)."""
    import dataclasses
    from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

    class DedupSPMDSavePlanner(SPMDSavePlanner):
        def create_local_plan(self):
            plan, seen = super().create_local_plan(), set()
            unique = [item for item in plan.items if not (item.index in seen or seen.add(item.index))]
            return dataclasses.replace(plan, items=unique)

    return DedupSPMDSavePlanner()


def mesh_shape(num_devices: int, mesh) -> tuple[int, int]:
    """runtime.mesh [data, fsdp] with at most one -1 (the rest of the devices): [-1, 1] is
    data-parallel, [1, -1] FSDP over every device, [2, 2] both."""
    data, fsdp = mesh
    if data == -1 and fsdp > 0 and num_devices % fsdp == 0:
        data = num_devices // fsdp
    elif fsdp == -1 and data > 0 and num_devices % data == 0:
        fsdp = num_devices // data
    if data < 1 or fsdp < 1 or data * fsdp != num_devices:
        raise ValueError(f"runtime.mesh {list(mesh)} does not fit {num_devices} devices; give "
                         f"[data, fsdp] with data x fsdp = {num_devices}, -1 for one of them")
    return data, fsdp


@dataclass
class MachineDevices:
    """What a machine shows the runtime: PJRT_DEVICE if the user set it, a TPU, CUDA GPUs, and
    whether torch_xla is installed."""
    pjrt_device: str | None
    tpu: bool
    gpus: int
    torch_xla: bool

    @classmethod
    def probe(cls) -> "MachineDevices":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return cls(os.environ.get("PJRT_DEVICE"), _tpu_present(), gpus,
                   importlib.util.find_spec("torch_xla") is not None)

    def __str__(self) -> str:
        return (f"{'a TPU' if self.tpu else 'no TPU'}, {self.gpus} CUDA GPU{'s' * (self.gpus != 1)}, "
                f"torch_xla {'installed' if self.torch_xla else 'not installed'}"
                + (f", PJRT_DEVICE={self.pjrt_device}" if self.pjrt_device else ""))


def choose_backend(requested: str, seen: MachineDevices) -> tuple[str, str]:
    """(backend, why). auto: PJRT_DEVICE set by the user, else a TPU, else a visible GPU, else
    XLA:CPU where torch_xla is installed, else the CPU. A backend that cannot run here is a
    ConfigError naming what was found and what to pass instead."""
    if requested == "auto":
        if seen.pjrt_device and seen.torch_xla:
            return "xla", f"auto: PJRT_DEVICE={seen.pjrt_device} is set"
        if seen.tpu and not seen.torch_xla:
            raise ConfigError(f"a TPU is visible but torch_xla is not installed (found: {seen}); "
                              f"pip install -e '.[xla]', or pass runtime.backend=cpu")
        if seen.tpu:
            return "xla", "auto: a TPU is visible"
        if seen.gpus:
            return "cuda", f"auto: {seen.gpus} CUDA GPU{'s' * (seen.gpus != 1)} visible"
        if seen.torch_xla:
            return "xla", "auto: no TPU or GPU visible; torch_xla is installed (XLA:CPU)"
        return "cpu", "auto: no TPU or GPU visible and torch_xla is not installed"
    if requested == "xla" and not seen.torch_xla:
        raise ConfigError(f"runtime.backend=xla needs torch_xla, which is not installed (found: {seen}); "
                          f"pip install -e '.[xla]', or pass runtime.backend={'cuda' if seen.gpus else 'cpu'}")
    if requested == "cuda" and not seen.gpus:
        instead = "xla or auto" if seen.torch_xla or seen.tpu else "cpu or auto"
        raise ConfigError(f"runtime.backend=cuda, but no CUDA GPU is visible (found: {seen}); "
                          f"pass runtime.backend={instead}")
    return requested, f"runtime.backend={requested}"


def create_runtime(backend: str = "auto", precision: str = "bf16", compile_cache: str | None = None,
                   mesh=(-1, 1), slices: int = 1, devices: MachineDevices | None = None,
                   **keys) -> Runtime:
    """`devices`: what choose_backend sees (default: this machine's, probed); `keys`:
    RuntimeConfig's other keys: the eager step's (see EagerRuntime, CudaRuntime) and xla's
    scan_blocks. `mesh` [data, fsdp] means the same on every backend: over XLA's devices, or over
    cuda's and cpu's processes."""
    options = RuntimeConfig(**keys)
    check_sdpa_backends(options.sdpa_backends)
    backend, why = choose_backend(backend, devices or MachineDevices.probe())
    if backend == "xla":
        runtime = XlaRuntime(precision, compile_cache, mesh, slices, options.scan_blocks, options.dynamo_step)
    else:
        if slices != 1:
            raise ConfigError("runtime.slices is for the xla backend (TPU slices over DCN); on cuda and cpu "
                              "leave it at 1")
        if options.scan_blocks:
            raise ConfigError("runtime.scan_blocks is for the xla backend; leave it false on cuda and cpu")
        if options.dynamo_step:
            raise ConfigError("runtime.dynamo_step is for the xla backend; on cuda and cpu use "
                              "runtime.torch_compile")
        runtime = (CudaRuntime if backend == "cuda" else EagerRuntime)(precision, options, mesh)
    runtime.backend_reason = why
    return runtime
