"""`xla-trainer` command line: pretrain, train (a classifier from scratch), the evaluations
(finetune, linprobe, attnprobe, knn, eval), describe, export-timm, bench, bench-data, make-shards,
index-shards, precompute-targets, visualize, info, prepare-data.

Each command imports what it needs when it runs: `--help` and argument errors cost no torch."""
import argparse
import json
import logging
import sys

from .config import CLASSIFIERS, CONFIG_DIR, DEFAULT_CONFIG, ConfigError, load_config

OVERRIDES_HELP = "config overrides as key.sub=value (value parsed as YAML), e.g. train.global_batch=64"


def _config_args(p: argparse.ArgumentParser, default=DEFAULT_CONFIG):
    p.add_argument("--config", default=str(default), help=f"experiment YAML (default: {default})")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def bounded_int(low: int, high: int | None = None):
    """An argparse type: an int in [low, high]; anything else is argparse's usage error (exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be >= {low}" + (f" and <= {high}" if high is not None else "")
                                             + f", got {value}")
        return value
    return parse


def eval_default(command: str):
    return CONFIG_DIR / command / "demo.yaml"


def cmd_pretrain(args):
    from .pretrain import pretrain
    summary = pretrain(load_config(args.config, args.overrides, "pretrain"))
    print(f"done: {summary['steps']} steps\n"
          f"  metrics:     {summary['metrics']}\n"
          f"  tensorboard: {summary['tensorboard']}\n"
          f"  checkpoint:  {summary['checkpoint']}\n"
          f"  parameters:  {summary['parameter_bytes_per_device'] / 2**20:.3f} MiB per device")


def cmd_evaluate(args):
    from .evaluate import knn, train_classifier
    cfg = load_config(args.config, args.overrides, args.command)
    r = knn(cfg) if cfg.task == "knn" else train_classifier(cfg)
    line = f"{r['mode']}: top-1 {r['val_top1']:.2f}%, top-5 {r['val_top5']:.2f}% on {r['val_images']} val images"
    if "best_top1" in r:
        line += f" (best top-1 {r['best_top1']:.2f}% at epoch {r['best_epoch']}; checkpoint {r['best_checkpoint']})"
    print(f"{line}; metrics: {r['metrics']}")


def cmd_eval(args):
    from .evaluate import evaluate_checkpoint
    r = evaluate_checkpoint(load_config(args.config, args.overrides, "eval"))
    print(f"eval: top-1 {r['val_top1']:.2f}%, top-5 {r['val_top5']:.2f}% on {r['val_images']} val images")


def cmd_export_timm(args):
    from xla_trainer_models import BACKBONES
    from .pretrained import export_backbone
    try:
        export_backbone(args.checkpoint, args.out, BACKBONES.get(args.backbone))
    except ValueError as e:  # not a checkpoint, an unknown backbone, or not a file name it can write
        raise ConfigError(str(e)) from None
    if args.backbone != "vit":
        print(f"{args.backbone} state_dict written to {args.out}")
        return
    print(f"timm state_dict written to {args.out}; load it with timm.create_model('vit_base_patch16_224', "
          f"pretrained=True, pretrained_cfg_overlay=dict(file='{args.out}'), global_pool='avg', fc_norm=True)")


def cmd_describe(args):
    from .describe import describe, table
    result = describe(load_config(args.config, args.overrides), args.num_classes, with_flops=not args.no_flops)
    print(table(result) if args.table else json.dumps(result))


def cmd_bench(args):
    from .bench import bench
    result = bench(load_config(args.config, args.overrides, "pretrain"), steps=args.steps, warmup=args.warmup,
                   baseline=args.baseline, profile_host=args.profile_host)
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (unknown peak)"
    print(f"{result['device']} x{result['devices']}  batch {result['global_batch']}, targets {result['targets']}, "
          f"{result['gflops_per_image']:.1f} GFLOPs/image: "
          f"{result['images_per_sec']:.1f} images/s, {result['ms_per_step']:.1f} ms/step, "
          f"{result['achieved_tflops']:.2f} TFLOP/s, MFU {mfu}, "
          f"compiles {result['compiles']} ({result['compiles_after_warmup']} after warm-up)")
    if "executions_per_step" in result:
        print(graph_summary(result))
    for function, ms in result.get("host_profile", ()):
        print(f"  host {ms:9.1f} ms  {function}")
    if args.baseline:
        print(f"baseline {result['baseline']}: {result['baseline_images_per_sec']:.1f} images/s, "
              f"{result['baseline_ms_per_step']:.1f} ms/step; ours {result['images_per_sec']:.1f} images/s: "
              f"{result['speedup_vs_baseline']:.2f}x the baseline")
    print(json.dumps(result))


def graph_summary(r: dict) -> str:
    """bench's XLA figures, per step after warm-up, in one line."""
    overlap = "n/a" if r["overlap"] is None else f"{r['overlap']:.2f}"
    ratios = ", ".join(f"{chip} {ratio:.2f}" for chip, ratio in r["host_vs_tpu_step"].items())
    return (f"per step: {r['executions_per_step']:g} graph executions, {r['ir_nodes_per_step']:.0f} IR nodes, "
            f"{r['host_fallbacks_per_step']:g} host fallbacks; host {r['host_ms_per_step']:.1f} ms "
            f"({r['trace_ms_per_step']:.1f} ms tracing; {r['host_cpu_ms_per_step']:.1f} ms of CPU), "
            f"device {r['device_ms_per_step']:.1f} ms ({r['device_ms_after_return']:.1f} ms of it after the step call "
            f"returned), wall {r['ms_per_step']:.1f} ms (overlap {overlap}); "
            f"step compile {r['step_compile_seconds']:.1f} s ({r['step_compiles']} compiles); "
            f"host CPU / TPU step at 50% MFU, 256 images/chip: {ratios}")


