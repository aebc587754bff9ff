"""What every registered objective and backbone must do, run over the registries (the built-ins
and the toy entries of toy_plugins.py): a new system gets these tests without writing them."""
import dataclasses
import inspect

import pytest
import safetensors.torch
import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from xla_trainer_models import BACKBONES, OBJECTIVES, TEACHERS, TargetInfo, check_pairing
from xla_trainer_models.backbones.adventurer import AdventurerConfig
from xla_trainer_models.registry import Backbone
from xla_trainer.pretrained import export_backbone, load_backbone_state
from plugin_sizes import TINY, invalid, tiny

def pairs_allowed() -> list[tuple[str, str]]:
    """Every (objective, backbone) that check_pairing accepts."""
    allowed = []
    for o in OBJECTIVES.names():
        for b in BACKBONES.names():
            try:
                check_pairing(OBJECTIVES.get(o), BACKBONES.get(b))
            except ValueError:
                continue
            allowed.append((o, b))
    return allowed


PAIRS = pairs_allowed()


def build(objective_name: str, backbone_name: str):
    objective, backbone = OBJECTIVES.get(objective_name), BACKBONES.get(backbone_name)
    bcfg = tiny(backbone)
    info = TargetInfo(16, backbone.grid(bcfg)) if objective.needs_teacher else None
    torch.manual_seed(0)
    return objective.build(tiny(objective), backbone.student(bcfg), info), bcfg, info


