"""Token order, attention mask, alignment and loss of D-iGPT against references written here."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import xla_trainer_models as models
from xla_trainer_models import TargetInfo
from xla_trainer_models.objectives.digpt import DiGPT, DiGPTConfig, default_taps, linear_resize_matrix
from xla_trainer_models.objectives.digpt_decoder import FeaturePredictor
from xla_trainer_models.layers.segments import SegmentLayout, block_causal_mask, segment_order
from xla_trainer_models.backbones.vit import SegmentViT, ViTConfig


def reference_segment_patches(grid, split):
    """Raster patch indices of each segment, by explicit loops."""
    gh, gw = grid
    sh, sw = gh // split[0], gw // split[1]
    out = []
    for r, c in itertools.product(range(split[0]), range(split[1])):
        out.append([(r * sh + i) * gw + (c * sw + j) for i in range(sh) for j in range(sw)])
    return out


@pytest.mark.parametrize("grid,split", [((14, 14), (2, 2)), ((16, 16), (2, 2)), ((4, 6), (2, 3)),
                                        ((8, 8), (4, 1))])
def test_patch_index_matches_loops(grid, split):
    assert SegmentLayout(grid, split).patch_index().tolist() == reference_segment_patches(grid, split)


def test_layout_rejects_grid_not_divisible():
    with pytest.raises(ValueError, match="does not split into 2x2"):
        SegmentLayout((7, 7), (2, 2))


@pytest.mark.parametrize("cls_visible", [True, False])
def test_block_causal_mask_matches_reference(cls_visible):
    blocks, length = 3, 4
    mask = block_causal_mask(blocks, length, cls_visible)
    n = blocks * length + 1
    for q in range(n):
        for k in range(n):
            q_cls, k_cls = q == n - 1, k == n - 1
            if q_cls:
                expected = True
            elif k_cls:
                expected = cls_visible and q // length == blocks - 1
            else:
                expected = k // length <= q // length
            assert bool(mask[q, k]) == expected, (q, k)


def test_clean_mask_hides_cls_from_every_segment_on_a_tiny_grid():
    """3 segments of 2 tokens + cls: block-causal, cls (last row) sees all, no segment sees cls."""
    expected = torch.tensor([[1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(block_causal_mask(3, 2, False), expected)


def test_official_mask_is_the_reflect_padded_block_causal_mask():
    """The official mask: a float block-causal mask (0 / -inf) over the segments, padded by one
    row and column by reflection for cls; only the last segment sees cls."""
    blocks, length = 3, 7
    seg = torch.tril(torch.ones(blocks, blocks))
    seg = seg.repeat_interleave(length, 0).repeat_interleave(length, 1)
    additive = seg.masked_fill(seg == 0, float("-inf")).masked_fill(seg == 1, 0)
    padded = F.pad(additive[None, None], (0, 1, 0, 1), mode="reflect")[0, 0]
    assert torch.equal(block_causal_mask(blocks, length, True), padded == 0)
    assert padded[: 2 * length, -1].isinf().all() and (padded[2 * length:, -1] == 0).all()


def test_segment_order_is_a_permutation_and_uniform():
    torch.manual_seed(0)
    order = segment_order(torch.rand(20000, 4))
    assert (order.sort(-1).values == torch.arange(4)).all()
    first = torch.bincount(order[:, 0], minlength=4).float() / 20000
    assert torch.allclose(first, torch.full((4,), 0.25), atol=0.02)


def _pixel_box(index, grid, patch):
    rows, cols = [i // grid for i in index], [i % grid for i in index]
    return (min(rows) * patch, min(cols) * patch, (max(rows) + 1) * patch, (max(cols) + 1) * patch)


@pytest.mark.parametrize("student_patch,teacher_patch", [(16, 14), (14, 14)])
def test_student_segments_cover_teacher_segments_at_224(student_patch, teacher_patch):
    g, t = 224 // student_patch, 224 // teacher_patch
    student = SegmentLayout((g, g), (2, 2)).patch_index().tolist()
    teacher = SegmentLayout((t, t), (2, 2)).patch_index().tolist()
    for s, tt in zip(student, teacher):
        assert _pixel_box(s, g, student_patch) == _pixel_box(tt, t, teacher_patch)


def test_default_taps():
    assert default_taps(12) == (6, 8, 10, 12)
    assert default_taps(24) == (12, 16, 20, 24)


def tiny_digpt(**kw):
    torch.manual_seed(0)
    encoder = SegmentViT(ViTConfig(size="tiny", image_size=32, patch_size=4, width=32, depth=3, heads=2))
    return DiGPT(DiGPTConfig(decoder_width=32, decoder_depth=2, decoder_heads=2, **kw), encoder, TargetInfo(16, (4, 4)))


def test_loss_against_hand_computation():
    model = tiny_digpt()
    B, S, C = 3, 4, 16
    torch.manual_seed(1)
    order = torch.stack([torch.randperm(S) for _ in range(B)])
    slots = order[:, 1:]  # the "ar" decoder's segments
    pred = torch.randn(B, 3 * 16 + 1, C)  # student segments are 4x4 tokens
    targets = torch.randn(B, 1 + 16, C)  # teacher grid 4x4: segments of 2x2
    got = model._loss(pred, targets, slots)

    teacher_segments = reference_segment_patches((4, 4), (2, 2))
    terms = []
    for b in range(B):
        for n in range(3):
            seg = pred[b, n * 16:(n + 1) * 16].reshape(4, 4, C).permute(2, 0, 1)[None]
            seg = F.interpolate(seg, size=(2, 2), mode="bilinear", align_corners=False)[0]
            seg = seg.permute(1, 2, 0).reshape(4, C)
            for t, patch in enumerate(teacher_segments[int(slots[b, n])]):
                target = targets[b, 1 + patch]
                terms.append(2 - 2 * torch.dot(seg[t], target) / (seg[t].norm() * target.norm()))
        cls = pred[b, -1]
        terms.append(2 - 2 * torch.dot(cls, targets[b, 0]) / (cls.norm() * targets[b, 0].norm()))
    assert len(terms) == B * (3 * 4 + 1)
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)


@pytest.mark.parametrize("size,resized", [((7, 7), (8, 8)), ((1, 1), (2, 2)), ((4, 6), (2, 3)), ((2, 3), (5, 4))])
def test_resize_by_matrices_is_bilinear_interpolation(size, resized):
    """The step resizes student segments by two matmuls (ViT-B/16's 7x7 to ViT-H/14's 8x8): what
    F.interpolate's bilinear resize gives, whose backward XLA runs on the host off TPU."""
    x = torch.randn(3, 5, *size)
    by_matrices = linear_resize_matrix(size[0], resized[0]) @ x @ linear_resize_matrix(size[1], resized[1]).T
    assert torch.allclose(by_matrices, F.interpolate(x, size=resized, mode="bilinear", align_corners=False), atol=1e-6)