def cmd_bench_data(args):
    from .bench import bench_data
    r = bench_data(load_config(args.config, args.overrides, "pretrain"), batches=args.batches)
    print(f"{r['source']} (targets {r['targets']}), {r['workers']} workers: "
          f"{r['images_per_sec']:.1f} images/s, {r['images_per_sec_per_core']:.1f} images/s per worker core")
    print(json.dumps(r))


def cmd_make_shards(args):
    from .data.shards import make_shards
    manifest = make_shards(args.images, args.out, args.shard_size, args.max_side, args.quality,
                           args.seed, args.workers)
    print(f"{manifest.num_samples} images in {len(manifest.shards)} shards under {args.out}")


def cmd_index_shards(args):
    from .data.shards import index_shards
    manifest = index_shards(args.prefix)
    print(f"{manifest.num_samples} images in {len(manifest.shards)} shards: {args.prefix}/manifest.json")


def cmd_precompute_targets(args):
    from .loop import make_runtime
    from .targets import precompute_targets
    cfg = load_config(args.config, args.overrides, "pretrain")
    runtime = make_runtime(cfg)
    manifest = precompute_targets(cfg, runtime)
    if manifest is None:  # not host 0: its shards are done, host 0 writes the manifest
        return
    print(f"targets of {len(manifest.shards)} shards under {cfg.targets.prefix}: {manifest.num_views} "
          f"views x {manifest.dtype}, {manifest.bytes_per_image / 1e3:.1f} kB per image")


