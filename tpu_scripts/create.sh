#!/usr/bin/env bash
# Creates a TPU VM slice through a queued resource and waits until it is ACTIVE.
#
#   tpu_scripts/create.sh --name my-tpu --zone us-east5-a --type v5p-32 \
#       --version v2-alpha-tpuv5 [--config FILE [--override KEY=VALUE ...]] \
#       [--spot | --reserved] [--project P] [--no-wait] [--dry-run]
#
# The queued resource and its node share NAME. --spot: preemptible capacity
# (pair it with resume_loop.sh); --reserved: your reservation.
# --config: preflight first, on this machine (`jaxdistill compile --config FILE --topology
# TYPE`, needs `pip install "jaxdistill[tpu]"`): the step is compiled for the slice and
# nothing is created when it does not fit its chips' memory (exit 1) or the config is bad
# (exit 2). --override KEY=VALUE passes --config.KEY=VALUE to it (repeatable). $JAXDISTILL
# names the command (default: jaxdistill).
source "$(dirname "$0")/common.sh"
parse_common "$@"

TYPE="" VERSION="" CAPACITY=() WAIT=1 CONFIG="" OVERRIDES=()
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --spot) CAPACITY=(--spot); shift ;;
    --reserved) CAPACITY=(--reserved); shift ;;
    --no-wait) WAIT=0; shift ;;
    --config) CONFIG="$2"; shift 2 ;;
    --override) OVERRIDES+=("--config.$2"); shift 2 ;;
    *) die "unknown flag $1 (see the top of $0)" ;;
  esac
done
[[ -n "$TYPE" ]] || die "--type ACCELERATOR_TYPE is required, e.g. v5p-32 or v5litepod-16"
[[ -n "$VERSION" ]] || die "--version RUNTIME_VERSION is required, e.g. v2-alpha-tpuv5"
mapfile -t FLAGS < <(where)

if [[ -n "$CONFIG" ]]; then
  PREFLIGHT=("${JAXDISTILL:-jaxdistill}" compile --config "$CONFIG" --topology "$TYPE"
    "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
  echo "+ $(show "${PREFLIGHT[@]}")" >&2
  status=0
  "${PREFLIGHT[@]}" || status=$?
  if ((status == 1)); then
    echo "error: $CONFIG does not fit a $TYPE (see the report above); not creating $NAME" >&2
    exit 1
  fi
  ((status == 0)) || exit "$status"
fi

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
