#!/usr/bin/env bash
# Run `xla-trainer pretrain` on every worker of an existing TPU VM or pod slice at once, with the
# same config: SPMD needs one process per host, all started together.
#   TPU_NAME=my-v4-32 ZONE=us-central2-b tpu_scripts/pretrain.sh --config configs/digpt/vit_b16_in1k.yaml
# Expects the repository installed at $REPO_DIR on every worker (`make install` there).
# Creating/deleting TPU VMs, setup, spot capacity and --dry-run come with the scale-out work.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-'~/xla-trainer'}
args=$(printf '%q ' "$@")
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $REPO_DIR && PJRT_DEVICE=TPU .venv/bin/xla-trainer pretrain $args"
