"""XTRA: the mask, the block and target layout, the loss, causality, the official checkpoints,
its probes' features and the ViT-B/16 part counts, each against a reference written here."""
import dataclasses
import math

import pytest
import safetensors.torch
import torch
from timm.models.vision_transformer import VisionTransformer

from xla_trainer_models import BACKBONES, OBJECTIVES
from xla_trainer_models.backbones.vit import ViTConfig
from xla_trainer_models.layers.probes import AttentiveProbe, probe_features
from xla_trainer_models.layers.segments import raster_block_causal_mask
from xla_trainer_models.objectives.xtra_official import xtra_from_official, xtra_to_official
from xla_trainer.config import load_config
from xla_trainer.describe import describe
from xla_trainer.loop import make_schedule
from xla_trainer.optim import build_optimizer
from xla_trainer.pretrained import export_backbone, load_backbone_state, read_state_dict

# a tiny XTRA with the official encoder flavour, on a non-square grid: 24x32 px, patch 4 ->
# 6x8 patches, blocks of 2x4 patches (8x16 px) -> 3x2 = 6 blocks
GRID, BLOCK, PATCH = (6, 8), (2, 4), 4
FLAVOUR = {"pos_embed": "learned", "cls_token": False, "final_norm": True, "init": "trunc_normal"}


def tiny_backbone(**extra) -> ViTConfig:
    return ViTConfig(size="tiny", image_size=32, patch_size=PATCH, width=16, depth=3, heads=2,
                     **{**FLAVOUR, **extra})


class NonSquareViT:
    """The ViT backbone's student on a 24x32 image (timm takes (h, w) image sizes)."""

    @staticmethod
    def student(cfg):
        from xla_trainer_models.backbones.vit import SegmentViT
        return SegmentViT(dataclasses.replace(cfg, image_size=(GRID[0] * PATCH, GRID[1] * PATCH)))


def tiny_xtra(seed: int = 0, square: bool = False, **backbone):
    """On the 6x8 grid, or (square) on the 8x8 grid of a 32x32 image, the only kind a config makes."""
    objective = OBJECTIVES.get("xtra")
    cfg = dataclasses.replace(objective.Config(), block=list(BLOCK), proj_hidden=24, predictor_depth=2,
                              predictor_heads=2, head_hidden=40, predictor_fp32=False)
    torch.manual_seed(seed)
    student = (BACKBONES.get("vit") if square else NonSquareViT).student(tiny_backbone(**backbone))
    return objective.build(cfg, student, None).eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, GRID[0] * PATCH, GRID[1] * PATCH, generator=torch.Generator().manual_seed(seed))


