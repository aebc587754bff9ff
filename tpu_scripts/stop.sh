#!/usr/bin/env bash
# Stop jobs started by launch.sh on every worker at once: SIGTERM to the job's main process (pretrain
# then finishes its step, saves a checkpoint and exits); once it is gone, or after the grace period,
# SIGKILL to what is left of its process group (data loader workers: a leftover process keeps the
# TPU busy for the next launch).
#
# Usage: tpu_scripts/stop.sh --name NAME --zone ZONE [--job JOB] [options]
#   --name NAME        TPU_NAME    the TPU
#   --zone ZONE        ZONE        its zone
#   --project P        PROJECT     GCP project (default: gcloud's configured project)
#   --job JOB          JOB         which job (default: every job with a pid file)
#   --grace SECONDS    GRACE       how long to wait for the job to exit by itself (default 300)
#   --dry-run          DRY_RUN=1   print each command (prefixed with "+ ") and run none
#   -h, --help                     this text
# Flags win over the environment variables beside them.

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS job=JOB grace=GRACE" "$@"
shift "$PARSED"
no_args "$@"
need_tpu
check_job
GRACE=${GRACE:-300}
[[ $GRACE =~ ^[0-9]+$ ]] || die "--grace/GRACE '$GRACE': a number of seconds"
if [[ -n ${JOB:-} ]]; then pids=$(rq "$LOG_DIR/$JOB.pid"); else pids="$LOG_DIR/*.pid"; fi

# shellcheck disable=SC2016  # $ meant for the workers' shell
remote=(
  "for f in $pids; do [ -e \"\$f\" ] || continue; pid=\$(cat \"\$f\");"
  'if kill -TERM "$pid" 2>/dev/null; then s=stopped;'
  "for i in \$(seq $GRACE); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done;"
  "kill -0 \"\$pid\" 2>/dev/null && s=\"killed after $GRACE s\";"
  'kill -KILL -- "-$pid" 2>/dev/null; echo "$(hostname): $(basename "$f" .pid) $s"; fi;'
  'rm -f "$f"; done'
)
tpu_ssh all "${remote[*]}"
