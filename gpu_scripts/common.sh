# shellcheck shell=bash disable=SC2034  # the variables here are used by the scripts
# Helpers of the gpu_scripts (sourced, not run): the shared flag/--help/--dry-run helpers, the GPU count.
# shellcheck source-path=SCRIPTDIR source=../tpu_scripts/flags.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tpu_scripts/flags.sh"

DEFAULT_CONFIG=configs/digpt/demo.yaml

# gpu_count: the GPUs nvidia-smi -L lists; 1 in a dry run without nvidia-smi.
gpu_count() {
  local n
  if ! command -v nvidia-smi >/dev/null; then
    truthy "$DRY_RUN" || die "nvidia-smi not found: pass --gpus N (or set GPUS)"
    echo 1
    return
  fi
  n=$(nvidia-smi -L | grep -c '^GPU ') || die "nvidia-smi -L lists no GPU: pass --gpus N (or set GPUS)"
  echo "$n"
}
