"""SAIM: the two masks, the blurred per-patch targets, the gather form against the official mask
form, causality, the official checkpoints (ours and timm's), the ViT-B/16 part counts and recipe,
each against a reference written here; `visualize` on the demo checkpoint."""
import argparse
import dataclasses
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from xla_trainer_models import BACKBONES, OBJECTIVES
from xla_trainer_models.objectives.saim_official import saim_from_official, saim_to_official
from xla_trainer.config import ConfigError, load_config
from xla_trainer.describe import describe
from xla_trainer.pretrained import load_backbone_state, read_state_dict
from plugin_sizes import tiny

GRID, PATCH = (4, 4), 8
N = GRID[0] * GRID[1]


def tiny_saim(seed: int = 0, backbone: str = "vit", **objective):
    entry, b = OBJECTIVES.get("saim"), BACKBONES.get(backbone)
    bcfg = tiny(b, image_size=32, patch_size=PATCH)
    torch.manual_seed(seed)
    return entry.build(dataclasses.replace(entry.Config(), **objective), b.student(bcfg), None).eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def noise(n: int = 2, seed: int = 2) -> torch.Tensor:
    u = torch.rand(n, N, generator=torch.Generator().manual_seed(seed))
    assert all(len(set(row.tolist())) == N for row in u)  # no ties: one order
    return u


# --- the masks ----------------------------------------------------------------------------------
def test_masks_content_includes_the_diagonal_query_excludes_it_cls_sees_itself():
    from xla_trainer_models.objectives.saim import saim_masks
    u = noise(1)[0]
    content, query = saim_masks(u[None])
    assert content.shape == (1, N + 1, N + 1) and query.shape == (1, N, N + 1)
    for i in range(N):
        for j in range(N):
            assert content[0, i, j] == (u[j] <= u[i]) and query[0, i, j] == (u[j] < u[i])
        assert content[0, i, N] and query[0, i, N]  # every patch sees cls
        assert content[0, i, i] and not query[0, i, i]
    assert content[0, N].tolist() == [False] * N + [True]  # cls sees only itself


def test_gather_form_masks_are_causal_over_the_order():
    model = tiny_saim()
    tri = torch.ones(N, N, dtype=torch.bool).tril()
    assert torch.equal(model.ordered_content_mask[0, :N, :N], tri)
    assert torch.equal(model.ordered_query_mask[0, :, :N], tri.tril(-1))


# --- the targets --------------------------------------------------------------------------------
def test_targets_are_blurred_zero_padded_channel_fastest_and_normalised_per_patch():
    model = tiny_saim()
    x = images(1)[0].double()
    # the official kernel: 1/(2 pi s^2) exp(-((i-4)^2 + (j-4)^2) / 2 s^2), normalised, s = 1
    kernel = torch.tensor([[math.exp(-((i - 4) ** 2 + (j - 4) ** 2) / 2) for j in range(9)] for i in range(9)],
                          dtype=torch.float64)
    kernel /= kernel.sum()
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    blurred = torch.zeros_like(x)
    for y in range(32):
        for z in range(32):
            blurred[:, y, z] = (padded[:, y:y + 9, z:z + 9] * kernel).sum((-1, -2))
    expected = torch.zeros(N, PATCH * PATCH * 3, dtype=torch.float64)
    for r in range(4):
        for c in range(4):
            pixels = blurred[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].permute(1, 2, 0).flatten()  # y, x, channel
            expected[r * 4 + c] = (pixels - pixels.mean()) / (pixels.var(unbiased=True) + 1e-6).sqrt()
    assert torch.allclose(model.targets(x[None].float())[0].double(), expected, atol=1e-4)


