"""Weights in and out: the official D-iGPT layouts (written out here from the official code's
module names and shapes) into our DiGPT and timm's ViT, our own checkpoints (files and
distributed) out to timm, OpenCLIP visual towers into the teacher, and MAE's sin-cos layout."""
import argparse
import os
import subprocess
import sys

import fsspec
import numpy as np
import open_clip
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed

from xla_trainer_models import BACKBONES, TargetInfo
from xla_trainer_models.backbones.vit_timm import encoder_to_timm
from xla_trainer_models.objectives.digpt import DiGPT, DiGPTConfig
from xla_trainer_models.objectives.digpt_official import digpt_from_official
from xla_trainer_models.layers.pos_embed import sincos_2d
from xla_trainer_models.teachers.openclip import ClipTeacher, OpenClipConfig
from xla_trainer_models.backbones.vit import SegmentViT, ViTConfig
from xla_trainer.checkpoint import newest_checkpoint
from xla_trainer.pretrained import export_backbone, load_backbone_state, read_state_dict
from xla_trainer.runtime import Runtime

pytestmark = pytest.mark.slow  # make test-fast leaves it out

VIT = BACKBONES.get("vit")


def export_timm(src: str, out: str) -> dict:
    return export_backbone(src, out, VIT)


def load_encoder_state(path: str) -> dict:
    return load_backbone_state(path, VIT)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny dims: 32 px images, 8 px patches (a 4x4 grid, four 2x2 segments), width 32
WIDTH, HEADS, PATCH, IMAGE, GRID = 32, 2, 8, 32, 4
DEC_WIDTH, DEC_DEPTH, TEACHER_DIM = 32, 2, 16


