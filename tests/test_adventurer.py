"""Adventurer: the chunked SSD scan against the sequential recurrence, the Mamba-2 mixer and the
whole official forward against references written here over the official key names (so the
released checkpoints' layout is what loads), causality, the stage transition's position
resampling, the Base parameter count, the causal student inside D-iGPT and XTRA, the supervised
recipe's parts (ThreeAugment, repeated augmentation, EMA), and the XLA and digits runs."""
import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xla_trainer_models import BACKBONES, OBJECTIVES, TargetInfo
from xla_trainer_models.backbones.adventurer import FLIPS, AdventurerConfig, mixer_kwargs
from xla_trainer_models.backbones.adventurer_official import adventurer_to_official
from xla_trainer_models.layers import mamba2
from xla_trainer_models.layers.mamba2 import Mamba2, ssd_scan
from xla_trainer.checkpoint import newest_checkpoint, read_checkpoint
from xla_trainer.config import ConfigError, load_config
from xla_trainer.describe import describe
from xla_trainer.pretrained import load_backbone_state
from plugin_sizes import TINY

ADVENTURER = BACKBONES.get("adventurer")


def tiny(**extra) -> AdventurerConfig:
    return AdventurerConfig(**{**TINY["backbone"]["adventurer"], **extra})


# --- references, written from the paper's and mamba_ssm's formulas -------------------------------
def sequential_scan(x, dt, A, B, C):
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = C_t S_t, one step at a time, float64."""
    b, l, h, p = x.shape
    r = h // B.shape[2]
    S = torch.zeros(b, h, p, B.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(l):
        Bt, Ct = B[:, t].repeat_interleave(r, 1), C[:, t].repeat_interleave(r, 1)
        S = torch.exp(dt[:, t] * A)[..., None, None] * S + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ct))
    return torch.stack(ys, 1)


def rms(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def mixer_reference(p: dict, u: torch.Tensor, headdim: int, d_state: int) -> torch.Tensor:
    """mamba_ssm's Mamba2 (ngroups 1) over its own parameter names."""
    d_inner = p["out_proj.weight"].shape[1]
    heads = d_inner // headdim
    z, xBC, dt = (u @ p["in_proj.weight"].T).split([d_inner, d_inner + 2 * d_state, heads], -1)
    w, L = p["conv1d.weight"], u.shape[1]  # (channels, 1, K): a causal depthwise conv, by hand
    padded = F.pad(xBC, (0, 0, w.shape[-1] - 1, 0))
    xBC = F.silu(sum(w[:, 0, k] * padded[:, k:k + L] for k in range(w.shape[-1])) + p["conv1d.bias"])
    x, B, C = xBC.split([d_inner, d_state, d_state], -1)
    x = x.unflatten(-1, (heads, headdim))
    dt = F.softplus(dt + p["dt_bias"])
    y = sequential_scan(x.double(), dt.double(), -torch.exp(p["A_log"]).double(), B[:, :, None].double(),
                        C[:, :, None].double()).float() + p["D"][:, None] * x
    return rms(y.flatten(-2) * F.silu(z), p["norm.weight"]) @ p["out_proj.weight"].T


def official_forward(state: dict, images, patch: int, headdim: int, d_state: int, flip) -> torch.Tensor:
    """The official Adventurer forward (models_mamba.py), written here over its checkpoint keys."""
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = torch.cat([x.flatten(2).transpose(1, 2), state["cls_token"].expand(len(x), -1, -1)], 1) + state["pos_embed"]
    swap = lambda t: torch.cat([t[:, :-1].flip(1), t[:, -1:]], 1)
    for n in range(sum(k.endswith(".mixer.A_log") for k in state)):
        p = {k[len(f"layers.{n}."):]: v for k, v in state.items() if k.startswith(f"layers.{n}.")}
        h = rms(x, p["norm.weight"])
        h = swap(h) if flip(n) else h
        h = torch.cat([h.mean(1, keepdim=True), h], 1)
        h = mixer_reference({k[6:]: v for k, v in p.items() if k.startswith("mixer.")}, h, headdim, d_state)[:, 1:]
        x = x + (swap(h) if flip(n) else h)
        h = rms(x, p["norm_mlp.weight"])
        w = lambda i, t: t @ p[f"mlp.w{i}.weight"].T + p[f"mlp.w{i}.bias"]
        x = x + w(3, F.silu(w(1, h)) * w(2, h))
    return rms(x, state["norm_f.weight"])[:, -1] @ state["head.weight"].T + state["head.bias"]


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights no init could give by chance (nonzero biases, D, norms)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    return module


