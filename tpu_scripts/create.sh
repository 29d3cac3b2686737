#!/usr/bin/env bash
# Creates a TPU VM slice through a queued resource and waits until it is ACTIVE.
#
#   tpu_scripts/create.sh --name my-tpu --zone us-east5-a --type v5p-32 \
#       --version v2-alpha-tpuv5 [--spot | --reserved] [--project P] [--no-wait] [--dry-run]
#
# The queued resource and its node share NAME. --spot: preemptible capacity
# (pair it with resume_loop.sh); --reserved: your reservation.
source "$(dirname "$0")/common.sh"
parse_common "$@"

TYPE="" VERSION="" CAPACITY=() WAIT=1
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --spot) CAPACITY=(--spot); shift ;;
    --reserved) CAPACITY=(--reserved); shift ;;
    --no-wait) WAIT=0; shift ;;
    *) die "unknown flag $1 (see the top of $0)" ;;
  esac
done
[[ -n "$TYPE" ]] || die "--type ACCELERATOR_TYPE is required, e.g. v5p-32 or v5litepod-16"
[[ -n "$VERSION" ]] || die "--version RUNTIME_VERSION is required, e.g. v2-alpha-tpuv5"
mapfile -t FLAGS < <(where)

run gcloud compute tpus queued-resources create "$NAME" "${FLAGS[@]}" "--node-id=$NAME" \
  "--accelerator-type=$TYPE" "--runtime-version=$VERSION" "${CAPACITY[@]+"${CAPACITY[@]}"}"

((WAIT)) || exit 0
DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${FLAGS[@]}"
  "--format=value(state.state)")
if ((DRY_RUN)); then
  echo "# then, every 30 s until it prints ACTIVE:"
  show "${DESCRIBE[@]}"
  exit 0
fi
while true; do
  state="$("${DESCRIBE[@]}")"
  echo "queued resource $NAME: $state" >&2
  case "$state" in
    ACTIVE) exit 0 ;;
    FAILED | SUSPENDED) die "queued resource $NAME is $state; delete it (delete.sh) and retry" ;;
  esac
  sleep 30
done