def mae_sincos(dim: int, gh: int, gw: int) -> np.ndarray:
    """MAE's layout: [sin(w f), cos(w f), sin(h f), cos(h f)], f_i = 1 / 10000^(i / (dim/4)),
    tokens in row-major (h, w) order."""
    freqs = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    h, w = np.divmod(np.arange(gh * gw), gw)
    parts = [fn(np.outer(pos, freqs)) for pos in (w, h) for fn in (np.sin, np.cos)]
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("grid,dim", [((4, 4), 32), ((14, 14), 64), ((3, 5), 16)])
def test_sincos_matches_mae_layout(grid, dim):
    ours = sincos_2d(grid, dim)
    assert ours.shape == (grid[0] * grid[1], dim) and ours.dtype == torch.float32
    assert np.allclose(ours.numpy(), mae_sincos(dim, *grid), atol=1e-6)
    row, col = grid[0] - 1, 1  # token (row, col): channel 0 is sin(col), channel dim/2 sin(row)
    token = ours[row * grid[1] + col]
    assert token[0] == pytest.approx(np.sin(col), abs=1e-6)
    assert token[dim // 4] == pytest.approx(np.cos(col), abs=1e-6)
    assert token[dim // 2] == pytest.approx(np.sin(row), abs=1e-6)


def test_encoder_and_decoders_use_mae_layout():
    model = tiny_digpt()
    expected = torch.from_numpy(mae_sincos(WIDTH, GRID, GRID)).float()
    assert torch.allclose(model.encoder.pos_embed[0], expected, atol=1e-6)
    for decoder in model.decoders.values():
        assert torch.allclose(decoder.pos_embed[:-1], expected, atol=1e-6)
        assert not decoder.pos_embed[-1].any()  # the cls query's position


# ---- the official layouts, from DiGPT_torch/models_digpt.py, vit.py and models_vit.py ----

def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _linear(gen, prefix, out_dim, in_dim):
    return {f"{prefix}.weight": _randn(gen, out_dim, in_dim), f"{prefix}.bias": _randn(gen, out_dim)}


def _norm(gen, prefix, dim):
    return {f"{prefix}.weight": 1 + 0.1 * _randn(gen, dim), f"{prefix}.bias": 0.1 * _randn(gen, dim)}


def official_encoder(gen, depth, cls_row_zero=True) -> dict:
    """timm-era ViT keys: PatchEmbed conv, pos_embed with the cls row first, Block i."""
    C = WIDTH
    sd = {"patch_embed.proj.weight": 0.1 * _randn(gen, C, 3, PATCH, PATCH),
          "patch_embed.proj.bias": _randn(gen, C), "cls_token": _randn(gen, 1, 1, C)}
    patches = torch.from_numpy(mae_sincos(C, GRID, GRID)).float()
    cls_row = torch.zeros(1, C) if cls_row_zero else _randn(gen, 1, C)
    sd["pos_embed"] = torch.cat([cls_row, patches])[None]
    for i in range(depth):
        b = f"blocks.{i}"
        sd.update({**_norm(gen, f"{b}.norm1", C), **_linear(gen, f"{b}.attn.qkv", 3 * C, C),
                   **_linear(gen, f"{b}.attn.proj", C, C), **_norm(gen, f"{b}.norm2", C),
                   **_linear(gen, f"{b}.mlp.fc1", 4 * C, C), **_linear(gen, f"{b}.mlp.fc2", C, 4 * C)})
    return sd


def official_pretraining(seed=0, depth=4) -> dict:
    """DiGPT(...).state_dict(): encoder, then per decoder d: d_enc2dec (4 taps), d_enc_norm as a
    ModuleList of ONE LayerNorm four times, d_blocks (DecoderBlock), d_token, d_norm, d_pred;
    decoder_pos_embed (zero cls row first) and the buffer mask."""
    gen = torch.Generator().manual_seed(seed)
    sd = official_encoder(gen, depth)
    W, C, N = DEC_WIDTH, WIDTH, GRID * GRID
    dec_pos = torch.from_numpy(mae_sincos(W, GRID, GRID)).float()
    sd["decoder_pos_embed"] = torch.cat([torch.zeros(1, W), dec_pos])[None]
    T = N // 4
    sd["mask"] = torch.zeros(3 * T + 1, 3 * T + 1)
    for d in ("ar", "kd"):
        sd.update(_linear(gen, f"{d}_enc2dec", DEC_DEPTH * W, 4 * C))
        shared = _norm(gen, "n", C)
        for j in range(4):
            sd.update({f"{d}_enc_norm.{j}.{p}": shared[f"n.{p}"] for p in ("weight", "bias")})
        for i in range(DEC_DEPTH):
            b = f"{d}_blocks.{i}"
            sd.update({**_norm(gen, f"{b}.norm1", W), **_linear(gen, f"{b}.attn1.qkv", 3 * W, W),
                       **_linear(gen, f"{b}.attn1.proj", W, W), **_norm(gen, f"{b}.norm2_1", W),
                       **_norm(gen, f"{b}.norm2_2", W), **_linear(gen, f"{b}.attn2.q", W, W),
                       **_linear(gen, f"{b}.attn2.kv", 2 * W, W), **_linear(gen, f"{b}.attn2.proj", W, W),
                       **_norm(gen, f"{b}.norm2", W), **_linear(gen, f"{b}.mlp.fc1", 4 * W, W),
                       **_linear(gen, f"{b}.mlp.fc2", W, 4 * W)})
        sd[f"{d}_token"] = 0.02 * _randn(gen, 1, 1, W)
        sd.update({**_norm(gen, f"{d}_norm", W), **_linear(gen, f"{d}_pred", TEACHER_DIM, W)})
    return sd


def official_finetuning(seed=0, depth=2, classes=10) -> dict:
    """models_vit.VisionTransformer(global_pool=True): the encoder (a learned pos_embed by now)
    plus fc_norm and head."""
    gen = torch.Generator().manual_seed(seed)
    sd = official_encoder(gen, depth, cls_row_zero=False)
    sd["pos_embed"] = sd["pos_embed"] + 0.1 * _randn(gen, *sd["pos_embed"].shape)
    return {**sd, **_norm(gen, "fc_norm", WIDTH), **_linear(gen, "head", classes, WIDTH)}


# official name -> ours, for every official tensor that is a parameter on our side
def official_to_ours(depth: int) -> dict[str, str]:
    names = {k: f"encoder.{k}" for k in ("cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias")}
    for i in range(depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names.update({f"blocks.{i}.{m}.{p}": f"encoder.blocks.{i}.{m}.{p}" for p in ("weight", "bias")})
    block = {"norm1": "norm1", "attn1.qkv": "self_attn.qkv", "attn1.proj": "self_attn.proj",
             "norm2_1": "norm2_q", "norm2_2": "norm2_kv", "attn2.q": "cross_attn.q",
             "attn2.kv": "cross_attn.kv", "attn2.proj": "cross_attn.proj", "norm2": "norm3",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for d in ("ar", "kd"):
        names[f"{d}_token"] = f"decoders.{d}.query_token"
        for theirs, ours in {"enc2dec": "enc2dec", "norm": "head_norm", "pred": "head"}.items():
            names.update({f"{d}_{theirs}.{p}": f"decoders.{d}.{ours}.{p}" for p in ("weight", "bias")})
        for i in range(DEC_DEPTH):
            for theirs, ours in block.items():
                names.update({f"{d}_blocks.{i}.{theirs}.{p}": f"decoders.{d}.blocks.{i}.{ours}.{p}"
                              for p in ("weight", "bias")})
    return names


def tiny_digpt(depth=4, **kw):
    torch.manual_seed(0)
    encoder = SegmentViT(ViTConfig(size="tiny", image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=depth,
                                   heads=HEADS))
    cfg = DiGPTConfig(taps=list(range(1, depth + 1)), decoder_width=DEC_WIDTH, decoder_depth=DEC_DEPTH,
                      decoder_heads=2, **kw)
    return DiGPT(cfg, encoder, TargetInfo(TEACHER_DIM, (GRID, GRID)))


@pytest.mark.parametrize("shared", [True, False])
def test_official_pretraining_loads_into_digpt(tmp_path, shared):
    official = official_pretraining()
    path = tmp_path / "checkpoint-299.pth"  # as the official main_pretrain.py saves it
    torch.save({"model": official, "epoch": 299, "args": argparse.Namespace(lr=1e-3)}, path)
    model = tiny_digpt(shared_tap_norm=shared)
    model.load_state_dict(digpt_from_official(read_state_dict(str(path)), shared_tap_norm=shared))

    params = dict(model.named_parameters())
    names = official_to_ours(depth=4)
    assert set(names.values()) | {"encoder.pos_embed"} == {n for n in params if "tap_norm" not in n}
    for theirs, ours in names.items():
        assert torch.equal(params[ours], official[theirs]), theirs
    assert torch.equal(model.encoder.pos_embed, official["pos_embed"][:, 1:])
    for d in ("ar", "kd"):
        norms = model.decoders[d].tap_norms()
        assert len(norms) == 4 and (len({id(n) for n in norms}) == 1) == shared
        for norm in norms:
            assert torch.equal(norm.weight, official[f"{d}_enc_norm.0.weight"])
            assert torch.equal(norm.bias, official[f"{d}_enc_norm.3.bias"])
    losses = model({"images": torch.randn(2, 3, IMAGE, IMAGE),
                    "targets": torch.randn(2, 1 + GRID * GRID, TEACHER_DIM)}, torch.rand(2, 4))
    assert all(torch.isfinite(v) for v in losses.values())


def _broken(change):
    sd = official_pretraining()
    change(sd)
    return sd


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.update({"kd_enc_norm.2.weight": sd["kd_enc_norm.2.weight"] + 1}),
     "kd_enc_norm.*.weight: the copies differ"),
    (lambda sd: sd["pos_embed"][:, 0].add_(1), "pos_embed: expected a zero cls row"),
    (lambda sd: sd["decoder_pos_embed"][0, 1:].copy_(build_sincos2d_pos_embed([GRID, GRID], DEC_WIDTH)),
     "decoder_pos_embed differs from the sin-cos"),  # timm's channel order
    (lambda sd: sd.pop("ar_blocks.1.attn2.kv.bias"), r"missing keys \['ar_blocks.1.attn2.kv.bias'\]"),
    (lambda sd: sd.update(extra=torch.zeros(1)), r"unexpected keys \['extra'\]"),
])
def test_official_pretraining_problems_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        digpt_from_official(_broken(change))


def test_official_finetuning_exports_to_timm_with_identical_logits(tmp_path):
    official = official_finetuning()
    src = tmp_path / "finetuned.pth"
    torch.save({"model": official, "epoch": 99}, src)
    dims = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=2, num_heads=HEADS,
                global_pool="avg", fc_norm=True, num_classes=10)
    direct = timm.create_model("vit_tiny_patch16_224", pretrained=False, **dims).eval()
    direct.load_state_dict(official)
    out = tmp_path / "vit.pth"
    export_timm(str(src), str(out))
    # num_classes must be in the overlay too: where it differs from the tag's 1000, timm drops
    # the head from the file and loads non-strictly
    loaded = timm.create_model("vit_tiny_patch16_224", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(out), num_classes=10), **dims).eval()
    images = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        assert torch.equal(loaded(images), direct(images))