def cmd_info(args):
    import importlib.metadata as md
    from .runtime import create_runtime
    runtime = create_runtime(args.backend)
    info = vars(runtime.info())
    if runtime.backend == "xla":
        info["mesh"] = {"shape": list(runtime.mesh.mesh_shape), "axes": list(runtime.mesh.axis_names)}
    versions = {}
    for pkg in ("torch", "torch_xla", "torchvision", "timm", "open_clip_torch", "fvcore", "gcsfs"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info["versions"] = versions
    print(json.dumps(info, indent=2))


def cmd_visualize(args):
    from .visualize import visualize
    cfg = load_config(args.config, args.overrides)
    if cfg.task not in CLASSIFIERS:
        raise ConfigError(f"visualize draws a classifier's encoder: config '{args.config}' is a {cfg.task} config; "
                          f"pass a train, finetune or probe config (train.init: the weights)")
    r = visualize(cfg, args.images, args.out, args.count, args.cell)
    print(f"{len(r['images'])} images x ({', '.join(r['columns'])}) written to {r['out']} "
          f"({r['size'][0]}x{r['size'][1]} px)")


def cmd_prepare_data(args):
    from .data.generated import prepare_embedded
    print(prepare_embedded(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xla-trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pre-train (resumes from the newest checkpoint in train.output_dir)")
    _config_args(p)
    p.set_defaults(func=cmd_pretrain)
    helps = {"train": "train a classifier on any backbone from scratch (supervised; mixup, RandAugment, ...)",
             "finetune": "fine-tune the encoder with a classification head (layer decay, mixup, ...)",
             "linprobe": "linear probe (BatchNorm + linear) on the frozen encoder",
             "attnprobe": "attentive probe (one learned query, cross-attention, linear) on the frozen encoder",
             "knn": "cosine k-NN on the frozen encoder's features"}
    for command, text in helps.items():
        p = sub.add_parser(command, help=text)
        _config_args(p, eval_default(command))
        p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("eval", help="top-1/top-5 on data val/ of a trained classifier (train.init, its own head "
                                    "kept: e.g. an official Adventurer checkpoint)")
    _config_args(p, CONFIG_DIR / "train" / "demo.yaml")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("export-timm", help="write an encoder as a timm ViT state_dict")
    p.add_argument("checkpoint", help="our checkpoint (file, checkpoint directory or output_dir), an official "
                                      "D-iGPT checkpoint, or a timm state_dict; local or gs://")
    p.add_argument("out", help="output file (.pth or .safetensors)")
    p.add_argument("--backbone", default="vit", help="the backbone registry entry (default vit: a timm ViT)")
    p.set_defaults(func=cmd_export_timm)
    p = sub.add_parser("describe", help="parameters per part and FLOPs per image of the model a config's task builds "
                                        "(no data, no teacher weights, no step)")
    _config_args(p)
    p.add_argument("--table", action="store_true", help="a readable table instead of JSON")
    p.add_argument("--num-classes", type=bounded_int(0), default=1000, help="for a classifier config (default 1000)")
    p.add_argument("--no-flops", action="store_true",
                   help="parameters only, the model built on the meta device: instant at any size")
    p.set_defaults(func=cmd_describe)
    p = sub.add_parser("bench", help="time N train steps after warm-up on a fixed device batch")
    _config_args(p)
    p.add_argument("--steps", type=bounded_int(1), default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=bounded_int(0), default=3,
                   help="untimed steps first, compilation included (default 3)")
    p.add_argument("--baseline", choices=("official",), default=None,
                   help="then time, on the same config and batch, a step in the official D-iGPT code's style "
                        "(eager fp16 + GradScaler, host-built float mask and CPU randperm orders, .item() "
                        "per step; cuda or cpu) and print ours / its rate")
    p.add_argument("--profile-host", action="store_true",
                   help="XLA: then one more step under cProfile; prints the functions the host spends the step in")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("bench-data", help="images/s of the input pipeline alone (local or gs:// shards)")
    _config_args(p)
    p.add_argument("--batches", type=bounded_int(1), default=20, help="timed batches (default 20)")
    p.set_defaults(func=cmd_bench_data)
    p = sub.add_parser("make-shards", help="ImageFolder tree -> webdataset tar shards + manifest")
    p.add_argument("images", help="ImageFolder root: <root>/<class>/<image> (e.g. imagenet/train)")
    p.add_argument("out", help="output prefix, local or gs://")
    p.add_argument("--shard-size", type=bounded_int(1), default=1000, help="images per shard (default 1000)")
    p.add_argument("--max-side", type=bounded_int(1), default=None,
                   help="re-encode so the longest side is at most this")
    p.add_argument("--quality", type=bounded_int(1, 100), default=90, help="JPEG quality when re-encoding (default 90)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order images are dealt into shards")
    p.add_argument("--workers", type=bounded_int(1), default=2, help="encoding processes (default 2)")
    p.set_defaults(func=cmd_make_shards)
    p = sub.add_parser("index-shards", help="write manifest.json for existing webdataset shards (e.g. img2dataset's)")
    p.add_argument("prefix", help="local or gs:// prefix holding the .tar shards")
    p.set_defaults(func=cmd_index_shards)
    p = sub.add_parser("precompute-targets",
                       help="run the teacher over the image shards (data.shards) into target shards (targets.prefix)")
    _config_args(p)
    p.set_defaults(func=cmd_precompute_targets)
    p = sub.add_parser("visualize", help="draw a few images' last-block attention and patch-feature PCA as a PNG grid")
    _config_args(p, CONFIG_DIR / "saim" / "linprobe_demo.yaml")
    p.add_argument("--images", default="embedded", help="a folder of images (--count of them, spread over the sorted files) or "
                                                         "'embedded' (the demo photos; default)")
    p.add_argument("--out", required=True, help="the PNG to write (never overwritten)")
    p.add_argument("--count", type=bounded_int(1), default=4, help="images, one row each (default 4)")
    p.add_argument("--cell", type=bounded_int(1), default=128, help="panel side in pixels (default 128)")
    p.set_defaults(func=cmd_visualize)
    p = sub.add_parser("info", help="backend, devices, mesh, process count/index, versions")
    p.add_argument("--backend", default="auto", choices=("auto", "xla", "cuda", "cpu"))
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("prepare-data", help="write the embedded real-image dataset as an ImageFolder tree")
    p.add_argument("--out", default="~/.cache/xla-trainer/embedded", help="target directory")
    p.set_defaults(func=cmd_prepare_data)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("xla_trainer").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as e:
        print(f"xla-trainer: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:  # a bad path
        print(f"xla-trainer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the training loop took it over: nothing to save yet
        print("xla-trainer: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .checkpoint import NonFiniteState
        from .loop import Interrupted, RunLockLost, TrainingDiverged
        codes = {Interrupted: 130, TrainingDiverged: 3, NonFiniteState: 3, RunLockLost: 2}
        code = next((c for kind, c in codes.items() if isinstance(e, kind)), None)
        if code is None:
            raise
        print(f"xla-trainer: {'error: ' if code != 130 else ''}{e}", file=sys.stderr)
        return code
    return 0
