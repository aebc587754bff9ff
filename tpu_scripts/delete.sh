#!/usr/bin/env bash
# Delete a TPU VM or pod slice (gcloud compute tpus tpu-vm delete); with --spot, delete its queued
# resource and the slice with it (gcloud compute tpus queued-resources delete --force).
#
# Usage: tpu_scripts/delete.sh --name NAME --zone ZONE [--spot] [--yes] [--project P] [--dry-run]
#   --name NAME      TPU_NAME      the TPU to delete
#   --zone ZONE      ZONE          its zone
#   --project P      PROJECT       GCP project (default: gcloud's configured project)
#   --spot           SPOT=1        it was created with create.sh --spot (a queued resource)
#   --yes            YES=1         do not ask for confirmation (gcloud --quiet)
#   --dry-run        DRY_RUN=1     print each command (prefixed with "+ ") and run none
#   -h, --help                     this text
# Flags win over the environment variables beside them.

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS spot=SPOT:bool yes=YES:bool" "$@"
shift "$PARSED"
no_args "$@"
need_tpu
truthy "${YES:-}" && LOC+=(--quiet)

if truthy "${SPOT:-}"; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOC[@]}" --force
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOC[@]}"
fi
