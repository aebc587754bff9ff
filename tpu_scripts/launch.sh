#!/usr/bin/env bash
# Start an xla-trainer command on every worker of a TPU VM or pod slice at once, detached: the same
# command line everywhere (SPMD: one process per host), logged on each worker to
# ~/xla-trainer-logs/JOB.log (pid in JOB.pid; its exit status, once it ends, in JOB.rc, written by
# tpu_scripts/job.sh on the worker). Needs setup.sh first. Everything after the
# subcommand goes to xla-trainer unchanged; launch.sh adds
# runtime.compile_cache=$XLA_TRAINER_COMPILE_CACHE (from setup.sh's env file) before your overrides.
#
# Usage: tpu_scripts/launch.sh --name NAME --zone ZONE [options] SUBCOMMAND [--config FILE] [key.sub=value ...]
#   SUBCOMMAND         pretrain, precompute-targets, bench or bench-data
#   --name NAME        TPU_NAME    the TPU
#   --zone ZONE        ZONE        its zone
#   --project P        PROJECT     GCP project (default: gcloud's configured project)
#   --job JOB          JOB         name of the log and pid files (default: the subcommand)
#   --repo-dir DIR     REPO_DIR    the repository on the workers (default ~/xla-trainer)
#   --dry-run          DRY_RUN=1   print each command (prefixed with "+ ") and run none
#   -h, --help                     this text
# Flags win over the environment variables beside them. Example:
#   tpu_scripts/launch.sh --name my-v4-32 --zone us-central2-b pretrain \
#     --config configs/digpt/vit_b16_in1k.yaml train.output_dir=gs://bucket/runs/b16

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS job=JOB repo-dir=REPO_DIR" "$@"
shift "$PARSED"
(($#)) || die "missing the xla-trainer subcommand, e.g. pretrain (see $PROG --help)"
sub=$1
shift
case $sub in
  pretrain | precompute-targets | bench | bench-data) ;;
  *) die "unsupported subcommand '$sub': pretrain, precompute-targets, bench or bench-data" ;;
esac
need_tpu
check_job
JOB=${JOB:-$sub}
dir=$(rq "${REPO_DIR:-~/xla-trainer}")
log=$(rq "$LOG_DIR/$JOB")

# xla-trainer's options (--config FILE, --steps N) go first, then the overrides: argparse takes the
# overrides as one run of positional words, and the last value of a key wins.
options='' overrides=''
while (($#)); do
  case $1 in
    --*=*) options+=" $(printf %q "$1")" ;;
    --*) (($# > 1)) || die "$1 needs a value"
      options+=" $(printf '%q %q' "$1" "$2")"
      shift ;;
    *) overrides+=" $(printf %q "$1")" ;;
  esac
  shift
done

# shellcheck disable=SC2016  # $ meant for the workers' shell
remote=(
  "set -e; cd $dir 2>/dev/null && [ -e xla-trainer.env ] ||"
  "{ echo \"\$(hostname): no $dir/xla-trainer.env: run setup.sh first\" >&2; exit 1; };"
  ". ./xla-trainer.env;"
  "mkdir -p $LOG_DIR \"\$XLA_TRAINER_COMPILE_CACHE\";"
  "if [ -e $log.pid ] && kill -0 \"\$(cat $log.pid)\" 2>/dev/null; then"
  "echo \"\$(hostname): $JOB is already running (stop.sh first)\" >&2; exit 1; fi;"
  "rm -f $log.rc; setsid nohup tpu_scripts/job.sh $log.rc .venv/bin/xla-trainer $sub$options"
  'runtime.compile_cache="$XLA_TRAINER_COMPILE_CACHE"'"$overrides"
  ">> $log.log 2>&1 < /dev/null & echo \$! > $log.pid;"
  "echo \"\$(hostname): started $JOB, log $log.log\""
)
tpu_ssh all "${remote[*]}"
