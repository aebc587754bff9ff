#!/usr/bin/env bash
# The GPU check, one command on the lent GPU machine (python3 with torch + CUDA, no network; under
# 8 minutes on an H100/H200): installs the wheels of .whl/ (`make wheels`, on a machine with network)
# and this project into a temporary folder, runs the CUDA tests (tests/test_cuda.py), then the bench
# matrix (gpu_scripts/bench_matrix.py), which writes OUT/device_check.json and prints a Markdown table.
#
# Usage: gpu_scripts/device_check.sh [--out DIR] [--dry-run]
#   --out DIR        OUT         the report and logs (default ./device_check_out)
#   --dry-run        DRY_RUN=1   print each command (prefixed with "+ ") and run none
#   -h, --help                   this text
# PYTHON (default python3) is the interpreter used. Exits 2 before installing anything where no
# CUDA GPU is visible; otherwise non-zero if the tests or the matrix failed.

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "out=OUT" "$@"
shift "$PARSED"
(($# == 0)) || die "unexpected argument '$1' (see $PROG --help)"
PYTHON=${PYTHON:-python3}
OUT=${OUT:-device_check_out}
[[ $OUT == /* ]] || OUT=$PWD/$OUT  # the commands below run from the repository root
TOTAL_SECONDS=450  # the whole check: 7.5 minutes
TEST_SECONDS=180   # the CUDA tests' share; the bench matrix gets what is left

# require_gpu: exit 2 with a message unless nvidia-smi exists and torch sees a CUDA GPU.
require_gpu() {
  local why=''
  if ! command -v nvidia-smi >/dev/null; then
    why='nvidia-smi not found'
  elif ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    why="$PYTHON cannot import torch"
  elif [[ $("$PYTHON" -c 'import torch; print(torch.cuda.is_available())') != True ]]; then
    why='torch.cuda.is_available() is False'
  fi
  [[ -z $why ]] && return
  echo "device_check: no CUDA GPU visible ($why); this check needs one: run it on the GPU machine" >&2
  exit 2
}

# install_offline DIR: the wheels and the project, without dependencies or an index, into DIR; the
# machine's own packages (torch above all) stay as they are. The project builds offline with the
# machine's setuptools (--no-build-isolation: no build environment to download).
install_offline() {
  local wheels=("$ROOT"/.whl/*.whl)
  truthy "$DRY_RUN" || [[ -e ${wheels[0]} ]] || die "no wheels in $ROOT/.whl: run 'make wheels' on a machine with network"
  run "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$1" "${wheels[@]}"
  run "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation --target "$1" "$ROOT"
}

truthy "$DRY_RUN" || require_gpu
SITE=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1  # no network there: fail at once, not after retries
install_offline "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
run cd "$ROOT"
run mkdir -p "$OUT"

status=0
run timeout "$TEST_SECONDS" "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py || status=1
budget=$((TOTAL_SECONDS - SECONDS - 15))  # what is left, less the report's margin
run timeout $((budget + 30)) "$PYTHON" -m gpu_scripts.bench_matrix --out "$OUT/device_check.json" \
  --budget "$budget" || status=1
exit "$status"
