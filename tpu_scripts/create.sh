#!/usr/bin/env bash
# Create a TPU VM or pod slice. With --spot, queue a spot slice (gcloud compute tpus queued-resources
# create --spot) and poll until it is ACTIVE; without it, gcloud compute tpus tpu-vm create.
#
# Usage: tpu_scripts/create.sh --name NAME --zone ZONE --type TYPE [options]
#   --name NAME      TPU_NAME      name of the TPU (and of its queued resource with --spot)
#   --zone ZONE      ZONE          e.g. us-central2-b (v4), us-west4-a or us-central1-a (v5e)
#   --type TYPE      TPU_TYPE      accelerator type, e.g. v4-8, v4-32, v5litepod-16
#   --version V      TPU_VERSION   runtime version; default from the type: tpu-ubuntu2204-base (v2-v4),
#                                  v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
#   --project P      PROJECT       GCP project (default: gcloud's configured project)
#   --spot           SPOT=1        spot capacity through a queued resource; waits until ACTIVE
#                                  (checked every POLL_SECONDS, default 30)
#   --dry-run        DRY_RUN=1     print each command (prefixed with "+ ") and run none
#   -h, --help                     this text
# Flags win over the environment variables beside them.

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS type=TPU_TYPE version=TPU_VERSION spot=SPOT:bool" "$@"
shift "$PARSED"
no_args "$@"
need_tpu
require TPU_TYPE --type
case $TPU_TYPE in
  v5litepod-* | v5e-*) default_version=v2-alpha-tpuv5-lite ;;
  v5p-*) default_version=v2-alpha-tpuv5 ;;
  v6e-*) default_version=v2-alpha-tpuv6e ;;
  *) default_version=tpu-ubuntu2204-base ;;
esac
TPU_VERSION=${TPU_VERSION:-$default_version}

if ! truthy "${SPOT:-}"; then
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOC[@]}" \
    --accelerator-type="$TPU_TYPE" --version="$TPU_VERSION"
  exit
fi

run gcloud compute tpus queued-resources create "$TPU_NAME" "${LOC[@]}" --node-id="$TPU_NAME" \
  --accelerator-type="$TPU_TYPE" --runtime-version="$TPU_VERSION" --spot
describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOC[@]}" --format='value(state.state)')
if truthy "$DRY_RUN"; then
  run "${describe[@]}"  # repeated until it prints ACTIVE
  exit
fi
while :; do
  state=$("${describe[@]}")
  case $state in
    ACTIVE) break ;;
    FAILED | SUSPENDING | SUSPENDED) die "queued resource $TPU_NAME is $state (see ${describe[*]:0:6})" ;;
  esac
  echo "$(date +%T) $TPU_NAME: ${state:-?}; waiting for ACTIVE" >&2
  sleep "${POLL_SECONDS:-30}"
done
echo "$TPU_NAME is ACTIVE"
