#!/usr/bin/env bash
# A local debugging run on one GPU: torchrun --standalone --nproc_per_node=1 -m xla_trainer pretrain
# runtime.backend=cuda, from the repository root, with the small demo config by default.
#
# Usage: gpu_scripts/local.sh [--config FILE] [--dry-run] [key.sub=value ...]
#   --config FILE    CONFIG      experiment YAML, relative to the repository root
#                                (default configs/digpt/demo.yaml)
#   --dry-run        DRY_RUN=1   print each command (prefixed with "+ ") and run none
#   -h, --help                   this text
#   key.sub=value                config overrides, passed on (the last value of a key wins)
# Flags win over the environment variables beside them. Uses the torchrun on PATH: activate the
# environment first (. .venv/bin/activate). Example:
#   gpu_scripts/local.sh train.stop_at_step=20 train.output_dir=runs/debug

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "config=CONFIG" "$@"
shift "$PARSED"
run cd "$ROOT"
run torchrun --standalone --nproc_per_node=1 -m xla_trainer pretrain \
  --config "${CONFIG:-$DEFAULT_CONFIG}" runtime.backend=cuda "$@"
