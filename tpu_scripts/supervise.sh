#!/usr/bin/env bash
# Keep one pretrain or precompute-targets job alive on a TPU slice until it has finished, unattended:
# create the slice (--spot: a queued resource), set it up, launch; every --poll-seconds look at the
# slice's state and at the job on every worker; on a preemption (SUSPENDED, FAILED, PREEMPTED, the
# slice gone, ssh failing --ssh-retries times in a row) or a hung job (its log silent --stall-minutes
# on a worker): stop.sh, delete.sh, create.sh (backing off after stock-outs), setup.sh, launch.sh
# again, and the trainer resumes from its newest checkpoint. A job that exits 0 before it is
# complete, or dies, is relaunched on the same slice. Once the job's completion record exists
# (pretrain: <train.output_dir>/done.json; precompute-targets: <targets.prefix>/manifest.json) it
# deletes the slice (unless --keep) and exits 0. A job exiting 2 (config error) or 3 (divergence) is
# not relaunched: it prints the job's last lines, keeps the slice and exits with that code.
# Events go one per line (UTC time first) to STATE_DIR/supervise.log and stderr; STATE_DIR/status.json
# holds state, restarts, failed_creates, last_progress (the job's bar, step/total) and the slice.
# A second supervisor for the same --name refuses; a killed one, started again, adopts the slice and
# its job. Needs python3 (3.8+, standard library only) and gcloud where it runs.
#
# Usage: tpu_scripts/supervise.sh --name NAME --zone ZONE --type TYPE [options] SUBCOMMAND [--config FILE] [key=value ...]
#   SUBCOMMAND                 pretrain (give train.output_dir=gs://...) or precompute-targets
#                              (give targets.prefix=gs://...): where a new slice resumes from
#   --name, --zone, --type, --project, --version, --spot    as for create.sh
#   --repo-url URL, --repo-dir DIR                         as for setup.sh / launch.sh
#   --job JOB                  launch.sh --job (default: the subcommand)
#   --poll-seconds S           between two looks (default 60)
#   --stall-minutes M          a worker's log silent this long = hung (default 30; a first XLA
#                              compilation of a big model can take 10+ minutes)
#   --max-restarts N           relaunches before giving up (default 20; counted across supervisor restarts)
#   --ssh-retries N            failed looks at the workers in a row that mean the slice is lost (default 5)
#   --create-backoff-seconds S first wait after a failed create, doubled each time (default 60)
#   --max-backoff-minutes M    the longest wait between creates (default 30)
#   --max-failed-creates N     failed creates in a row before giving up (default 100)
#   --stop-grace S             stop.sh --grace (default 300)
#   --keep                     keep the slice after the run has finished
#   --state-dir DIR            log, status.json and lock (default ~/xla-trainer-supervisor/NAME)
#   --dry-run                  print the commands of a first start (create, setup, launch), run none
#   -h, --help                 this text
# Example (a spot v4-32 kept alive all night; tpu_scripts/README.md has more):
#   tpu_scripts/supervise.sh --name night --zone us-central2-b --type v4-32 --spot pretrain \
#     --config configs/digpt/vit_b16_in1k.yaml train.output_dir=gs://bucket/runs/b16

# shellcheck source-path=SCRIPTDIR source=flags.sh
source "$(dirname "$0")/flags.sh"
for word; do
  case $word in
    -h | --help) usage; exit 0 ;;
    pretrain | precompute-targets) break ;;
  esac
done
exec "${PYTHON:-python3}" "$ROOT/xla_trainer/supervise.py" "$@"
