"""Precomputed teacher targets: `precompute-targets` runs the CLIP teacher once over K augmented
views of every image and writes one target shard per image shard (same keys, same order).

Per sample a target shard holds `<key>.views.json` (crop boxes and flips), `<key>.tokens.npy`
(K, 1 + grid, dim) in float16 or int8, and for int8 `<key>.scale.npy` (K, 1 + grid) float32, one
scale per token. A shard is written under a temporary name and moved into place when complete,
then its info file `<shard>.json`; a re-run skips shards whose info file agrees with them, so a
killed job resumes without redoing or corrupting work. The manifest is written last.
"""
import hashlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from xla_trainer_models import TEACHERS
from .data import remote_io
from .config import Config, ConfigError
from .data.shards import MANIFEST, ImageManifest, ShardInfo, iter_samples, jpeg_of, join, keys_digest, tar_bytes
from .data.views import decode_view, image_size_of, sample_view

log = logging.getLogger(__name__)


@dataclass
class TargetManifest:
    teacher: str
    pretrained: str | None
    weights_sha256: str
    image_size: int
    grid: list
    dim: int
    num_views: int
    dtype: str
    seed: int
    crop_scale: list
    bytes_per_image: float
    shards: list
    crop_ratio: list

    @classmethod
    def load(cls, prefix: str) -> "TargetManifest":
        url = join(prefix, MANIFEST)
        if not remote_io.exists(url):
            raise ConfigError(f"no target manifest at {url}; run `xla-trainer precompute-targets` "
                              f"with targets.prefix={prefix}")
        meta = json.loads(remote_io.read_bytes(url))
        meta["shards"] = [ShardInfo(**s) for s in meta["shards"]]
        return cls(**meta)

    def check_against(self, cfg: Config, images: ImageManifest):
        """Targets from another teacher, resolution or image set fail here, before training."""
        expected = (*teacher_identity(cfg), cfg.backbone.image_size)
        found = (self.teacher, self.pretrained, self.image_size)
        if expected == found and self.pretrained is None and self.seed != cfg.train.seed:
            raise ConfigError(f"targets at {cfg.targets.prefix} come from a random teacher drawn with "
                              f"seed {self.seed}, the config has train.seed {cfg.train.seed}")
        if expected != found:
            raise ConfigError(f"targets at {cfg.targets.prefix} were made by teacher {found[0]} "
                              f"({found[1]}) at {found[2]} px, but the config expects {expected[0]} "
                              f"({expected[1]}) at {expected[2]} px; precompute them again or fix the config")
        by_name = {s.name: s for s in self.shards}
        present = set(remote_io.list_names(cfg.targets.prefix))
        for shard in images.shards:
            t = by_name.get(shard.name)
            if t is None or shard.name not in present:
                raise ConfigError(f"target shard {join(cfg.targets.prefix, shard.name)} is missing; "
                                  f"run precompute-targets again to complete {cfg.targets.prefix}")
            if (t.samples, t.keys_sha256) != (shard.samples, shard.keys_sha256):
                raise ConfigError(f"target shard {join(cfg.targets.prefix, shard.name)} has "
                                  f"{t.samples} samples with other keys than image shard {shard.name} "
                                  f"({shard.samples}); precompute it again")


def build_teacher(cfg: Config) -> torch.nn.Module:
    """The teacher of the config's teacher section, at the student's resolution."""
    torch.manual_seed(cfg.train.seed)  # a random teacher (pretrained: null) is the same every time
    try:
        return TEACHERS.get(cfg.teacher.name).build(cfg.teacher, cfg.backbone.image_size)
    except ValueError as e:
        raise ConfigError(f"teacher: {e}") from None


def teacher_identity(cfg: Config) -> tuple[str, str | None]:
    """(model, weights) of the teacher, as target manifests record them."""
    return TEACHERS.get(cfg.teacher.name).identity(cfg.teacher)


