# shellcheck shell=bash disable=SC2034  # the variables here are used by the scripts
# Helpers shared by the tpu_scripts (sourced, not run): flags, --help, the --dry-run `run` wrapper,
# quoting, and the gcloud ssh to the workers. Avoids bash 4 features (macOS has bash 3.2); tested on 5.2.
set -euo pipefail

PROG=$(basename "$0")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # the repository checkout
DRY_RUN=${DRY_RUN:-0}
# shellcheck disable=SC2088  # a ~ meant for the workers' shell
LOG_DIR='~/xla-trainer-logs'  # on every worker
TPU_FLAGS="name=TPU_NAME zone=ZONE project=PROJECT"  # flags every TPU script takes

die() { echo "$PROG: error: $*" >&2; exit 2; }

truthy() { case ${1:-} in '' | 0 | false | no) return 1 ;; esac; }

# The script's help: its header comment, from line 2 to the first empty line.
usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

# quote WORD...: the words as one shell line (plain words as they are, others in single quotes).
quote() {
  local w out=() sq="'\\''"
  for w; do
    case $w in
      '' | *[!A-Za-z0-9_./:=@%+,-]*) out+=("'${w//\'/$sq}'") ;;
      *) out+=("$w") ;;
    esac
  done
  echo "${out[*]}"
}

# run CMD...: print "+ CMD"; run it unless this is a dry run (then the line goes to stdout).
run() {
  if truthy "$DRY_RUN"; then echo "+ $(quote "$@")"; return; fi
  echo "+ $(quote "$@")" >&2
  "$@"
}

# rq PATH: PATH quoted for the remote shell, a leading ~/ left to expand there.
# shellcheck disable=SC2088
rq() {
  case $1 in
    '~/'*) printf '~/%q' "${1#'~/'}" ;;
    *) printf '%q' "$1" ;;
  esac
}

# parse_flags "flag=VAR flag2=VAR2:bool ..." "$@"
# Each --flag VALUE or --flag=VALUE sets VAR (so flags win over the environment); a :bool flag sets
# VAR=1. --dry-run and --help are always known. Stops at the first word that is not a flag, or after
# `--`; PARSED is the number of words used (`shift "$PARSED"` leaves the rest).
parse_flags() {
  local spec=$1 n=$# key entry var val
  shift
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --) shift; break ;;
      --*) ;;
      *) break ;;
    esac
    key=${1#--} var=''
    key=${key%%=*}
    for entry in $spec; do [[ ${entry%%=*} != "$key" ]] || var=${entry#*=}; done
    [[ -n $var ]] || die "unknown option --$key (see $PROG --help)"
    if [[ $var == *:bool ]]; then
      [[ $1 != *=* ]] || die "--$key takes no value"
      var=${var%:bool} val=1
      shift
    elif [[ $1 == *=* ]]; then val=${1#*=}; shift
    elif (($# > 1)); then val=$2; shift 2
    else die "--$key needs a value"; fi
    printf -v "$var" '%s' "$val"
  done
  PARSED=$((n - 1 - $#))
}

# require VAR --flag: stop unless the flag or the environment variable gave a value.
require() { [[ -n ${!1:-} ]] || die "missing $2 (or set $1)"; }

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
