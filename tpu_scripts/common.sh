# shellcheck shell=bash disable=SC2034  # the variables here are used by the scripts
# Helpers shared by the tpu_scripts (sourced, not run): flags, --help, the --dry-run `run` wrapper,
# quoting, and the gcloud ssh to the workers. Avoids bash 4 features (macOS has bash 3.2); tested on 5.2.
# shellcheck source-path=SCRIPTDIR source=flags.sh
source "$(dirname "${BASH_SOURCE[0]}")/flags.sh"

# shellcheck disable=SC2088  # a ~ meant for the workers' shell
LOG_DIR='~/xla-trainer-logs'  # on every worker
TPU_FLAGS="name=TPU_NAME zone=ZONE project=PROJECT"  # flags every TPU script takes

# rq PATH: PATH quoted for the remote shell, a leading ~/ left to expand there.
# shellcheck disable=SC2088
rq() {
  case $1 in
    '~/'*) printf '~/%q' "${1#'~/'}" ;;
    *) printf '%q' "$1" ;;
  esac
}

# check_job: launch/logs/stop name files after --job; keep it a plain word.
check_job() {
  [[ -z ${JOB:-} || $JOB =~ ^[A-Za-z0-9._-]+$ ]] || die "--job/JOB '$JOB': letters, digits, . _ - only"
}

no_args() { (($# == 0)) || die "unexpected argument '$1' (see $PROG --help)"; }

# need_tpu: check --name/--zone and set LOC, the location flags of every gcloud command.
need_tpu() {
  require TPU_NAME --name
  require ZONE --zone
  LOC=(--zone "$ZONE")
  [[ -z ${PROJECT:-} ]] || LOC+=(--project "$PROJECT")
}

# tpu_ssh WORKER COMMAND: run COMMAND (one remote shell line) on worker WORKER (a number, or all).
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker="$1" --command "$2"
}