def batch_of(bcfg, info, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    batch = {"images": torch.randn(n, 3, bcfg.image_size, bcfg.image_size, generator=g)}
    if info is not None:
        batch["targets"] = torch.randn(n, 1 + info.grid[0] * info.grid[1], info.dim, generator=g)
    return batch


def noise_for(method, n: int = 2, seed: int = 0):
    if method.noise_shape is None:
        return None
    return torch.rand(n, *method.noise_shape, generator=torch.Generator().manual_seed(seed))


# --- objectives ---------------------------------------------------------------------------------
@pytest.mark.parametrize("objective,backbone", PAIRS)
def test_objective_trains_every_parameter_and_uses_its_noise(objective, backbone):
    method, bcfg, info = build(objective, backbone)
    batch = batch_of(bcfg, info)
    losses = method(batch, noise_for(method))
    assert losses["loss"].dim() == 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    # the student's optional final norm may go unapplied (D-iGPT reads blocks before it), and so
    # may a causal scan's cls, read after every patch, where only the patches count (XTRA)
    exempt = ("encoder.norm.",) + (("encoder.cls_token",) if getattr(method.encoder, "causal_only", False) else ())
    untouched = [n for n, p in method.named_parameters() if p.requires_grad and not n.startswith(exempt)
                 and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not untouched, untouched
    assert hasattr(method, "encoder")
    if method.noise_shape is not None:  # another draw: other orders or patches, another loss
        with torch.no_grad():
            again = method(batch, noise_for(method, seed=1))["loss"]
        assert not torch.allclose(again, losses["loss"])


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_check_refuses_its_invalid_example(name):
    objective = OBJECTIVES.get(name)
    grid = BACKBONES.get("vit").grid(tiny(BACKBONES.get("vit")))
    objective.check(tiny(objective), grid)  # the tiny config passes
    with pytest.raises(ValueError):
        objective.check(invalid(objective), grid)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_a_backbone_without_the_mask_is_refused(name):
    objective = OBJECTIVES.get(name)

    # a causal scan stands in for a block-causal mask where the objective says it can
    stand_ins = ("causal",) if objective.causal_student else ()

    class NoMask(Backbone):
        masks = tuple(m for m in ("full", "causal", "block-causal", "arbitrary")
                      if m != objective.mask and m not in stand_ins)

    NoMask.name = "no-mask"
    with pytest.raises(ValueError, match=f"needs a {objective.mask} attention mask, which backbone 'no-mask'"):
        check_pairing(objective, NoMask)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_a_causal_only_backbone_trains_only_the_objectives_that_say_so(name):
    objective = OBJECTIVES.get(name)

    class Scan(Backbone):
        masks = ("causal",)

    Scan.name = "scan"
    if objective.causal_student or objective.mask == "causal":
        check_pairing(objective, Scan)
    else:
        with pytest.raises(ValueError, match="cannot feed a causal scan its tokens in causal order.*causal_student"):
            check_pairing(objective, Scan)


# --- backbones ----------------------------------------------------------------------------------
def test_every_pair_of_the_registries_that_masks_allow_is_covered():
    assert ("digpt", "vit") in PAIRS and ("toy", "toy") in PAIRS and ("digpt", "toy") in PAIRS
    assert ("digpt", "adventurer") in PAIRS and ("xtra", "adventurer") in PAIRS
    assert ("toy", "adventurer") not in PAIRS  # the toy objective needs full attention


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_classifier_api(name):
    backbone = BACKBONES.get(name)
    cfg = tiny(backbone)
    backbone.check(cfg)
    with pytest.raises(ValueError):
        backbone.check(invalid(backbone))
    torch.manual_seed(0)
    classifier = backbone.classifier(cfg, 10)
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    tokens = classifier.forward_features(images)
    assert tokens.dim() == 3 and tokens.shape[0] == 3 and tokens.shape[-1] == classifier.num_features
    assert classifier.forward_head(tokens, pre_logits=True).shape == (3, classifier.num_features)
    assert classifier(images).shape == (3, 10)
    assert classifier.get_classifier().weight.shape[0] == 10
    groups = param_groups_layer_decay(classifier, 0.05, classifier.no_weight_decay(), layer_decay=0.5)
    assert len({g["lr_scale"] for g in groups}) >= 3  # stem, blocks, head at different rates
    assert backbone.blocks and any(isinstance(m, backbone.blocks) for m in classifier.modules())


def masks_over(n: int, kind: str) -> torch.Tensor | None:
    """True = may attend, over n tokens."""
    if kind == "full":
        return None
    rank = torch.arange(n)
    if kind == "block-causal":
        rank = (rank >= n // 2).long()
    elif kind == "arbitrary":  # causal in a random order: any boolean mask reaches the blocks
        rank = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return rank[:, None] >= rank[None, :]


@pytest.mark.parametrize("name,kind", [(b, k) for b in BACKBONES.names() for k in BACKBONES.get(b).masks])
def test_student_honours_each_mask_it_declares(name, kind):
    """Perturb the pixels of one patch: the tokens the mask hides it from keep their outputs, and
    tokens that see it change."""
    backbone = BACKBONES.get(name)
    cfg = tiny(backbone)
    torch.manual_seed(0)
    student = backbone.student(cfg).eval()
    gh, gw = student.grid
    n_patches = gh * gw
    n = n_patches + student.extra_tokens
    order = torch.randperm(n_patches, generator=torch.Generator().manual_seed(2))[None]
    mask = masks_over(n, kind)
    slot = n_patches // 2 + 1  # a patch slot in the second half
    images = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    perturbed = images.clone()
    ph, pw = cfg.image_size // gh, cfg.image_size // gw
    row, col = divmod(int(order[0, slot]), gw)
    perturbed[..., row * ph:(row + 1) * ph, col * pw:(col + 1) * pw] += 3.0
    with torch.no_grad():
        a, b = (student.forward_taps(x, order, mask, (student.depth,))[-1][0] for x in (images, perturbed))
    changed = (a - b).abs().amax(-1) > 1e-4
    sees = torch.ones(n, dtype=torch.bool) if mask is None else mask[:, slot]
    assert not changed[~sees].any(), (kind, changed, sees)
    assert changed[sees].any(), kind


@pytest.mark.parametrize("name", BACKBONES.names())
def test_pretrained_student_round_trips_into_the_classifier_and_export(name, tmp_path):
    backbone = BACKBONES.get(name)
    cfg = tiny(backbone)
    torch.manual_seed(0)
    student = backbone.student(cfg)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape))  # no weight of the fresh classifier can match by chance
    # a pre-training checkpoint: the objective's encoder.* beside parts of its own
    saved = {**{f"encoder.{k}": v for k, v in student.state_dict().items()}, "decoders.x.weight": torch.ones(3)}
    checkpoint = str(tmp_path / "pretrained.pt")
    torch.save({"model": saved, "step": 1}, checkpoint)
    state = load_backbone_state(checkpoint, backbone)
    classifier = backbone.classifier(cfg, 10)
    fitted = backbone.adapt_state(state, classifier)
    missing, unexpected = classifier.load_state_dict(fitted, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    mine = classifier.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in fitted.items())
    # every student weight reaches the classifier (under its name there)
    weights = sorted(round(float(v.float().sum()), 3) for v in student.state_dict().values() if v.numel() > 1)
    loaded = sorted(round(float(mine[k].float().sum()), 3) for k in fitted if mine[k].numel() > 1)
    assert all(w in loaded for w in weights)

    out = tmp_path / "backbone.safetensors"
    exported = export_backbone(checkpoint, str(out), backbone)
    written = safetensors.torch.load_file(str(out))
    assert sorted(written) == sorted(exported) and all(torch.equal(written[k], exported[k]) for k in written)


# --- teachers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEACHERS.names())
def test_teacher_is_frozen_and_gives_cls_first_tokens(name):
    teacher_entry = TEACHERS.get(name)
    cfg = tiny(teacher_entry)
    torch.manual_seed(0)
    teacher = teacher_entry.build(cfg, 32)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    gh, gw = teacher.grid
    tokens = teacher(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 1 + gh * gw, teacher.dim) and not tokens.requires_grad
    teacher.cast_weights(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert teacher(torch.randn(1, 3, 32, 32)).shape == (1, 1 + gh * gw, teacher.dim)
    assert teacher_entry.identity(cfg)[0] == cfg.arch


# --- one declaration per parameter --------------------------------------------------------------
def redeclared(module: nn.Module, cfg, skip: tuple[nn.Module, ...] = ()) -> list[str]:
    """Where the module classes of `module`'s own package (the submodules in `skip` left out)
    declare a field of `cfg` again: the top module takes the config whole, so it may not take a
    field as a parameter at all; an inner layer may take one, but without a default or with the
    config's."""
    defaults = type(cfg)()
    fields = {f.name for f in dataclasses.fields(cfg)}
    package = type(module).__module__.split(".")[0]
    skipped = {id(m) for s in skip for m in s.modules()}
    classes = {type(m) for m in module.modules() if id(m) not in skipped}
    wrong = []
    for cls in sorted((c for c in classes if c.__module__.split(".")[0] == package), key=lambda c: c.__name__):
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name not in fields:
                continue
            if cls is type(module):
                wrong.append(f"{cls.__name__}({p.name}): a config field, to be read from the config")
            elif p.default is not p.empty and p.default != getattr(defaults, p.name):
                wrong.append(f"{cls.__name__}({p.name}={p.default!r}): the config's default is "
                             f"{getattr(defaults, p.name)!r}")
    return wrong


def built_modules(kind: str, name: str) -> list[tuple[nn.Module, object, tuple[nn.Module, ...]]]:
    """(module, its config, submodules of other entries) for each module the entry builds."""
    if kind == "backbone":
        entry = BACKBONES.get(name)
        cfg = tiny(entry)
        return [(entry.student(cfg), cfg, ()), (entry.classifier(cfg, 10), cfg, ())]
    if kind == "objective":
        method, _, _ = build(name, next(b for o, b in PAIRS if o == name))
        return [(method, tiny(OBJECTIVES.get(name)), (method.encoder,))]
    entry = TEACHERS.get(name)
    return [(entry.build(tiny(entry), 32), tiny(entry), ())]


@pytest.mark.parametrize("kind,name", [("backbone", n) for n in BACKBONES.names()] +
                         [("objective", n) for n in OBJECTIVES.names()] + [("teacher", n) for n in TEACHERS.names()])
def test_no_module_declares_a_config_field_again(kind, name):
    """Each parameter has one default, its config field's: a module default that differs from it
    (e.g. Adventurer's drop_path 0.0 once, against the config's 0.1) is what a model built
    outside the trainer would get."""
    assert name in TINY[kind], f"{kind} {name!r} has no TINY size in tests/plugin_sizes.py"
    for module, cfg, skip in built_modules(kind, name):
        assert not redeclared(module, cfg, skip), redeclared(module, cfg, skip)


def test_the_declaration_check_catches_a_field_taken_again_and_a_drifted_default():
    class Block(nn.Module):
        def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 64):
            super().__init__()

    class Net(nn.Module):
        def __init__(self, cfg: AdventurerConfig, drop_path: float = 0.1):
            super().__init__()
            self.block = Block(cfg.width)

    assert redeclared(Net(AdventurerConfig()), AdventurerConfig()) == [
        "Block(drop_path=0.0): the config's default is 0.1",  # d_state 64: the config's, allowed
        "Net(drop_path): a config field, to be read from the config"]
