#!/usr/bin/env bash
# Pre-train on the GPUs of one machine with torchrun + DDP (NCCL); no torch_xla needed.
#   NGPU=8 gpu_scripts/pretrain.sh --config configs/digpt/vit_b16_in1k.yaml data.root=/data/imagenet
# A local debugging run on one GPU: NGPU=1 gpu_scripts/pretrain.sh (the demo config).
# Multi-node launchers, Slurm and --dry-run come with the scale-out work.
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc_per_node="${NGPU:-1}" -m xla_trainer pretrain runtime.backend=cuda "$@"
