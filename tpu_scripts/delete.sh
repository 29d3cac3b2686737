#!/usr/bin/env bash
# Deletes the queued resource and its TPU VMs (--force also deletes the node).
#
#   tpu_scripts/delete.sh --name my-tpu --zone us-east5-a [--project P] [--dry-run]
#
# Checkpoints and caches on gs:// (or another shared store) survive; whatever
# was only on the workers' disks is gone.
source "$(dirname "$0")/common.sh"
parse_common "$@"
((${#REST[@]} == 0)) || die "unknown flag ${REST[0]} (see the top of $0)"
mapfile -t FLAGS < <(where)
run gcloud compute tpus queued-resources delete "$NAME" "${FLAGS[@]}" --force --quiet