def weights_digest(teacher) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def quantize(tokens: np.ndarray, dtype: str) -> dict:
    """float32 (K, T, C) -> the stored arrays."""
    if dtype == "float16":
        return {"tokens": tokens.astype(np.float16)}
    scale = np.maximum(np.abs(tokens).max(-1), 1e-12) / 127.0
    q = np.clip(np.rint(tokens / scale[..., None]), -127, 127).astype(np.int8)
    return {"tokens": q, "scale": scale.astype(np.float32)}


def dequantize(tokens: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    tokens = tokens.astype(np.float32)
    return tokens if scale is None else tokens * scale[..., None]


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class TeacherRunner:
    """Teacher forward over fixed-size batches on the runtime's device (the last batch padded, so
    XLA compiles once)."""

    def __init__(self, teacher, runtime, batch_size: int):
        self.teacher, self.runtime, self.batch_size = teacher.to(runtime.device), runtime, batch_size
        self.forward = runtime.compile_fn(self._forward, name="teacher")

    def _forward(self, images):
        with self.runtime.autocast():
            return self.teacher(images).float()

    def __call__(self, views: np.ndarray) -> np.ndarray:
        outs = []
        for start in range(0, len(views), self.batch_size):
            chunk = views[start:start + self.batch_size]
            padded = np.zeros((self.batch_size, *chunk.shape[1:]), np.float32)
            padded[:len(chunk)] = chunk
            images = self.runtime.shard_batch({"images": torch.from_numpy(padded)})["images"]
            outs.append(self.forward(images).cpu().numpy()[:len(chunk)])
        return np.concatenate(outs)


def compute_shard(url: str, runner: TeacherRunner, cfg: Config, bar) -> tuple[bytes, list[str]]:
    t = cfg.targets
    members, keys = [], []
    for key, sample in iter_samples(url):
        jpeg = jpeg_of(sample)
        try:
            width, height = image_size_of(jpeg)
            views = [sample_view(cfg.train.seed, key, k, width, height, cfg.data.crop_scale,
                                 cfg.data.crop_ratio)
                     for k in range(t.num_views)]
            pixels = np.stack([decode_view(jpeg, box, flip, cfg.backbone.image_size) for box, flip in views])
        except Exception as e:
            log.warning("precompute: skipping unreadable image %s in %s: %s", key, url, e)
            continue
        stored = quantize(runner(pixels), t.dtype)
        meta = {"boxes": [list(box) for box, _ in views], "flips": [flip for _, flip in views]}
        members.append((f"{key}.views.json", json.dumps(meta).encode()))
        members += [(f"{key}.{name}.npy", npy_bytes(a)) for name, a in stored.items()]
        keys.append(key)
        bar.update(1)
    return tar_bytes(members), keys


def committed(target_url: str, image_shard: ShardInfo) -> ShardInfo | None:
    """The info of a finished target shard that agrees with its image shard, else None."""
    info_url = target_url + ".json"
    if not (remote_io.exists(info_url) and remote_io.exists(target_url)):
        return None
    info = ShardInfo(**json.loads(remote_io.read_bytes(info_url)))
    fs, path = remote_io.filesystem(target_url)
    if info.bytes != fs.size(path) or info.samples != image_shard.samples:
        log.warning("target shard %s does not match its info file; computing it again", target_url)
        return None
    return info


def wait_for_shards(images: ImageManifest, prefix: str, process_count: int, poll: float = 10.0,
                    timeout: float = 24 * 3600) -> list[ShardInfo]:
    """Host 0 writes the manifest once every host's shards are committed. Polling the info files
    needs no collective, which SPMD hosts do not have outside a compiled graph."""
    deadline = time.time() + (timeout if process_count > 1 else 0)
    while True:
        infos = [committed(join(prefix, s.name), s) for s in images.shards]
        missing = [s.name for s, i in zip(images.shards, infos) if i is None]
        if not missing:
            return infos
        if time.time() > deadline:
            raise RuntimeError(f"target shards not finished: {missing[:5]}{'...' if len(missing) > 5 else ''}")
        log.info("waiting for %d target shards from other hosts", len(missing))
        time.sleep(poll)


def claim_targets(cfg: Config, images: ImageManifest, is_main: bool, shards: set[str]):
    """targets.prefix is written only when new or empty, or when it holds this same job (a re-run
    resumes it): targets of another teacher, resolution, view count, ... never mix into it. Then
    this host's leftovers of an interrupted run go."""
    t = cfg.targets
    image_set = hashlib.sha256("".join(s.sha256 for s in images.shards).encode()).hexdigest()
    job = {"command": "precompute-targets", "image_shards_sha256": image_set, "teacher": teacher_identity(cfg)[0],
           "pretrained": teacher_identity(cfg)[1], "image_size": cfg.backbone.image_size, "num_views": t.num_views,
           "dtype": t.dtype, "seed": cfg.train.seed, "crop_scale": list(cfg.data.crop_scale),
           "precision": cfg.runtime.precision}
    remote_io.claim_output(t.prefix, job, "Pass another targets.prefix.")
    mine = lambda name: name.removesuffix(".json") in shards or (is_main and name == MANIFEST)
    remote_io.remove_temporaries(t.prefix, mine)


def precompute_targets(cfg: Config, runtime) -> TargetManifest | None:
    """Host 0 returns the manifest; the others return None once their shards are written."""
    t = cfg.targets
    if not cfg.data.shards or not t.prefix:
        raise ConfigError("precompute-targets needs data.shards (image shards) and targets.prefix (output)")
    if t.batch_size % runtime.data_parallel_size:
        raise ConfigError(f"targets.batch_size {t.batch_size} is not divisible by {runtime.data_parallel_size} devices")
    images = ImageManifest.load(cfg.data.shards)
    images.check_sizes(cfg.data.shards)  # targets of a truncated shard would never match its manifest
    mine = images.shards[runtime.process_index::runtime.process_count]
    claim_targets(cfg, images, runtime.is_main, {s.name for s in mine})
    teacher = build_teacher(cfg)
    runner = TeacherRunner(teacher, runtime, t.batch_size)
    bar = tqdm(total=sum(s.samples for s in mine), desc="precompute-targets", unit="img",
               disable=not runtime.is_main, dynamic_ncols=True)
    for shard in mine:
        target_url = join(t.prefix, shard.name)
        if committed(target_url, shard):
            bar.update(shard.samples)
            continue
        blob, keys = compute_shard(join(cfg.data.shards, shard.name), runner, cfg, bar)
        remote_io.write_bytes_atomic(target_url, blob)
        info = ShardInfo(shard.name, len(keys), len(blob), hashlib.sha256(blob).hexdigest(), keys_digest(keys))
        remote_io.write_bytes_atomic(target_url + ".json", json.dumps(asdict(info)).encode())
    bar.close()
    if not runtime.is_main:
        return None
    infos = wait_for_shards(images, t.prefix, runtime.process_count)
    manifest = TargetManifest(
        teacher=teacher_identity(cfg)[0], pretrained=teacher_identity(cfg)[1], weights_sha256=weights_digest(teacher),
        image_size=cfg.backbone.image_size, grid=list(teacher.grid), dim=teacher.dim, num_views=t.num_views,
        dtype=t.dtype, seed=cfg.train.seed, crop_scale=list(cfg.data.crop_scale),
        crop_ratio=list(cfg.data.crop_ratio), shards=infos,
        bytes_per_image=sum(i.bytes for i in infos) / max(1, sum(i.samples for i in infos)))
    remote_io.write_bytes_atomic(join(t.prefix, MANIFEST), json.dumps(asdict(manifest), indent=1).encode())
    return manifest
