"""Image shards in the webdataset layout: tar files of `<key>.jpg` + `<key>.cls` (or `<key>.json`,
as img2dataset writes), indexed by a `manifest.json` beside them, so training never lists objects.

Reading and writing use the standard library's tarfile: training needs an order fixed by (seed,
epoch), mid-epoch resume, equal batch counts on every host, and reads that survive a storage
outage, which the webdataset library's pipeline does not give exactly.
"""
import hashlib
import io
import json
import logging
import re
import tarfile
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from . import remote_io
from ..config import ConfigError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"shard-\d{6}\.tar")


def join(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


# --- tar I/O ----------------------------------------------------------------------------------
def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar with fixed metadata (mtime 0, no owner): the same members give the same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def iter_samples(url: str):
    """Yield (key, {extension: bytes}) in tar order, grouping consecutive members by key (the
    part of the name before the first dot). A truncated or corrupt tar ends the shard with a
    warning naming it; the samples before the damage are kept."""
    key, sample = None, {}
    try:
        with remote_io.RetryingReader(url) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                k, _, ext = name.partition(".")
                if k != key and sample:
                    yield key, sample
                    sample = {}
                key = k
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as e:
        log.warning("shard %s is truncated or corrupt after key %s (%s); skipping its rest", url, key, e)
        return
    if sample:
        yield key, sample


def jpeg_of(sample: dict) -> bytes | None:
    return sample.get("jpg") or sample.get("jpeg")


def label_of(sample: dict) -> int:
    if "cls" in sample:
        return int(sample["cls"].decode().strip())
    if "json" in sample:
        meta = json.loads(sample["json"])
        for name in ("label", "cls", "class"):
            if isinstance(meta.get(name), int):
                return meta[name]
    return -1


# --- the manifest -----------------------------------------------------------------------------
@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str
    keys_sha256: str


@dataclass
class ImageManifest:
    shards: list[ShardInfo]
    classes: list[str] = field(default_factory=list)
    max_side: int | None = None
    quality: int | None = None

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> str:
        return json.dumps({"format": "webdataset", "num_samples": self.num_samples,
                           "shards": [vars(s) for s in self.shards], "classes": self.classes,
                           "max_side": self.max_side, "quality": self.quality}, indent=1)

    @classmethod
    def load(cls, prefix: str) -> "ImageManifest":
        url = join(prefix, MANIFEST)
        if not remote_io.exists(url):
            raise FileNotFoundError(f"no shard manifest at {url}; write shards with `xla-trainer make-shards`")
        meta = json.loads(remote_io.read_bytes(url))
        return cls([ShardInfo(**s) for s in meta["shards"]], meta["classes"], meta["max_side"], meta["quality"])

    def check_sizes(self, prefix: str):
        """A ConfigError naming the first shard under `prefix` that is missing or not the size the
        manifest records (a truncated copy, a shard rewritten since): one listing, nothing read."""
        fs, root = remote_io.filesystem(prefix)
        sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in fs.ls(root, detail=True)}
        for shard in self.shards:
            found, url = sizes.get(shard.name), join(prefix, shard.name)
            if found == shard.bytes:
                continue
            state = "is missing" if found is None else f"holds {found} bytes where its manifest records {shard.bytes}"
            raise ConfigError(f"image shard {url} {state}: it is truncated or damaged. Rebuild it: run `xla-trainer "
                              f"make-shards` again with the images and arguments that wrote {prefix} (the same "
                              f"shards come out, and targets made from them still fit), or copy it again")


# --- make-shards ------------------------------------------------------------------------------
def encode_image(path: str, max_side: int | None, quality: int) -> bytes:
    """The original JPEG bytes when they fit; otherwise re-encoded with the longest side bounded
    (full-size ImageNet JPEGs decode too slowly to feed an accelerator)."""
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as image:
        image.load()
        if image.format == "JPEG" and image.mode == "RGB" and (not max_side or max(image.size) <= max_side):
            return raw
        image = image.convert("RGB")
        if max_side and max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
        return out.getvalue()