# --- the two forms, causality -------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["vit", "crate_alpha"])
def test_gather_form_gives_the_official_mask_forms_loss_and_gradients(backbone):
    losses, grads = {}, {}
    for order in ("mask", "gather"):
        model = tiny_saim(backbone=backbone, order=order).train()
        loss = model({"images": images()}, noise())["loss"]
        loss.backward()
        losses[order] = loss.detach()
        grads[order] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(losses["gather"], losses["mask"], rtol=1e-5)
    assert grads["gather"].keys() == grads["mask"].keys() and len(grads["mask"]) > 10
    for name, g in grads["mask"].items():
        assert torch.allclose(grads["gather"][name], g, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("order", ["gather", "mask"])
def test_no_prediction_sees_its_own_or_a_later_patch(order):
    """Changing the pixels of patch j changes exactly the predictions of the patches after j in
    the order, and never the content stream's cls."""
    model = tiny_saim(order=order)
    x, u = images(1), noise(1)
    rank = u[0].argsort().argsort()
    j = int(rank.argsort()[5])  # the sixth patch in the order
    y = x.clone()
    r, c = divmod(j, 4)
    y[..., r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 1.0
    with torch.no_grad():
        (pa, ia), (pb, ib) = model.predict(x, u), model.predict(y, u)
        raster = lambda p, i: torch.zeros_like(p).scatter(1, i[..., None].expand_as(p), p)[0]  # noqa: E731
        changed = (raster(pa, ia) - raster(pb, ib)).abs().amax(-1) > 1e-6
        assert changed.tolist() == (rank > rank[j]).tolist()
        content = lambda z: model.encoder.forward_taps(z, torch.arange(N)[None], model_mask(model, u), (2,))[-1]  # noqa: E731
        assert torch.allclose(content(x)[:, -1], content(y)[:, -1])  # cls sees only itself


def model_mask(model, u):
    from xla_trainer_models.objectives.saim import saim_masks
    return saim_masks(u)[0][:, None]


# --- the official checkpoints -------------------------------------------------------------------
def official_file(tmp_path, model) -> str:
    """Our SAIM written as the official pre-training script saves it."""
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": saim_to_official(model.state_dict()), "optimizer": {}, "epoch": 799, "scaler": {},
                "args": argparse.Namespace(model="saim_base", norm_pix_loss=True)}, path)
    return str(path)


def test_official_checkpoints_round_trip(tmp_path):
    ours = tiny_saim(seed=3)
    official = saim_to_official(ours.state_dict())
    assert "blocks.0.attn.q.weight" in official and "blocks.0.attn.qkv.weight" not in official
    assert official["pos_embed"].shape == (1, N + 1, 32) and not official["pos_embed"][0, 0].any()
    assert official["gaussian_blur.weight"].shape == (3, 1, 9, 9)
    fresh = tiny_saim(seed=4)
    fresh.load_state_dict(saim_from_official(read_state_dict(official_file(tmp_path, ours))), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.predict(images(), noise())[0], ours.predict(images(), noise())[0])
    assert saim_to_official(fresh.state_dict()).keys() == official.keys()
    del official["query_blocks.0.attn.k.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['query_blocks.0.attn.k.bias'\]"):
        saim_from_official(official)


@pytest.mark.parametrize("source", ["official", "ours"])
def test_encoder_reaches_the_cls_classifier_and_timm(tmp_path, source):
    """Either checkpoint gives the classifier (cls first, pool=token) the content stream: with full
    attention, the same tokens as our encoder; timm's own ViT loads the same state_dict."""
    ours = tiny_saim(seed=5)
    path = official_file(tmp_path, ours)
    if source == "ours":
        path = str(tmp_path / "ours.pt")
        torch.save({"model": ours.state_dict()}, path)
    vit = BACKBONES.get("vit")
    state = load_backbone_state(path, vit)
    assert "fc_norm.weight" in state and "norm.weight" not in state  # SAIM's `norm` is the query stream's
    cfg = tiny(vit, pool="token")
    classifier = vit.classifier(cfg).eval()
    missing, unexpected = classifier.load_state_dict(vit.adapt_state(state, classifier), strict=False)
    assert not missing and not unexpected
    x = images()
    with torch.no_grad():
        tokens = ours.encoder.forward_taps(x, torch.arange(N)[None].expand(2, -1), None, (2,))[-1]
        features = classifier.forward_features(x)
        assert torch.allclose(features[:, 1:], tokens[:, :N], atol=1e-5)
        assert torch.allclose(features[:, 0], tokens[:, N], atol=1e-5)
        assert torch.allclose(classifier.forward_head(features, pre_logits=True),
                              classifier.fc_norm(tokens[:, N]), atol=1e-5)  # pool=token: the cls token
        timm_vit = VisionTransformer(img_size=32, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2,
                                     global_pool="token", fc_norm=True, num_classes=0)
        timm_vit.load_state_dict(state)
        assert torch.allclose(timm_vit.eval().forward_features(x), features, atol=1e-6)