def perturbed(model, seed):
    """Every parameter moved off its initial value (zero cls token, unit LayerNorms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def timm_from_file(path, depth):
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=depth, num_heads=HEADS,
        global_pool="avg", fc_norm=True, num_classes=0).eval()


def assert_same_encoder(vit, encoder: SegmentViT):
    """timm's tokens (cls first) = our encoder's over all patches with full attention, whether
    cls comes first (timm's forward_features) or last (our pre-training forward_taps); the
    pooled feature = the mean patch token through a fresh LayerNorm."""
    images = torch.randn(2, 3, IMAGE, IMAGE)
    N = GRID * GRID
    with torch.no_grad():
        tokens = vit.forward_features(images)
        assert torch.allclose(tokens, encoder.forward_features(images), atol=1e-5)
        cls_last = encoder.forward_taps(images, torch.arange(N).expand(2, N),
                                        torch.ones(N + 1, N + 1, dtype=torch.bool), (len(encoder.blocks),))[0]
        assert torch.allclose(tokens[:, 1:], cls_last[:, :N], atol=1e-5)
        assert torch.allclose(tokens[:, 0], cls_last[:, N], atol=1e-5)
        pooled = F.layer_norm(tokens[:, 1:].mean(1), (WIDTH,), eps=1e-6)
        assert torch.allclose(vit(images), pooled, atol=1e-5)


def test_our_eager_checkpoints_export_to_timm(tmp_path):
    """Saved by the CPU backend's store in this process (one process: no process group)."""
    run = tmp_path / "run"
    store = Runtime("fp32").checkpoints(str(run), keep=2)
    model = perturbed(tiny_digpt(depth=2), seed=1)
    optimizer = torch.optim.AdamW(model.parameters())
    store.save(1, model, optimizer, {"step": 1})
    perturbed(model, seed=2)
    store.save(2, model, optimizer, {"step": 2, "rng": {"python": (3, (1, 2), None)}})
    store.close()
    assert newest_checkpoint(str(run)) == f"{run}/checkpoints/2"
    out = tmp_path / "vit.safetensors"
    export_timm(str(run), str(out))  # the run's newest checkpoint
    assert_same_encoder(timm_from_file(out, depth=2), model.encoder.eval())


DCP_WRITER = """
import sys
import torch, torch_xla.core.xla_model as xm
sys.path.insert(0, {repo!r})
from xla_trainer_models import TargetInfo
from xla_trainer_models.backbones.vit import SegmentViT, ViTConfig
from xla_trainer_models.objectives.digpt import DiGPT, DiGPTConfig
from xla_trainer.runtime import create_runtime
runtime = create_runtime("xla")
torch.manual_seed(3)
model = DiGPT(DiGPTConfig(decoder_width=32, decoder_depth=1, decoder_heads=2),
              SegmentViT(ViTConfig(size="tiny", image_size=32, patch_size=8, width=32, depth=2, heads=2)),
              TargetInfo(16, (4, 4)))
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape))
torch.save(model.state_dict(), sys.argv[1] + "/reference.pt")
model.to(xm.xla_device())
store = runtime.checkpoints(sys.argv[1], keep=2)
store.save(5, model, torch.optim.AdamW(model.parameters()), {{"step": 5}})
store.close()
"""


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    """An output_dir with checkpoints/5/ written under XLA SPMD (in a subprocess: XLA) and the
    weights it saved, as reference.pt."""
    out = tmp_path_factory.mktemp("xla_run")
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    result = subprocess.run([sys.executable, "-c", DCP_WRITER.format(repo=REPO), str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.xla  # its checkpoint is written under XLA SPMD
def test_our_distributed_checkpoint_exports_to_timm(distributed_run, tmp_path):
    """Read back here on the CPU, in this process, without a process group."""
    reference = torch.load(distributed_run / "reference.pt")
    state = read_state_dict(str(distributed_run))  # the output_dir: its newest checkpoint
    assert sorted(state) == sorted(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert read_state_dict(str(distributed_run / "checkpoints" / "5")).keys() == state.keys()

    out = tmp_path / "vit.pth"
    export_timm(str(distributed_run / "checkpoints"), str(out))
    encoder = SegmentViT(ViTConfig(size="tiny", image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=2,
                                   heads=HEADS)).eval()
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in reference.items() if k.startswith("encoder.")})
    assert_same_encoder(timm_from_file(out, depth=2), encoder)


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    """An output_dir with checkpoints/5/ saved by the CPU backend's store in this process (the
    format XLA writes too: the GCS test needs no torch_xla) and the weights it saved, as reference.pt."""
    out = tmp_path_factory.mktemp("eager_run")
    model = perturbed(tiny_digpt(depth=2), seed=3)
    torch.save(model.state_dict(), out / "reference.pt")
    store = Runtime("fp32").checkpoints(str(out), keep=2)
    store.save(5, model, torch.optim.AdamW(model.parameters()), {"step": 5})
    store.close()
    return out


def test_checkpoints_on_gcs(eager_run, gcs_bucket, tmp_path):
    fs = fsspec.filesystem("gs")
    fs.put(str(eager_run / "checkpoints"), f"{gcs_bucket}/run/", recursive=True)
    reference = torch.load(eager_run / "reference.pt")
    state = read_state_dict(f"{gcs_bucket}/run")
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    export_timm(f"{gcs_bucket}/run", f"{gcs_bucket}/vit.safetensors")
    fs.get(f"{gcs_bucket}/vit.safetensors", str(tmp_path / "vit.safetensors"))
    assert torch.equal(safetensors.torch.load_file(tmp_path / "vit.safetensors")["blocks.1.mlp.fc2.weight"],
                       reference["encoder.blocks.1.mlp.fc2.weight"])


def test_every_encoder_source_gives_the_same_timm_state(tmp_path):
    model = perturbed(tiny_digpt(depth=2), seed=4)
    from_digpt = encoder_to_timm(model.state_dict())
    for other in (model.encoder.state_dict(), from_digpt, {f"module.{k}": v for k, v in model.state_dict().items()}):
        path = tmp_path / "w.bin"
        torch.save({"state_dict": other}, path)  # wrapped, and DDP-prefixed in the last case
        state = load_encoder_state(str(path))
        assert state.keys() == from_digpt.keys()
        assert all(torch.equal(state[k], from_digpt[k]) for k in state)
    assert not from_digpt["pos_embed"][0, 0].any()  # cls row added as zeros
    assert torch.equal(from_digpt["fc_norm.weight"], torch.ones(WIDTH))  # a fresh fc_norm
    official = official_pretraining(depth=2)
    # safetensors stores no shared tensors: the four tap-norm entries as copies
    safetensors.torch.save_file({k: v.clone() for k, v in official.items()}, tmp_path / "official.safetensors")
    state = load_encoder_state(str(tmp_path / "official.safetensors"))
    assert torch.equal(state["pos_embed"], official["pos_embed"])
    assert not any(k.startswith(("ar_", "kd_", "decoder_", "mask")) for k in state)


def test_bad_inputs_are_named(tmp_path):
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"model": {"conv.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}}, unrelated)
    with pytest.raises(ValueError, match=f"{unrelated}: not a ViT encoder state_dict: no 'pos_embed'"):
        load_encoder_state(str(unrelated))
    with pytest.raises(ValueError, match="not an official D-iGPT pre-training state_dict: missing keys"):
        digpt_from_official(read_state_dict(str(unrelated)))
    extra = encoder_to_timm(official_finetuning())
    extra["blocks.0.ls1.gamma"] = torch.ones(WIDTH)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.0.ls1.gamma'\]"):
        encoder_to_timm(extra)
    with pytest.raises(ValueError, match="final norm"):
        encoder_to_timm({**official_finetuning(), "norm.weight": torch.ones(WIDTH)})
    not_weights = tmp_path / "optimizer.pt"
    torch.save({"optimizer": {"state": {}}, "epoch": 3}, not_weights)
    with pytest.raises(ValueError, match=r"expected a state_dict \(name -> tensor\)"):
        read_state_dict(str(not_weights))
    with pytest.raises(FileNotFoundError, match="missing.pt: no such file"):
        read_state_dict(str(tmp_path / "missing.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="a directory without a checkpoint"):
        read_state_dict(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown weights format"):
        read_state_dict(_touch(tmp_path / "w.npz"))
    with pytest.raises(ValueError, match="expected a .safetensors or"):
        export_timm(str(unrelated), str(tmp_path / "out.npz"))


def _touch(path) -> str:
    path.write_bytes(b"")
    return str(path)


# ---- the teacher from an OpenCLIP visual tower alone ----

@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return open_clip.create_model("demo-ViT-T-8", pretrained=None, force_image_size=32).eval()


@pytest.mark.parametrize("layout", ["bare", "wrapped", "safetensors"])
def test_teacher_from_visual_tower_only(tmp_path, clip_model, layout):
    reference = ClipTeacher(OpenClipConfig(arch="demo-ViT-T-8"), 32)
    reference.visual.load_state_dict(clip_model.visual.state_dict())
    visual = clip_model.visual.state_dict()
    if layout == "bare":
        path = tmp_path / "visual.pt"
        torch.save(visual, path)
    elif layout == "wrapped":  # as a DDP training script saves it
        path = tmp_path / "visual.pt"
        torch.save({"state_dict": {f"module.visual.{k}": v for k, v in visual.items()}}, path)
    else:
        path = tmp_path / "visual.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in visual.items()}, path)
    teacher = ClipTeacher(OpenClipConfig(arch="demo-ViT-T-8", pretrained=str(path)), 32)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(images), reference(images))
    assert not torch.equal(teacher(images), ClipTeacher(OpenClipConfig(arch="demo-ViT-T-8"), 32)(images))


def test_teacher_rejects_other_weights(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(1), "blocks.0.norm1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"(?s)not an OpenCLIP visual tower of this arch.*blocks.0.norm1.weight"):
        ClipTeacher(OpenClipConfig(arch="demo-ViT-T-8", pretrained=str(path)), 32)


@pytest.mark.parametrize("source", ["official", "ours"])
def test_saim_head_norm_is_carried_into_the_cls_classifier(tmp_path, source):
    """SAIM's official fine-tuning and linear probe with the cls token (global_pool off) load the
    pre-trained top-level `norm` (the query stream's head norm) as the classifier's final norm and
    read cls after it: the import carries it into fc_norm, whose values then equal the trained ones,
    and the pooled features are that LayerNorm of the cls token."""
    import dataclasses
    import argparse as _argparse
    from xla_trainer_models import OBJECTIVES
    from xla_trainer_models.objectives.saim_official import saim_to_official
    from plugin_sizes import tiny
    vit = BACKBONES.get("vit")
    bcfg = tiny(vit, image_size=32, patch_size=8)
    torch.manual_seed(0)
    entry = OBJECTIVES.get("saim")
    model = entry.build(entry.Config(), vit.student(bcfg), None).eval()
    with torch.no_grad():  # a trained norm: no init gives these values
        model.norm.weight.copy_(1 + 0.3 * torch.randn_like(model.norm.weight))
        model.norm.bias.copy_(0.2 * torch.randn_like(model.norm.bias))
    path = tmp_path / "checkpoint.pth"
    saved = saim_to_official(model.state_dict()) if source == "official" else model.state_dict()
    torch.save({"model": saved, "epoch": 799, "args": _argparse.Namespace(model="saim_base")}, path)
    state = load_backbone_state(str(path), vit)
    assert "norm.weight" not in state
    assert torch.equal(state["fc_norm.weight"], model.norm.weight.detach())
    assert torch.equal(state["fc_norm.bias"], model.norm.bias.detach())
    classifier = vit.classifier(dataclasses.replace(bcfg, pool="token")).eval()
    missing, unexpected = classifier.load_state_dict(vit.adapt_state(state, classifier), strict=False)
    assert not missing and not unexpected
    assert torch.equal(classifier.fc_norm.weight, model.norm.weight) and torch.equal(classifier.fc_norm.bias, model.norm.bias)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the official forward: norm over every token, then the cls token
        tokens = classifier.forward_features(x)
        official = F.layer_norm(tokens, (tokens.shape[-1],), model.norm.weight, model.norm.bias, 1e-6)[:, 0]
        assert torch.allclose(classifier.forward_head(tokens, pre_logits=True), official, atol=1e-6)
