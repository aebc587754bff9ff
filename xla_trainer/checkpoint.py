"""Checkpoints in one format on every backend: torch.distributed.checkpoint (DCP) directories
<output_dir>/checkpoints/<step>/, local or any fsspec URL (gs://).

A save is asynchronous: the state is copied to host memory (the runtime's `stage_state`), then a
background thread writes it while training goes on; every process writes its own shards (XLA
SPMD, FSDP2) or DCP's deduplicated share of the replicas (DDP, HSDP). Process 0 writes COMMITTED, with every
file's size, once DCP has finished on every process: a checkpoint without it (a crash mid-save)
is never resumed and is removed at the next start. Only finite state is written. Every reader
checks a checkpoint first (`damage`: the commit marker, the metadata, each file's size); a run
resumes from its newest intact one and sets damaged ones aside (renamed, never deleted).
Restoring reads into the current model's placement, so a checkpoint saved on one backend, mesh
or process count restores on any other."""
import json
import logging
import pickle
import re
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from .config import ConfigError
from .data.remote_io import (exists, filesystem, list_names, move_aside, read_bytes, sync_to_disk,
                              write_bytes_atomic)

COMMITTED = "commit.json"  # written last, by process 0: the checkpoint is whole
DCP_FILES = re.compile(r"(\.metadata|__\d+_\d+\.distcp)$")  # what a DCP save writes into its folder

log = logging.getLogger(__name__)
# What reading a damaged checkpoint raises: many kinds (unpickling, sizes, EOF), or DCP's
# CheckpointException around them, which is a BaseException
READ_ERRORS = (Exception, CheckpointException)


class NonFiniteState(RuntimeError):
    """A save found non-finite values in the state: nothing was written."""


def model_state(module: torch.nn.Module) -> dict:
    """The state_dict under the model's own names, whatever wrappers (FSDPv2's `_orig_module`)
    the runtime put inside it: checkpoints move between meshes."""
    return {k.replace("_orig_module.", ""): v for k, v in module.state_dict().items()}


def load_model_state(module: torch.nn.Module, state: dict):
    names = {k.replace("_orig_module.", ""): k for k in module.state_dict()}
    module.load_state_dict({names.get(k, k): v for k, v in state.items()})


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


# --- finding checkpoints ------------------------------------------------------------------------
def is_committed(step_folder: str) -> bool:
    return exists(_join(step_folder, COMMITTED))


def committed_steps(folder: str) -> list[int]:
    """Steps under `folder` (a checkpoints/ directory) whose save completed."""
    return sorted(int(n) for n in list_names(folder) if n.isdigit() and is_committed(_join(folder, n)))


def damage(step_folder: str) -> str | None:
    """Why the checkpoint at `step_folder` cannot be read whole (no commit marker, an unreadable
    marker or metadata, a file missing or of another size than at its commit), or None."""
    fs, local = filesystem(step_folder)
    try:
        record = json.loads(read_bytes(_join(step_folder, COMMITTED)))
    except FileNotFoundError:
        return f"no {COMMITTED}: a save that did not finish, or is still being written"
    except (ValueError, OSError) as e:
        return f"{COMMITTED} is not readable ({e})"
    sizes = {p["name"].rstrip("/").rsplit("/", 1)[-1]: p["size"] for p in fs.ls(local, detail=True, refresh=True)}
    for name, size in record.get("files", {}).items():
        if sizes.get(name) != size:
            found = "missing" if name not in sizes else f"{sizes[name]} bytes"
            return f"{name} is {found}; it had {size} bytes when committed"
    try:
        FsspecReader(step_folder).read_metadata()
    except READ_ERRORS as e:  # an unpickling error of any kind
        return f".metadata is not readable ({type(e).__name__}: {e})"
    return None


def newest_checkpoint(output_dir: str) -> str | None:
    """The newest committed checkpoint directory of a run, given its output_dir or its
    checkpoints/ folder."""
    found = {s: _join(folder, str(s)) for folder in (output_dir, _join(output_dir, "checkpoints"))
             for s in committed_steps(folder)}
    return found[max(found)] if found else None


# --- the saved layout ---------------------------------------------------------------------------
# One flat dict: "model.<name>" and "optimizer.<param index>.<state name>" tensors, "extra.<n>" the
# extra state's tensors, and "objects" the rest of the extra state pickled into bytes with each
# tensor's key in its place. Flat by our hand: torch's and torch_xla's planners flatten nested
# non-tensor values differently, and a checkpoint must load under both.
TENSOR = "__checkpoint_tensor__"