def block_of(r: int, c: int) -> int:
    return (r // BLOCK[0]) * (GRID[1] // BLOCK[1]) + c // BLOCK[1]


# --- the mask and the layout --------------------------------------------------------------------
def test_mask_is_block_causal_over_raster_patch_order():
    n = GRID[0] * GRID[1]
    mask = raster_block_causal_mask(GRID, BLOCK, suffix_tokens=1)
    assert mask.shape == (n + 1, n + 1)
    for i in range(n):
        for j in range(n):
            expected = block_of(*divmod(j, GRID[1])) <= block_of(*divmod(i, GRID[1]))
            assert mask[i, j] == expected, (i, j)
    # the cls token (last) sees only itself, and every patch may see it
    assert mask[:n, n].all() and mask[n, n] and not mask[n, :n].any()
    first = raster_block_causal_mask(GRID, BLOCK, prefix_tokens=1)
    assert torch.equal(first[1:, 1:], mask[:n, :n]) and first[1:, 0].all() and not first[0, 1:].any()
    with pytest.raises(ValueError, match="do not tile the 6x8 patch grid"):
        raster_block_causal_mask(GRID, (4, 4))


def test_targets_are_each_blocks_pixels_in_c_y_x_order_normalised():
    model = tiny_xtra()
    x = images()
    bh, bw = BLOCK[0] * PATCH, BLOCK[1] * PATCH
    targets = model.targets(x)
    assert targets.shape == (2, 6, 3 * bh * bw)
    for b in range(6):
        top, left = (b // 2) * bh, (b % 2) * bw  # 3x2 blocks in raster block order
        crop = x[:, :, top:top + bh, left:left + bw].reshape(2, -1)  # (C, y, x)
        mean, var = crop.mean(1, keepdim=True), crop.var(1, keepdim=True, unbiased=True)
        assert torch.allclose(targets[:, b], (crop - mean) / torch.sqrt(var + 1e-6), atol=1e-5)


def test_head_reads_each_blocks_outputs_dim_major():
    model = tiny_xtra()
    seen = {}
    model.predictor.register_forward_hook(lambda m, i, out: seen.update(tokens=out))
    model.head.register_forward_hook(lambda m, i, out: seen.update(head_in=i[0]))
    model.predict(images())
    tokens, head_in = seen["tokens"], seen["head_in"]  # (B, N, D), (B, S, D * T)
    D, T = tokens.shape[-1], BLOCK[0] * BLOCK[1]
    for b in range(6):
        members = [r * GRID[1] + c for r in range(GRID[0]) for c in range(GRID[1]) if block_of(r, c) == b]
        for t, token in enumerate(members):  # raster order inside the block
            for d in (0, 5, D - 1):
                assert head_in[0, b, d * T + t] == tokens[0, token, d]


def test_loss_is_the_mse_of_each_block_against_the_next_blocks_pixels():
    model = tiny_xtra()
    x = images()
    with torch.no_grad():
        pred, loss = model.predict(x), model({"images": x})["loss"]
    bh, bw = BLOCK[0] * PATCH, BLOCK[1] * PATCH
    total, count = 0.0, 0
    for n in range(2):
        for b in range(5):  # block b predicts block b + 1; the last prediction has no target
            r, c = divmod(b + 1, 2)
            crop = x[n, :, r * bh:(r + 1) * bh, c * bw:(c + 1) * bw].flatten().double()
            target = (crop - crop.mean()) / math.sqrt(crop.var().item() + 1e-6)
            total += ((pred[n, b].double() - target) ** 2).sum().item()
            count += target.numel()
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("cls_token", [False, True])
def test_no_prediction_sees_a_later_block(cls_token):
    """Change the pixels of block k: the predictions made from blocks before k stay as they
    were (bit for bit), those from block k on change. With a cls token too (it sees no patch)."""
    model = tiny_xtra(cls_token=cls_token)
    x = images(1)
    bh, bw = BLOCK[0] * PATCH, BLOCK[1] * PATCH
    for k in (1, 3, 5):
        r, c = divmod(k, 2)
        y = x.clone()
        y[..., r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] += torch.randn(3, bh, bw)
        with torch.no_grad():
            a, b = model.predict(x)[0], model.predict(y)[0]
        changed = (a - b).abs().amax(-1) > 1e-5
        assert torch.equal(a[:k], b[:k]), k
        assert changed[k:].all(), (k, changed)


def test_predictor_runs_in_float32_under_autocast_by_default():
    model = tiny_xtra()
    model.predictor_fp32 = True
    seen = {}
    model.predictor.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, out: seen.update(dtype=out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model({"images": images()})
    assert seen["dtype"] == torch.float32
    model.predictor_fp32 = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model({"images": images()})
    assert seen["dtype"] == torch.bfloat16


def test_position_embeddings_are_decayed_only_when_asked():
    model = tiny_xtra()

    def decayed(m) -> set:
        names = {id(p): n for n, p in m.named_parameters()}
        groups = build_optimizer(m, 1e-3, 0.05, (0.9, 0.95)).param_groups
        return {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}

    assert {"encoder.pos_embed", "predictor.pos_embed"} <= decayed(model)  # the official recipe
    model.decay_pos_embed = False
    assert not {"encoder.pos_embed", "predictor.pos_embed"} & decayed(model)
    assert "encoder.blocks.0.attn.qkv.weight" in decayed(model) and "encoder.norm.weight" not in decayed(model)


# --- the official checkpoints -------------------------------------------------------------------
def official_files(tmp_path, model) -> dict:
    official = xtra_to_official(model.state_dict())
    lightning, deepspeed = tmp_path / "xtra_b16.pth", tmp_path / "mp_rank_00_model_states.pt"
    torch.save(official, lightning)  # the B/16 release: a bare Lightning state_dict
    torch.save({"module": {f"_forward_module.{k}": v for k, v in official.items()}, "buffer_names": [],
                "optimizer": None, "ds_version": "0.14.0", "global_steps": 629900}, deepspeed)
    return {"lightning": lightning, "deepspeed": deepspeed}


@pytest.mark.parametrize("layout", ["lightning", "deepspeed"])
def test_official_checkpoints_round_trip(tmp_path, layout):
    ours = tiny_xtra(seed=3)
    official = xtra_to_official(ours.state_dict())
    assert {k.split(".")[0] for k in official} == {"enc", "proj", "predictor", "aim_proj"}
    assert "proj.mlp.2.bias" not in official and "aim_proj.0.mlp.2.bias" in official
    state = read_state_dict(str(official_files(tmp_path, ours)[layout]))
    fresh = tiny_xtra(seed=4)
    fresh.load_state_dict(xtra_from_official(state), strict=True)
    x = images()
    with torch.no_grad():
        assert torch.equal(fresh.predict(x), ours.predict(x))
    assert xtra_to_official(fresh.state_dict()).keys() == official.keys()


def test_an_official_file_with_other_keys_loads_nothing_silently(tmp_path):
    official = xtra_to_official(tiny_xtra().state_dict())
    with pytest.raises(ValueError, match=r"not an official XTRA pre-training state_dict: "
                                         r"missing keys \['aim_proj.*unexpected keys \['model.aim_proj"):
        xtra_from_official({f"model.{k}": v for k, v in official.items()})
    del official["predictor.norm.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['predictor.norm.bias'\]"):
        xtra_from_official(official)


def test_official_encoder_reaches_the_probe_and_the_timm_export(tmp_path):
    ours = tiny_xtra(seed=5, square=True)
    files = official_files(tmp_path, ours)
    vit, cfg = BACKBONES.get("vit"), tiny_backbone(causal_blocks=list(BLOCK))
    state = load_backbone_state(str(files["deepspeed"]), vit)
    assert "norm.weight" in state and "fc_norm.weight" not in state and "cls_token" not in state
    classifier = vit.classifier(cfg).eval()
    missing, unexpected = classifier.load_state_dict(vit.adapt_state(state, classifier), strict=False)
    assert not missing and not unexpected
    x = torch.randn(2, 3, 32, 32)
    n = 64
    with torch.no_grad():
        taps = ours.encoder.forward_taps(x, torch.arange(n)[None].expand(2, -1), ours.encoder_mask, (2, 3))
        assert torch.allclose(classifier.forward_features(x), ours.encoder.norm(taps[-1]), atol=1e-6)
        # XTRA's probe features: block outputs before the final norm, under the mask
        assert torch.allclose(probe_features(classifier, x, True, blocks=2), (taps[0] + taps[1]) / 2, atol=1e-6)
        assert torch.allclose(probe_features(classifier, x, False, blocks=1), taps[1].mean(1), atol=1e-6)

    out = tmp_path / "xtra_timm.safetensors"
    export_backbone(str(files["lightning"]), str(out), vit)
    timm_vit = VisionTransformer(img_size=32, patch_size=PATCH, embed_dim=16, depth=3, num_heads=2,
                                 class_token=False, global_pool="avg", fc_norm=False, num_classes=0)
    timm_vit.load_state_dict(safetensors.torch.load_file(str(out)))
    with torch.no_grad():  # timm's own model, given the mask, is the same encoder
        assert torch.allclose(timm_vit.eval().forward_features(x, attn_mask=ours.predictor_mask),
                              classifier.forward_features(x), atol=1e-6)


def test_attentive_probe_is_aims():
    """One unprojected query, bias-free keys and values, softmax(q k / sqrt(d_head)) v per head."""
    torch.manual_seed(0)
    probe = AttentiveProbe(8, 3, heads=2).eval()
    tokens = torch.randn(2, 5, 8)
    normed = (tokens - probe.norm.running_mean) / torch.sqrt(probe.norm.running_var + 1e-6)
    k, v = normed @ probe.k.weight.T, normed @ probe.v.weight.T
    q = probe.query[0, 0]
    pooled = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(k[..., part] @ q[part] / 2.0, dim=-1)  # sqrt(4) = 2
        pooled.append((weights[..., None] * v[..., part]).sum(1))
    expected = probe.head(torch.cat(pooled, -1))
    assert probe.k.bias is None and probe.v.bias is None
    assert torch.allclose(probe(tokens), expected, atol=1e-6)


# --- the configs --------------------------------------------------------------------------------
# The official ViT-B/16 XTRA's parameter shapes (elad-amrani/xtra: src/modules/{vit,mlp,xtra}.py,
# vit_base at 256 px, block 4, predictor 8 x 768 with 6 heads, proj 768-4096-768, aim head 12288-6144-12288).
def _block(w: int) -> list:
    return [(w,), (w,), (3 * w, w), (3 * w,), (w, w), (w,), (w,), (w,), (4 * w, w), (4 * w,), (w, 4 * w), (w,)]


OFFICIAL_B16 = {
    "enc": [(1, 256, 768), (768, 3, 16, 16), (768,)] + _block(768) * 12 + [(768,), (768,)],
    "proj": [(4096, 768), (4096,), (768, 4096)],
    "predictor": [(1, 256, 768)] + _block(768) * 8 + [(768,), (768,)],
    "aim_proj": [(6144, 12288), (6144,), (12288, 6144), (12288,)],
}


def test_describe_gives_the_official_part_counts_of_vit_b16():
    result = describe(load_config("configs/xtra/vit_b16_in1k.yaml"), with_flops=False)
    counts = {part: sum(math.prod(s) for s in shapes) for part, shapes in OFFICIAL_B16.items()}
    ours = {"enc": "encoder", "proj": "proj", "predictor": "predictor", "aim_proj": "head"}
    assert {ours[k]: {"trainable": v, "frozen": 0} for k, v in counts.items()} == result["parameters"]
    assert result["teacher"] is None and result["parameters_total"]["trainable"] == 300_053_248


def test_vit_b16_recipe_and_schedule():
    cfg = load_config("configs/xtra/vit_b16_in1k.yaml")
    assert (cfg.objective.name, cfg.backbone.image_size, cfg.backbone.drop_path) == ("xtra", 256, 0.1)
    assert (cfg.data.crop_scale, cfg.data.crop_ratio) == ([0.3, 1.0], [0.75, 1.5])
    assert (cfg.train.epochs, cfg.optim.clip_grad, cfg.optim.betas) == (800, 1.0, [0.9, 0.95])
    schedule = make_schedule(cfg, 1_281_167)
    warmup = schedule.warmup_steps
    assert schedule.peak_lr == 1e-3  # absolute, whatever the batch
    assert schedule.lr(0) == pytest.approx(1e-4 + 9e-4 / warmup)
    assert schedule.lr(warmup - 1) == pytest.approx(1e-3) and schedule.lr(schedule.total_steps) == pytest.approx(1e-6)
    from xla_trainer.pretrain import build_models
    with torch.device("meta"):  # the H/14 checkpoint's head and predictor, without allocating them
        h14, _, _ = build_models(load_config("configs/xtra/vit_h14_in21k.yaml"))
    assert h14.predictor.pos_embed.shape == (1, 256, 640) and h14.proj.mlp[0].weight.shape == (5120, 1280)
    assert sum(p.numel() for p in h14.head.parameters()) == 10240 * 9408 + 9408 + 9408 * 9408 + 9408


def test_config_errors_name_the_key():
    from xla_trainer.config import ConfigError
    from xla_trainer.evaluate import build_classifier, check_classifier_config
    from xla_trainer.pretrain import check_models
    with pytest.raises(ConfigError, match="objective 'xtra' has no teacher"):
        load_config("configs/xtra/demo.yaml", ["teacher.arch=ViT-H-14"])
    with pytest.raises(ConfigError, match=r"objective.block \[3, 3\]: blocks of 3x3 patches do not tile the 8x8"):
        check_models(load_config("configs/xtra/demo.yaml", ["objective.block=[3, 3]"]))
    with pytest.raises(ConfigError, match=r"objective.block \[8, 8\] makes one block"):
        check_models(load_config("configs/xtra/demo.yaml", ["objective.block=[8, 8]"]))
    probe = "configs/xtra/linprobe_demo.yaml"
    with pytest.raises(ConfigError, match=r"backbone.causal_blocks \[3, 2\]: blocks of 3x2 patches"):
        check_classifier_config(load_config(probe, ["backbone.causal_blocks=[3, 2]"]))
    with pytest.raises(ConfigError, match=r"probe.blocks 5: .* 1 <= probe.blocks <= 4"):
        build_classifier(load_config(probe, ["probe.blocks=5", "train.init=null"]), "linprobe", 10)


# --- init ---------------------------------------------------------------------------------------
def test_init_of_the_fused_qkv_matches_the_officials_at_vit_b_width():
    """The official XTRA encoder has a fused qkv too, every Linear ~ N(0, 0.02) (truncated at
    +-2, i.e. not at all): a std that does not depend on the shape, so each third of our fused
    qkv already has the official 0.02 and nothing is re-initialised per third; biases zero."""
    from xla_trainer_models.backbones.vit import SegmentViT
    torch.manual_seed(0)
    enc = SegmentViT(ViTConfig(image_size=32, depth=1, **FLAVOUR))
    qkv = enc.blocks[0].attn.qkv
    assert tuple(qkv.weight.shape) == (3 * 768, 768)
    for part in qkv.weight.chunk(3):
        assert part.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(qkv.bias) == 0