# --- the scan and the mixer ----------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])  # 13 steps: padded to 16 and 15, one chunk, one longer
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_scan_matches_the_sequential_recurrence(chunk, groups):
    g = torch.Generator().manual_seed(chunk + groups)
    b, l, h, p, n = 2, 13, 4, 3, 5
    x = torch.randn(b, l, h, p, generator=g, dtype=torch.float64)
    dt = torch.rand(b, l, h, generator=g, dtype=torch.float64)
    A = -4 * torch.rand(h, generator=g, dtype=torch.float64)
    B, C = (torch.randn(b, l, groups, n, generator=g, dtype=torch.float64) for _ in range(2))
    expected = sequential_scan(x, dt, A, B, C)
    y = ssd_scan(x, dt, A, B, C, chunk)
    assert y.dtype == torch.float32 and y.shape == (b, l, h, p)
    assert torch.allclose(y.double(), expected, atol=2e-5, rtol=1e-5), (y.double() - expected).abs().max()


def test_mixer_is_mamba2_in_float32_and_close_under_bf16_autocast():
    torch.manual_seed(0)
    mixer = perturbed(Mamba2(32, **mixer_kwargs(tiny(chunk_size=4)))).eval()
    u = torch.randn(2, 11, 32)
    params = dict(mixer.named_parameters())
    with torch.no_grad():
        expected = mixer_reference(params, u, 16, 8)
        assert torch.allclose(mixer(u), expected, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = mixer(u)
    assert low.dtype == torch.bfloat16  # out_proj under autocast; the scan inside it ran in float32
    assert ((low.float() - expected).norm() / expected.norm()) < 2e-2


def test_the_causal_conv_is_torchs_depthwise_conv_cut_back():
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 9, 6)
    with torch.no_grad():
        expected = conv(x.transpose(1, 2))[..., :9].transpose(1, 2)
        assert torch.allclose(mamba2.causal_depthwise_conv(x, conv.weight, conv.bias), expected, atol=1e-6)


def test_mixer_is_causal():
    torch.manual_seed(0)
    mixer = perturbed(Mamba2(32, **mixer_kwargs(tiny(chunk_size=4)))).eval()
    u = torch.randn(1, 12, 32)
    v = u.clone()
    v[:, 6] += 1.0
    with torch.no_grad():
        changed = (mixer(u) - mixer(v)).abs().amax(-1)[0] > 1e-6
    assert not changed[:6].any() and changed[6:].all(), changed


def test_mamba_ssm_kernels_are_refused_without_the_package_and_match_where_installed():
    if mamba2.mamba_chunk_scan_combined is None:
        with pytest.raises(ValueError, match="backbone.kernels=mamba_ssm needs the mamba_ssm package"):
            ADVENTURER.check(tiny(kernels="mamba_ssm"))
        return
    if not torch.cuda.is_available():
        pytest.skip("mamba_ssm's kernels run on a CUDA GPU only")
    torch.manual_seed(0)
    mixer = mixer_kwargs(tiny(d_state=16, headdim=32, chunk_size=16))
    pure = perturbed(Mamba2(64, **mixer)).cuda().eval()
    fused = Mamba2(64, **{**mixer, "kernels": "mamba_ssm"}).cuda().eval()
    fused.load_state_dict(pure.state_dict())
    u = torch.randn(2, 40, 64, device="cuda")
    with torch.no_grad():
        assert torch.allclose(fused(u), pure(u), atol=1e-3, rtol=1e-3)


# --- the model -----------------------------------------------------------------------------------
def test_flip_patterns_and_drop_path_rule():
    assert [FLIPS["official"](n) for n in range(6)] == [False, False, True, True, False, False]
    assert [FLIPS["alternate"](n) for n in range(4)] == [False, True, False, True]
    model = ADVENTURER.classifier(tiny(depth=4, drop_path=0.3))
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.layers]
    assert rates == pytest.approx([0.0, 0.0, 0.1, 0.2])  # [0] + linspace(0, 0.3, 4), layer n takes rate n