def _write_shard(job) -> ShardInfo | None:
    index, prefix, items, max_side, quality = job
    members, keys = [], []
    for key, path, label in items:
        try:
            data = encode_image(path, max_side, quality)
        except Exception as e:  # PIL raises many types for bad files
            log.warning("make-shards: skipping unreadable image %s: %s", path, e)
            continue
        members += [(f"{key}.jpg", data), (f"{key}.cls", str(label).encode())]
        keys.append(key)
    blob = tar_bytes(members)
    remote_io.write_bytes_atomic(join(prefix, shard_name(index)), blob)
    return ShardInfo(shard_name(index), len(keys), len(blob), hashlib.sha256(blob).hexdigest(), keys_digest(keys))


def is_shard_file(name: str) -> bool:
    return name == MANIFEST or SHARD_NAME.fullmatch(name) is not None


def make_shards(image_root: str, prefix: str, shard_size: int, max_side: int | None = None,
                quality: int = 90, seed: int = 0, workers: int = 2) -> ImageManifest:
    """ImageFolder tree (root/<class>/<image>) -> shuffled shards of `shard_size` images under a
    local or gs:// prefix, then the manifest (written last: no manifest, no dataset). The prefix
    must be new or empty, or hold an interrupted run of the same job, which this one redoes."""
    import torch
    from torchvision.datasets import ImageFolder
    folder = ImageFolder(image_root, loader=lambda p: p)
    job = {"command": "make-shards", "images": str(Path(image_root).resolve()), "shard_size": shard_size,
           "max_side": max_side, "quality": quality, "seed": seed}
    remote_io.claim_output(prefix, job, "Pass another output prefix.")
    remote_io.remove_temporaries(prefix, is_shard_file)
    order = torch.randperm(len(folder.samples), generator=torch.Generator().manual_seed(seed)).tolist()
    items = [(f"{i:09d}", *folder.samples[j]) for i, j in enumerate(order)]
    jobs = [(n, prefix, items[s:s + shard_size], max_side, quality)
            for n, s in enumerate(range(0, len(items), shard_size))]
    with get_context("spawn").Pool(workers) as pool:
        infos = list(tqdm(pool.imap(_write_shard, jobs), total=len(jobs), desc="make-shards", unit="shard"))
    manifest = ImageManifest(infos, folder.classes, max_side, quality)
    remote_io.write_bytes_atomic(join(prefix, MANIFEST), manifest.to_json().encode())
    return manifest


def index_shards(prefix: str) -> ImageManifest:
    """Write the manifest of existing webdataset shards (e.g. from img2dataset) under a prefix:
    the one time the objects are listed; training then reads the manifest only. An existing
    manifest is never replaced."""
    if remote_io.exists(join(prefix, MANIFEST)):
        raise ConfigError(f"{join(prefix, MANIFEST)} exists already and is left as it is; delete it "
                          f"yourself to index the shards again")
    remote_io.remove_temporaries(prefix, lambda name: name == MANIFEST)
    names = sorted(n for n in remote_io.list_names(prefix) if n.endswith(".tar"))
    if not names:
        raise FileNotFoundError(f"no .tar shards under {prefix}")
    infos = []
    for name in tqdm(names, desc="index-shards", unit="shard"):
        blob = remote_io.read_bytes(join(prefix, name))
        keys = [key for key, sample in iter_samples(join(prefix, name)) if "jpg" in sample or "jpeg" in sample]
        infos.append(ShardInfo(name, len(keys), len(blob), hashlib.sha256(blob).hexdigest(), keys_digest(keys)))
    manifest = ImageManifest(infos)
    remote_io.write_bytes_atomic(join(prefix, MANIFEST), manifest.to_json().encode())
    return manifest