@pytest.mark.parametrize("cls_visible", [True, False])
def test_forward_is_block_causal_in_the_drawn_order(cls_visible):
    """Changing the pixels of the last visible and the hidden segment must not change what the
    encoder computes for earlier slots, nor the 'ar' prediction of slot 0 (next segment = slot 1)
    beyond what slot 0 sees: under the official mask and the clean one alike."""
    model = tiny_digpt(cls_visible_to_last_segment=cls_visible).eval()
    torch.manual_seed(2)
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 4)
    order = segment_order(noise)
    changed = images.clone()
    for b in range(2):  # perturb the segments in slots 1, 2, 3 of each sample
        for seg in order[b, 1:].tolist():
            r, c = divmod(seg, 2)
            changed[b, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] += torch.randn(3, 16, 16)
    index = model.patch_index[order][:, :-1].flatten(1)
    taps_a = model.encoder.forward_taps(images, index, model.attn_mask, model.taps)
    taps_b = model.encoder.forward_taps(changed, index, model.attn_mask, model.taps)
    for a, b in zip(taps_a, taps_b):
        assert torch.allclose(a[:, :16], b[:, :16], atol=1e-5)  # slot 0 unchanged
        assert not torch.allclose(a[:, 16:32], b[:, 16:32], atol=1e-3)  # slot 1 changed
    # the cls token (last) sees everything
    assert not torch.allclose(taps_a[-1][:, -1], taps_b[-1][:, -1], atol=1e-3)
    # the "ar" queries of slot 0 (positions of the next segment) see only slot 0's features
    queries = model.patch_index[order[:, 1:]].flatten(1)
    preds = [model.decoders["ar"](taps, queries, model.attn_mask) for taps in (taps_a, taps_b)]
    assert torch.allclose(preds[0][:, :16], preds[1][:, :16], atol=1e-5)
    assert not torch.allclose(preds[0][:, 16:32], preds[1][:, 16:32], atol=1e-3)


def test_letting_every_segment_see_cls_would_leak_the_ar_target():
    """Why the clean form hides cls rather than showing it to all: cls sees every visible
    segment, so through it the 'ar' queries of slot 0 would read slot 1, the segment they predict."""
    model = tiny_digpt(cls_visible_to_last_segment=False).eval()
    leaky = model.attn_mask.clone()
    leaky[:, -1] = True
    torch.manual_seed(2)
    images, order = torch.randn(2, 3, 32, 32), segment_order(torch.rand(2, 4))
    changed = images.clone()
    for b in range(2):  # perturb the segment in slot 1 only
        r, c = divmod(order[b, 1].item(), 2)
        changed[b, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] += torch.randn(3, 16, 16)
    index = model.patch_index[order][:, :-1].flatten(1)
    queries = model.patch_index[order[:, 1:]].flatten(1)
    for mask, leaks in ((model.attn_mask, False), (leaky, True)):
        preds = [model.decoders["ar"](model.encoder.forward_taps(x, index, mask, model.taps), queries, mask)
                 for x in (images, changed)]
        assert torch.allclose(preds[0][:, :16], preds[1][:, :16], atol=1e-5) != leaks