@pytest.mark.parametrize("flip", ["official", "alternate"])
def test_official_checkpoint_loads_and_gives_the_official_forward(tmp_path, flip):
    cfg = tiny(depth=4, flip=flip)  # layers 2 and 3 flip (official), 1 and 3 (alternate)
    ours = perturbed(ADVENTURER.classifier(cfg, 10)).eval()
    official = adventurer_to_official(ours.state_dict())
    assert "norm_f.weight" in official and "layers.3.mixer.A_log" in official and "norm.weight" not in official
    # the release: a DeiT checkpoint, the weights under 'model' (beside 'model_ema', 'optimizer', ...)
    torch.save({"model": official, "model_ema": official, "epoch": 299}, tmp_path / "adventurer_tiny.pth")
    state = load_backbone_state(str(tmp_path / "adventurer_tiny.pth"), ADVENTURER)
    fresh = ADVENTURER.classifier(cfg, 10).eval()
    fresh.load_state_dict(ADVENTURER.adapt_state(state, fresh))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = official_forward(official, images, 8, cfg.headdim, cfg.d_state, FLIPS[flip])
        assert torch.allclose(fresh(images), expected, atol=1e-4, rtol=1e-4)
        other = "alternate" if flip == "official" else "official"  # the pattern matters
        wrong = ADVENTURER.classifier(tiny(depth=4, flip=other), 10).eval()
        wrong.load_state_dict(fresh.state_dict())
        assert not torch.allclose(wrong(images), expected, atol=1e-3)
    del official["layers.1.mixer.dt_bias"]
    with pytest.raises(ValueError, match=r"not an official Adventurer checkpoint: missing keys \['layers.1.mixer.dt_bias"):
        ADVENTURER.import_state(official)


