#!/usr/bin/env bash
# Pre-train on the GPUs of one machine: torchrun --standalone --nproc_per_node=N (DDP over NCCL), from
# the repository root.
#
# Usage: gpu_scripts/node.sh [--gpus N] [--config FILE] [--dry-run] [key.sub=value ...]
#   --gpus N         GPUS        processes, one per GPU (default: the GPUs nvidia-smi -L lists;
#                                1 in a dry run without nvidia-smi)
#   --config FILE    CONFIG      experiment YAML, relative to the repository root
#                                (default configs/digpt/demo.yaml)
#   --dry-run        DRY_RUN=1   print each command (prefixed with "+ ") and run none
#   -h, --help                   this text
#   key.sub=value                config overrides, passed on (the last value of a key wins)
# Flags win over the environment variables beside them. Uses the torchrun on PATH. Example:
#   gpu_scripts/node.sh --config configs/digpt/vit_b16_in1k.yaml data.root=/data/imagenet

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "gpus=GPUS config=CONFIG" "$@"
shift "$PARSED"
GPUS=${GPUS:-$(gpu_count)}
run cd "$ROOT"
run torchrun --standalone --nproc_per_node="$GPUS" -m xla_trainer pretrain \
  --config "${CONFIG:-$DEFAULT_CONFIG}" runtime.backend=cuda "$@"