def xavier_std(fan_out: int, fan_in: int) -> float:
    return math.sqrt(2 / (fan_in + fan_out))


def test_decoder_init_is_the_official_xavier_on_the_official_shapes():
    """The real D-iGPT decoder (ViT-B taps, width 1024, 2 blocks, 32 heads, 1024 out): every
    Linear xavier-uniform with the std of the official layer's shape (self-attention one fused
    qkv 1024 -> 3072, cross-attention q 1024 -> 1024 and one fused kv 1024 -> 2048, enc2dec one
    3072 -> 2048), biases zero, LayerNorms ones / zeros."""
    torch.manual_seed(0)
    dec = FeaturePredictor(768, 4, (14, 14), 1024, 2, 32, 1024, shared_tap_norm=True)
    d = 1024
    official = {"enc2dec": (2 * d, 4 * 768), "head": (d, d)}
    for i in range(2):
        official.update({f"blocks.{i}.self_attn.qkv": (3 * d, d), f"blocks.{i}.self_attn.proj": (d, d),
                         f"blocks.{i}.cross_attn.q": (d, d), f"blocks.{i}.cross_attn.kv": (2 * d, d),
                         f"blocks.{i}.cross_attn.proj": (d, d), f"blocks.{i}.mlp.fc1": (4 * d, d),
                         f"blocks.{i}.mlp.fc2": (d, 4 * d)})
    linears = {n: m for n, m in dec.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears.keys() == official.keys()
    for name, (fan_out, fan_in) in official.items():
        w, b = linears[name].weight, linears[name].bias
        assert tuple(w.shape) == (fan_out, fan_in), name
        assert w.std().item() == pytest.approx(xavier_std(fan_out, fan_in), rel=0.05), name
        assert w.abs().max() <= math.sqrt(3) * xavier_std(fan_out, fan_in) + 1e-6, name  # uniform
        assert torch.count_nonzero(b) == 0, name
    for m in dec.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    assert dec.query_token.std().item() == pytest.approx(0.02, rel=0.1)


def test_forward_losses_and_gradients():
    model = tiny_digpt()
    out = model({"images": torch.randn(2, 3, 32, 32), "targets": torch.randn(2, 17, 16)}, torch.rand(2, 4))
    assert set(out) == {"loss", "loss_ar", "loss_kd"}
    assert torch.allclose(out["loss"], out["loss_ar"] + out["loss_kd"])
    assert 0 < out["loss_ar"] < 4 and 0 < out["loss_kd"] < 4
    out["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), \
        [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_teacher_grid_must_split_into_segments():
    encoder = SegmentViT(ViTConfig(size="tiny", image_size=32, patch_size=4, width=32, depth=2, heads=2))
    with pytest.raises(ValueError, match="teacher grid"):
        DiGPT(DiGPTConfig(), encoder, TargetInfo(16, (5, 5)))


def test_official_quirk_flags():
    shared = tiny_digpt()
    separate = tiny_digpt(shared_tap_norm=False, cls_visible_to_last_segment=False)
    for name in ("ar", "kd"):  # each decoder owns its tap norm, as in the official model
        assert isinstance(shared.decoders[name].tap_norm, torch.nn.LayerNorm)
        assert len(separate.decoders[name].tap_norm) == len(separate.taps)
    assert shared.decoders["ar"].tap_norm is not shared.decoders["kd"].tap_norm
    assert shared.attn_mask[-2, -1] and not separate.attn_mask[-2, -1]


def test_encoder_state_dict_loads_into_timm():
    import timm
    encoder = SegmentViT(ViTConfig(size="tiny", image_size=32, patch_size=4, width=32, depth=2, heads=2))
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2,
                            num_heads=2, class_token=True, no_embed_class=True, num_classes=0,
                            pretrained=False)
    missing, unexpected = vit.load_state_dict(encoder.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"norm.weight", "norm.bias"}


def test_registry():
    assert models.OBJECTIVES.get("digpt").needs_teacher and models.OBJECTIVES.get("digpt").mask == "block-causal"
    with pytest.raises(ValueError, match="unknown objective 'nope'; registered: digpt, saim, toy, xtra"):
        models.OBJECTIVES.get("nope")