def test_an_official_checkpoint_is_evaluated_with_its_head_under_our_eval_transform(digits_root, tmp_path, capsys):
    """`xla-trainer eval` (evaluate_checkpoint) on the digits' val split against a loop over its
    images here: resize to data.eval_resize (bicubic), center-crop, normalise, the released head's argmax."""
    from torchvision import datasets, transforms
    from xla_trainer.cli import main
    ours = perturbed(ADVENTURER.classifier(tiny(), 10)).eval()
    torch.save({"model": adventurer_to_official(ours.state_dict())}, tmp_path / "official.pth")
    assert main(["eval", "--config", "configs/adventurer/train_demo.yaml",
                 f"data.root={digits_root}", f"train.init={tmp_path / 'official.pth'}", "data.eval_resize=36",
                 "runtime.backend=cpu", "runtime.precision=fp32", "data.num_workers=0", "train.eval_batch=128",
                 *[f"backbone.{k}={v}" for k, v in TINY["backbone"]["adventurer"].items()]]) == 0
    top1, n = re.search(r"eval: top-1 ([\d.]+)%, top-5 [\d.]+% on (\d+) val images", capsys.readouterr().out).groups()
    val = datasets.ImageFolder(digits_root / "val")
    crop = transforms.Compose([transforms.Resize(36, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(32), transforms.ToTensor(),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        images = torch.stack([crop(val.loader(path)) for path, _ in val.samples])
        hits = (ours(images).argmax(-1) == torch.tensor(val.targets)).float().mean().item()
    assert int(n) == len(val) and float(top1) == pytest.approx(100 * hits, abs=0.006)


def test_stage_transition_resamples_the_grid_and_keeps_cls_last():
    source = perturbed(ADVENTURER.classifier(tiny(image_size=32))).state_dict()  # 4x4 grid
    target = ADVENTURER.classifier(tiny(image_size=56))  # 7x7 grid, as 128 -> 224 px at patch 16
    state = ADVENTURER.adapt_state(source, target)
    target.load_state_dict(state)
    old, new = source["pos_embed"], state["pos_embed"]
    assert new.shape == (1, 50, 32) and torch.equal(new[0, -1], old[0, -1])  # cls: last, kept
    grid = old[0, :-1].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(new[:, :-1], expected, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit backbone.patch_size 4"):
        ADVENTURER.adapt_state(source, ADVENTURER.classifier(tiny(image_size=32, patch_size=4)))


def _official_stage_transition(pos_embed: torch.Tensor, new_side: int) -> torch.Tensor:
    """The official main.py's --finetune position resampling, written from what it does: the
    extra-token count is the new model's rows minus its patches (1), the first row is set aside as
    that extra token (in Adventurer: patch (0, 0), cls being last), the remaining rows (patches
    1..N-1 and the cls row) are read as the old square grid in raster order, bicubically resized
    with torch's interpolate (align_corners=False, no antialias) and put back after that row."""
    rows, width = pos_embed.shape[1], pos_embed.shape[2]
    side = int((rows - 1) ** 0.5)
    extra, tokens = pos_embed[:, :1], pos_embed[:, 1:]
    tokens = tokens.reshape(1, side, side, width).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return torch.cat([extra, tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("sizes", [(64, 112), (112, 64)])  # 8x8 -> 14x14 (128 -> 224 px at /16), and back
def test_official_stage_resample_reproduces_the_official_transition(sizes):
    source = perturbed(ADVENTURER.classifier(tiny(image_size=sizes[0]))).state_dict()
    target = ADVENTURER.classifier(tiny(image_size=sizes[1], official_stage_resample=True))
    state = ADVENTURER.adapt_state(source, target)
    target.load_state_dict(state)
    side = sizes[1] // 8
    expected = _official_stage_transition(source["pos_embed"], side)
    assert state["pos_embed"].shape == (1, side * side + 1, 32)
    assert torch.allclose(state["pos_embed"], expected, atol=1e-6)
    assert torch.equal(state["pos_embed"][0, 0], source["pos_embed"][0, 0])  # patch (0, 0) kept as is
    # our default differs from it (the cls row is kept, the grid is not shifted)
    ours = ADVENTURER.adapt_state(source, ADVENTURER.classifier(tiny(image_size=sizes[1])))["pos_embed"]
    assert torch.equal(ours[0, -1], source["pos_embed"][0, -1])
    assert not torch.allclose(ours, expected, atol=1e-3)
    assert AdventurerConfig().official_stage_resample is False
    # the other tensors are untouched by either
    assert all(torch.equal(state[k], v) for k, v in source.items() if k != "pos_embed")


def test_describe_gives_the_official_base_count():
    def layer(w: int) -> int:
        inner, heads, state = 2 * w, 2 * w // 64, 64
        conv = inner + 2 * state
        mixer = w * (2 * inner + 2 * state + heads) + conv * 4 + conv + 3 * heads + inner + inner * w
        hidden = int(2.5 * w)
        return mixer + 2 * w + 2 * (w * hidden + hidden) + hidden * w + w
    official = 768 * 3 * 16 * 16 + 768 + 768 + 197 * 768 + 12 * layer(768) + 768 + 1000 * 768 + 1000
    cfg = load_config("configs/adventurer/stage3_b16_224_finetune.yaml")
    result = describe(cfg, 1000, with_flops=False)
    assert result["parameters_total"]["trainable"] == official == 98_657_608  # the paper: 99M
    digpt = describe(load_config("configs/digpt/adventurer_b16_in1k.yaml", ["teacher.arch=demo-ViT-T-8"]),
                     with_flops=False)
    assert digpt["backbone"] == "adventurer" and digpt["parameters"]["encoder"]["trainable"] == official - 769_000


def test_weight_decay_spares_biases_norms_and_the_ssm_parameters():
    from xla_trainer.optim import build_optimizer
    model = ADVENTURER.classifier(tiny(depth=1), 10)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_optimizer(model, 1e-3, 0.05).param_groups
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {"patch_embed.proj.weight", "head.weight", "layers.0.mixer.in_proj.weight",
                       "layers.0.mixer.conv1d.weight", "layers.0.mixer.out_proj.weight",
                       *(f"layers.0.mlp.w{i}.weight" for i in (1, 2, 3))}


# --- as a pre-training student -------------------------------------------------------------------
def test_digpt_feeds_a_causal_student_its_segments_in_order_without_a_mask():
    student = ADVENTURER.student(tiny())
    method = OBJECTIVES.get("digpt").build(OBJECTIVES.get("digpt").Config(decoder_width=32, decoder_depth=1,
                                                                          decoder_heads=2),
                                           student, TargetInfo(16, (4, 4)))
    seen = {}
    forward = student.forward_taps
    student.forward_taps = lambda images, index, mask, taps: seen.update(index=index, mask=mask) or \
        forward(images, index, mask, taps)
    noise = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    losses = method({"images": torch.randn(2, 3, 32, 32), "targets": torch.randn(2, 17, 16)}, noise)
    assert seen["mask"] is None and torch.isfinite(losses["loss"])
    order = noise.argsort(-1)[:, :-1]  # the first three segments of each sample's order
    assert torch.equal(seen["index"], method.patch_index[order].flatten(1))
    losses["loss"].backward()
    assert student.cls_token.grad.abs().sum() > 0  # D-iGPT reads the cls, last after every segment


def test_xtra_with_a_causal_student_predicts_each_block_from_itself_and_the_blocks_before():
    xtra = OBJECTIVES.get("xtra")
    method = xtra.build(xtra.Config(**TINY["objective"]["xtra"]), ADVENTURER.student(tiny()), None).eval()
    assert method.encoder_index[0].tolist() == method.block_index.flatten().tolist()  # block order
    images = torch.randn(1, 3, 32, 32)
    later = images.clone()
    later[..., 16:24, 0:8] += 3.0  # a patch of block 2 (blocks of 2x2 patches, 8 px each)
    with torch.no_grad():
        changed = (method.predict(images) - method.predict(later)).abs().amax(-1)[0] > 1e-5
    assert changed.tolist() == [False, False, True, True]


# --- the supervised recipe's parts ---------------------------------------------------------------
def test_three_augment_is_seeded_and_picks_one_of_its_three_ops():
    from xla_trainer.data.eval import seeded, three_augment
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).byte().numpy())
    transform = three_augment(16, (0.5, 1.0), None)
    outs = [seeded(transform, image, s) for s in range(24)]
    assert torch.equal(outs[0], seeded(transform, image, 0)) and not torch.equal(outs[0], outs[1])
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    gray = [torch.allclose((o * std + mean)[0], (o * std + mean)[1], atol=1e-5) for o in outs]
    assert 0 < sum(gray) < len(gray)  # grayscale for about a third of the draws


def test_repeated_augmentation_repeats_each_image_with_its_own_draw():
    from xla_trainer.data.pretrain import GlobalBatchSampler
    batches = list(GlobalBatchSampler(12, 6, 0, 1, seed=3, start_step=0, total_steps=4, repeats=3))
    for epoch in (0, 1):
        rows = [r for b in batches[2 * epoch:2 * epoch + 2] for r in b]
        assert len(rows) == 12 and len({i for i, _ in rows}) == 4  # 4 images x 3 copies per epoch
        for k in range(0, 12, 3):
            assert len({i for i, _ in rows[k:k + 3]}) == 1
            assert [d for _, d in rows[k:k + 3]] == [3 * epoch, 3 * epoch + 1, 3 * epoch + 2]
    assert list(GlobalBatchSampler(12, 6, 0, 1, seed=3, start_step=3, total_steps=4, repeats=3)) == batches[3:]
    plain = list(GlobalBatchSampler(12, 6, 0, 1, seed=3, start_step=0, total_steps=2))
    assert sorted(i for b in plain for i, _ in b) == list(range(12)) and {d for b in plain for _, d in b} == {0}


@pytest.mark.parametrize("overrides,message", [
    (["augment.three_augment=true", "augment.rand_augment=rand-m9-mstd0.5-inc1"],
     "augment.three_augment replaces RandAugment"),
    (["data.repeated_aug=0"], "data.repeated_aug must be >= 1"),
    (["train.ema=1.5"], "train.ema 1.5 is a decay"),
])
def test_bad_recipe_keys_are_refused(overrides, message, tmp_path):
    from xla_trainer.evaluate import train_classifier
    cfg = load_config("configs/adventurer/train_demo.yaml", [*overrides, f"data.root={tmp_path}/digits",
                                                             "runtime.backend=cpu"], "train")
    with pytest.raises(ConfigError, match=message):
        train_classifier(cfg)


def test_ema_is_refused_for_a_probe():
    from xla_trainer.evaluate import check_classifier_config
    cfg = load_config("configs/adventurer/stage1_b16_128.yaml", [], "train")
    check_classifier_config(cfg)
    with pytest.raises(ConfigError, match="a probe's encoder is frozen"):
        check_classifier_config(dataclasses.replace(cfg, task="linprobe"))


# --- the trainer: the digits ---------------------------------------------------------------------
MARGIN_TRAIN = 40.0  # top-1 points above the 10% chance of the digits; measured 82.25 on a 2-core CPU VM


@pytest.mark.slow
def test_train_demo_beats_chance_with_an_ema_beside_it(digits_root, tmp_path, capsys):
    """`xla-trainer train` on configs/adventurer/train_demo.yaml (eager CPU), with train.ema: the
    model beats chance by MARGIN_TRAIN; the average is evaluated and checkpointed beside it."""
    from xla_trainer.cli import main
    assert main(["train", "--config", "configs/adventurer/train_demo.yaml", f"data.root={digits_root}",
                 f"train.output_dir={tmp_path}", "runtime.backend=cpu", "data.num_workers=0", "train.ema=0.9"]) == 0
    top1 = float(capsys.readouterr().out.split("train: top-1 ")[1].split("%")[0])
    assert top1 > 10.0 + MARGIN_TRAIN, top1
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    val = [r for r in rows if r.get("group") == "val"]
    assert len(val) == 10 and all(0 <= r["val_ema_top1"] <= 100 for r in val)
    saved = read_checkpoint(newest_checkpoint(str(tmp_path)), ("model", "extra"))
    assert saved["extra"]["ema"].keys() == saved["model"].keys()
    assert not torch.equal(saved["extra"]["ema"]["head.weight"], saved["model"]["head.weight"])
