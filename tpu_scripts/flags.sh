# shellcheck shell=bash disable=SC2034  # the variables here are used by the scripts
# Helpers shared by tpu_scripts/ and gpu_scripts/ (sourced through their common.sh, not run):
# flags, --help, the --dry-run `run` wrapper, quoting. Avoids bash 4 features (macOS has bash 3.2).
set -euo pipefail

PROG=$(basename "$0")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # the repository checkout
DRY_RUN=${DRY_RUN:-0}

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
