#!/usr/bin/env bash
# Install the repository on every worker of a TPU VM or pod slice at once (--worker=all): fetch it
# (git clone --repo-url, else a tarball of this checkout without its venvs, .git and runs/, copied with
# gcloud compute tpus tpu-vm scp), create REPO_DIR/.venv, pip install -e '.[xla]' (torch, torch_xla,
# torchvision pinned by pyproject.toml) plus torch_xla[tpu] for libtpu, and write REPO_DIR/xla-trainer.env
# (PJRT_DEVICE=TPU, XLA_TRAINER_COMPILE_CACHE), which launch.sh sources. Safe to run again.
#
# Usage: tpu_scripts/setup.sh --name NAME --zone ZONE [options]
#   --name NAME            TPU_NAME                   the TPU
#   --zone ZONE            ZONE                       its zone
#   --project P            PROJECT                    GCP project (default: gcloud's configured project)
#   --repo-url URL         REPO_URL                   git clone URL (pulled again if already cloned);
#                                                     default: copy this checkout
#   --repo-dir DIR         REPO_DIR                   where on the workers (default ~/xla-trainer)
#   --compile-cache DIR    XLA_TRAINER_COMPILE_CACHE  XLA compilation cache on the workers' disks
#                                                     (default ~/xla-cache)
#   --dry-run              DRY_RUN=1                  print each command (prefixed with "+ ") and run none
#   -h, --help                                        this text
# Flags win over the environment variables beside them.

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS repo-url=REPO_URL repo-dir=REPO_DIR compile-cache=XLA_TRAINER_COMPILE_CACHE" "$@"
shift "$PARSED"
no_args "$@"
need_tpu
dir=$(rq "${REPO_DIR:-~/xla-trainer}")
cache=$(rq "${XLA_TRAINER_COMPILE_CACHE:-~/xla-cache}")

if [[ -n ${REPO_URL:-} ]]; then
  fetch="if [ -d $dir/.git ]; then git -C $dir pull --ff-only; else git clone $(printf %q "$REPO_URL") $dir; fi"
else
  tarball=${TMPDIR:-/tmp}/xla-trainer-$TPU_NAME.tgz
  export COPYFILE_DISABLE=1  # macOS tar: no ._* files
  # both venvs of the Makefile stay behind: .venv-current-torch alone is about 6 GB
  run tar -czf "$tarball" --exclude=.venv --exclude=.venv-current-torch --exclude=.git --exclude=runs \
    --exclude=build --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache -C "$ROOT" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:xla-trainer-src.tgz" "${LOC[@]}" --worker=all
  run rm -f "$tarball"
  fetch="mkdir -p $dir && tar -xzf ~/xla-trainer-src.tgz -C $dir && rm ~/xla-trainer-src.tgz"
fi
env_file=("export PJRT_DEVICE=TPU" "export XLA_TRAINER_COMPILE_CACHE=$cache")
# shellcheck disable=SC2016  # $ meant for the workers' shell
remote=(
  "set -e; $fetch; cd $dir;"
  # Ubuntu's python3 needs python3-venv for `python3 -m venv`
  'python3 -c "import ensurepip" 2>/dev/null || { sudo apt-get update -qq &&'
  'sudo apt-get install -y -qq -o DPkg::Lock::Timeout=600 python3-venv; };'
  'python3 -m venv .venv; .venv/bin/pip install -q -U pip;'
  '.venv/bin/pip install --progress-bar off -e ".[xla]" "torch_xla[tpu]==2.9.0";'
  "printf \"%s\\n\" $(printf '%q ' "${env_file[@]}")> xla-trainer.env;"
  'echo "$(hostname): installed in $PWD"'
)
tpu_ssh all "${remote[*]}"