def flatten_state(model: dict, optimizer_state: dict, extra) -> dict:
    flat = {f"model.{k}": v for k, v in model.items()}
    flat.update({f"optimizer.{i}.{k}": v for i, state in optimizer_state.items() for k, v in state.items()})
    tensors = []

    def place(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return {TENSOR: f"extra.{len(tensors) - 1}"}
        if isinstance(value, dict):
            return {k: place(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(place(v) for v in value)
        return value

    flat["objects"] = pickle.dumps(place(extra))
    flat.update({f"extra.{i}": t for i, t in enumerate(tensors)})
    return flat


def unflatten_state(flat: dict) -> tuple[dict, dict, object]:
    """(model state_dict, optimizer state, extra) of flatten_state's dict."""
    model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    optimizer: dict = {}
    for key, value in flat.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer.setdefault(int(index), {})[name] = value

    def fill(value):
        if isinstance(value, dict):
            return flat[value[TENSOR]] if TENSOR in value else {k: fill(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(fill(v) for v in value)
        return value

    return model, optimizer, fill(pickle.loads(flat["objects"])) if flat.get("objects") else None


# --- reading without a process group (eval, export, tests) ------------------------------------
def read_checkpoint(path: str, entries: tuple[str, ...] = ("model", "optimizer", "extra")) -> dict:
    """The `entries` of the checkpoint at `path`, whole, on the CPU, in this process: every
    tensor assembled from its shards, whatever mesh or process count wrote it, into an empty
    tensor built from the checkpoint's metadata. A damaged or unfinished checkpoint is a
    ValueError naming it."""
    why = damage(path)
    if why:
        raise ValueError(f"{path} is not a whole checkpoint: {why}; pass another checkpoint (an older "
                         f"step under {path.rstrip('/').rsplit('/', 1)[0]})")
    reader = FsspecReader(path)
    metadata = reader.read_metadata().state_dict_metadata
    wanted = tuple(f"{e}." for e in entries)
    flat = {key: torch.empty(item.size, dtype=item.properties.dtype) for key, item in metadata.items()
            if isinstance(item, TensorStorageMetadata) and key.startswith(wanted)}
    if "extra" in entries and "objects" in metadata:
        flat["objects"] = b""
    if not flat:
        raise ValueError(f"{path}: a distributed checkpoint without {' / '.join(entries)} entries (found "
                         f"{sorted({k.split('.')[0] for k in metadata})})")
    with warnings.catch_warnings():  # single-process loading is the intent here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(flat, storage_reader=reader, no_dist=True)
    model, optimizer, extra = unflatten_state(flat)
    return {k: v for k, v in (("model", model), ("optimizer", optimizer), ("extra", extra)) if k in entries}


# --- the store the loop saves to and resumes from ---------------------------------------------
class Checkpoints:
    """Asynchronous DCP saves into <output_dir>/checkpoints/<step>/, the newest `keep` kept
    (0: all); `runtime` places the state (stage_state, checkpoint_planners, checkpoint_group,
    prime_optimizer). Every process makes one, at the same point of the program. At the start,
    every committed checkpoint is checked (`damage`): damaged ones are logged and, by process 0,
    set aside as <step>.damaged-<time> (kept, never deleted: a later save of that step must not
    write into them); none intact while some are damaged is a ConfigError naming them all."""

    def __init__(self, output_dir: str, keep: int, runtime):
        self.output_dir, self.keep, self.runtime = output_dir.rstrip("/"), keep, runtime
        self.dir = _join(self.output_dir, "checkpoints")
        self.group = runtime.checkpoint_group()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending: Future | None = None
        if runtime.is_main:
            self._remove_unfinished()
        runtime.barrier()
        damaged = {}
        for step in committed_steps(self.dir):  # every process reads the same files: the same verdict
            why = damage(self.location(step))
            if why:
                damaged[step] = why
                log.error("checkpoint %s is damaged: %s", self.location(step), why)
        self.steps = sorted(set(committed_steps(self.dir)) - set(damaged))
        if damaged and not self.steps:
            raise ConfigError(f"no intact checkpoint under {self.dir}: " + "; ".join(
                f"{self.location(s)}: {why}" for s, why in sorted(damaged.items(), reverse=True)) +
                ". They are left as they are; start over in a new train.output_dir")
        runtime.barrier()  # every process has read the folders before they move
        for step, why in damaged.items():
            self.set_aside(step, why)

    def _remove_unfinished(self):
        """Step folders a killed save left without COMMITTED, holding only DCP's own files."""
        fs, _ = filesystem(self.dir)
        done = set(committed_steps(self.dir))
        for name in list_names(self.dir):
            folder = _join(self.dir, name)
            if name.isdigit() and int(name) not in done and all(DCP_FILES.search(n) for n in list_names(folder)):
                fs.rm(filesystem(folder)[1], recursive=True)

    def intact_steps(self) -> list[int]:
        """The steps of the intact checkpoints, newest first."""
        return sorted(self.steps, reverse=True)

    def latest(self) -> int | None:
        return max(self.steps) if self.steps else None

    def location(self, step: int) -> str:
        return _join(self.dir, str(step))

    def set_aside(self, step: int, why: str):
        """A damaged checkpoint renamed <step>.damaged-<time> by process 0 (every process calls it)."""
        self.steps = [s for s in self.steps if s != step]
        if self.runtime.is_main:
            path = self.location(step)
            aside = move_aside(path, "damaged")
            log.warning("checkpoint %s set aside as %s (%s); it is kept, not deleted", path, aside, why)
        self.runtime.barrier()

    def saved_objects(self, step: int) -> dict:
        """The plain values of the extra state saved at `step` (config, step, ...), its tensors
        left out: cheap to read before a restore. {} if they cannot be read: the restore then
        fails and says why."""
        path = self.location(step)
        try:
            flat = {"objects": b""}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(flat, storage_reader=FsspecReader(path), no_dist=True)
            return pickle.loads(flat["objects"])
        except READ_ERRORS as e:
            log.warning("the saved config of %s cannot be read (%r)", path, e)
            return {}

    def save(self, step: int, model, optimizer, extra: dict):
        """Starts the save of `step` and returns; the previous save is finished first (its error,
        if any, raised here). Only the optimizer's tensors are saved: its param_groups come from
        the config and the schedule."""
        self.wait()
        state = flatten_state(model_state(model), optimizer.state_dict()["state"], extra)
        self.pending = self.worker.submit(self._write, step, self.runtime.stage_state(state))

    def _write(self, step: int, state: dict):
        folder = _join(self.dir, str(step))
        self._check_finite(step, state)
        planner, _ = self.runtime.checkpoint_planners()
        # sync_files=False: sync_to_disk below forces exactly the folder's files to disk, on every torch
        dcp.save(state, storage_writer=FsspecWriter(folder, sync_files=False), planner=planner,
                 process_group=self.group, no_dist=self.group is None)
        self.steps = sorted(set(self.steps) | {step})
        if self.runtime.is_main:  # DCP returns once every process's shards are written
            sync_to_disk(folder)  # the files on disk before the commit marker that vouches for them
            fs, local = filesystem(folder)
            files = {p["name"].rstrip("/").rsplit("/", 1)[-1]: p["size"]
                     for p in fs.ls(local, detail=True, refresh=True)}
            record = {"step": step, "processes": self.runtime.process_count,
                      "backend": self.runtime.backend, "time": time.time(), "files": files}
            write_bytes_atomic(_join(folder, COMMITTED), json.dumps(record).encode())
            self._remove_old()

    def _check_finite(self, step: int, state: dict):
        """Raise NonFiniteState, on every process alike, if any process's staged state holds a
        non-finite value (the step never applies such an update: this is the last line)."""
        bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
               and not all(bool(torch.isfinite(part).all()) for part in _local_parts(v))]
        if self.group is not None:
            flag = torch.tensor([len(bad)])
            torch.distributed.all_reduce(flag, group=self.group)
            if flag.item() and not bad:
                bad = ["(on another process)"]
        if bad:
            raise NonFiniteState(f"step {step} was not saved: {len(bad)} tensors hold non-finite values "
                                 f"({', '.join(bad[:3])}); the newest checkpoint is kept as it was")

    def _remove_old(self):
        fs, _ = filesystem(self.dir)
        steps = committed_steps(self.dir)
        for step in steps[:-self.keep] if self.keep > 0 else []:
            fs.rm(filesystem(_join(self.dir, str(step)))[1], recursive=True)
            self.steps = [s for s in self.steps if s != step]

    def restore(self, step: int, model, optimizer, template: dict) -> dict:
        """Loads `step` into the model and optimizer where they are placed now; returns the saved
        extra state, read into `template` (an extra of the same structure)."""
        reader = FsspecReader(self.location(step))
        self.runtime.prime_optimizer(optimizer)  # DCP loads in place: the state tensors must exist
        current = optimizer.state_dict()
        state = flatten_state(model_state(model), current["state"], template)
        _, planner = self.runtime.checkpoint_planners()
        dcp.load(state, storage_reader=reader, planner=planner, process_group=self.group,
                 no_dist=self.group is None)
        model_sd, optimizer_state, extra = unflatten_state(state)
        load_model_state(model, model_sd)
        optimizer.load_state_dict({"state": optimizer_state, "param_groups": current["param_groups"]})
        return extra

    def wait(self):
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self):
        self.wait()
        self.worker.shutdown()


def _local_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """This process's data of a staged tensor: its shards' (XLA SPMD), its local shard (a DTensor,
    FSDP2: read locally, no collective on the training's process group) or itself."""
    if isinstance(tensor, DTensor):
        return [tensor.to_local()]
    shards = getattr(tensor, "local_shards", None)
    return [s.data for s in shards] if shards is not None else [tensor]


def is_distributed_checkpoint(path: str) -> bool:
    return exists(_join(path, ".metadata"))