# --- the configs --------------------------------------------------------------------------------
def _block(w: int) -> int:  # norm1, q, k, v, proj, norm2, fc1, fc2 of the official Block
    return 2 * w + 4 * (w * w + w) + 2 * w + (4 * w * w + 4 * w) + (4 * w * w + w)


def test_describe_gives_the_official_part_counts_of_vit_b16():
    """qiy20/SAIM models_saim.saim_base: 12 + 12 blocks of width 768, head 768-3072-768."""
    result = describe(load_config("configs/saim/vit_b16_in1k.yaml"), with_flops=False)
    w = 768
    encoder = 3 * 16 * 16 * w + w + w + 12 * _block(w)  # patch_embed, cls_token, blocks
    assert result["parameters"] == {
        "encoder": {"trainable": encoder, "frozen": 196 * w},  # the official's 197 rows: ours has no cls row
        "query_blocks": {"trainable": 12 * _block(w), "frozen": 0},
        "norm": {"trainable": 2 * w, "frozen": 0},
        "prediction_head": {"trainable": w * 4 * w + 4 * w + 4 * w * w + w, "frozen": 0}}
    assert encoder == 85_645_824 and result["teacher"] is None


def test_vit_b16_recipe_decays_cls_and_not_norms():
    from xla_trainer.loop import make_schedule
    from xla_trainer.optim import weight_decay_groups
    from xla_trainer.pretrain import build_models
    cfg = load_config("configs/saim/vit_b16_in1k.yaml")
    schedule = make_schedule(cfg, 1_281_167)
    assert schedule.peak_lr == pytest.approx(1.6e-3) and schedule.warmup_steps == 30 * (1_281_167 // 2048)
    assert (cfg.optim.weight_decay, cfg.optim.betas, cfg.train.epochs, cfg.data.crop_scale) == (0.5, [0.9, 0.95], 800, [0.2, 1.0])
    with torch.device("meta"):
        model, _, _ = build_models(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in weight_decay_groups(model, 0.5) if g["weight_decay"] for p in g["params"]}
    assert "encoder.cls_token" in decayed and "query_blocks.0.attn.q.weight" in decayed
    assert not any(n.endswith((".bias", "norm1.weight")) for n in decayed)
    assert not model.encoder.pos_embed.requires_grad  # fixed sin-cos: where the queries start
    for name in ("finetune_vit_b16_in1k", "linprobe_vit_b16_in1k"):
        assert load_config(f"configs/saim/{name}.yaml").backbone.pool == "token"


def test_config_errors_name_the_key():
    from xla_trainer.evaluate import backbone_entry
    from xla_trainer.pretrain import build_models, check_models
    demo = "configs/saim/demo.yaml"
    with pytest.raises(ConfigError, match="objective.order 'raster': choose one of gather, mask"):
        check_models(load_config(demo, ["objective.order=raster"]))
    with pytest.raises(ConfigError, match="objective.blur_kernel 8 must be odd"):
        check_models(load_config(demo, ["objective.blur_kernel=8"]))
    with pytest.raises(ConfigError, match="objective.query_depth 3 does not divide the encoder depth 4"):
        build_models(load_config(demo, ["objective.query_depth=3"]))
    with pytest.raises(ConfigError, match="needs exactly one extra .cls. token: set backbone.cls_token=true"):
        build_models(load_config(demo, ["backbone.cls_token=false"]))
    with pytest.raises(ConfigError, match="backbone.pool=token pools the cls token"):
        backbone_entry(load_config("configs/saim/linprobe_demo.yaml", ["backbone.cls_token=false"]))


# --- visualize ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["vit", "crate_alpha"])
def test_last_attention_is_the_blocks_own_softmax(backbone):
    """The map equals the softmax weights the last block computes (captured from timm's
    unfused path / recomputed for CRATE's q = k = v), cls row, mean over heads, patch columns."""
    b = BACKBONES.get(backbone)
    model = b.classifier(tiny(b)).eval()
    x = images()
    with torch.no_grad():
        got = model.last_attention(x)
        if backbone == "vit":
            seen = []
            attn = model.blocks[-1].attn
            attn.fused_attn = False
            attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
            model(x)
            expected = seen[0].mean(1)[:, 0, 1:]
        else:
            h = model.embed(x)
            for block in model.blocks[:-1]:
                h = block(h)
            last = model.blocks[-1]
            w = last.attn.qkv(last.norm1(h)).unflatten(-1, (last.attn.heads, -1)).transpose(1, 2)
            expected = torch.softmax(w @ w.transpose(-1, -2) / math.sqrt(w.shape[-1]), -1).mean(1)[:, 0, 1:]
    assert got.shape == (2, model.patch_embed.num_patches) and torch.allclose(got, expected, atol=1e-6)


def test_visualize_refuses_to_overwrite_and_names_bad_input(tmp_path):
    from xla_trainer.visualize import visualize
    cfg = load_config("configs/saim/linprobe_demo.yaml", ["train.init=null"])
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="exists already and is left as it is"):
        visualize(cfg, "embedded", str(taken))
    assert taken.read_bytes() == b"mine"
    with pytest.raises(ConfigError, match="expected a .png file name"):
        visualize(cfg, "embedded", str(tmp_path / "out.jpg"))
    with pytest.raises(FileNotFoundError, match="--images .*: not a directory"):
        visualize(cfg, str(tmp_path / "nowhere"), str(tmp_path / "out.png"))


