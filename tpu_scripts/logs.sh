#!/usr/bin/env bash
# Follow the log of a job started by launch.sh on one worker (tail -F ~/xla-trainer-logs/JOB.log).
#
# Usage: tpu_scripts/logs.sh --name NAME --zone ZONE [--worker N] [--job JOB] [options]
#   --name NAME        TPU_NAME    the TPU
#   --zone ZONE        ZONE        its zone
#   --project P        PROJECT     GCP project (default: gcloud's configured project)
#   --worker N         WORKER      which worker (default 0; every host logs the same run, worker 0 is
#                                  the one that writes metrics and checkpoints)
#   --job JOB          JOB         which log (default: the newest on that worker)
#   --lines N          LINES       lines of history to show first (default 100)
#   --dry-run          DRY_RUN=1   print each command (prefixed with "+ ") and run none
#   -h, --help                     this text
# Flags win over the environment variables beside them. Ctrl-C stops following; the job goes on.

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS worker=WORKER job=JOB lines=LINES" "$@"
shift "$PARSED"
no_args "$@"
need_tpu
check_job
if [[ -n ${JOB:-} ]]; then
  log=$(rq "$LOG_DIR/$JOB.log")
else
  log="\"\$(ls -t $LOG_DIR/*.log | head -n 1)\""
fi
tpu_ssh "${WORKER:-0}" "tail -n $(printf %q "${LINES:-100}") -F $log"