# --- init ---------------------------------------------------------------------------------------
def test_init_is_the_official_xavier_per_separate_qkv_at_vit_b_width():
    """The official content stream has three separate 768x768 q / k / v Linears, each
    xavier-uniform: std sqrt(2 / 1536) = 0.0361 per third of our fused qkv (the fused matrix as
    one would give sqrt(2 / 3072) = 0.0255); the query stream's q / k / v likewise; biases zero."""
    from xla_trainer_models.backbones.vit import SegmentViT, ViTConfig
    from xla_trainer_models.objectives.saim import SAIM, SAIMConfig
    torch.manual_seed(0)
    model = SAIM(SAIMConfig(query_depth=1), SegmentViT(ViTConfig(image_size=32, depth=1)))
    d, separate = 768, math.sqrt(2 / (768 + 768))
    qkv = model.encoder.blocks[0].attn.qkv
    assert tuple(qkv.weight.shape) == (3 * d, d)
    for part in qkv.weight.chunk(3):
        assert part.std().item() == pytest.approx(separate, rel=0.05)
    assert torch.count_nonzero(qkv.bias) == 0
    attn = model.query_blocks[0].attn
    for lin in (attn.q, attn.k, attn.v, attn.proj):
        assert lin.weight.std().item() == pytest.approx(separate, rel=0.05)
        assert torch.count_nonzero(lin.bias) == 0
    fc1 = model.encoder.blocks[0].mlp.fc1  # 768 -> 3072, untouched: one matrix as in the official
    assert fc1.weight.std().item() == pytest.approx(math.sqrt(2 / (d + 4 * d)), rel=0.05)


def test_digpt_student_keeps_the_fused_qkv_xavier_of_the_official_d_igpt():
    """The official D-iGPT (and MAE) encoder has one fused qkv Linear 768 -> 2304, xavier as one
    matrix: std sqrt(2 / 3072) = 0.0255; only SAIM splits it."""
    from xla_trainer_models.backbones.vit import SegmentViT, ViTConfig
    torch.manual_seed(0)
    qkv = SegmentViT(ViTConfig(image_size=32, depth=1)).blocks[0].attn.qkv
    assert qkv.weight.std().item() == pytest.approx(math.sqrt(2 / (768 + 3 * 768)), rel=0.05)
