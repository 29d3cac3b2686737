#!/usr/bin/env bash
# Runs one command on every worker of the slice at once, with one log per worker.
#
#   tpu_scripts/run.sh --name my-tpu --zone us-east5-a [--workers N] [--logs DIR] [--dry-run] \
#       -- jaxdistill train --config configs/X.py --workdir gs://BUCKET/runs/X
#
# 1. kills stale processes holding the TPU on all workers (a crashed run keeps
#    /dev/accel* or /dev/vfio/* busy and the next one fails);
# 2. starts the command on each worker, in ~/jaxdistill with its .venv active,
#    one ssh per worker, the output going to DIR/worker-W.log on this machine
#    (default DIR: tpu-logs/NAME-DATE);
# 3. waits; if a worker fails, stops the command on all workers (the others
#    would only abort after jax.distributed's heartbeat timeout) and exits 1
#    naming it. Exits 0 when every worker's command exited 0.
# jaxdistill finds its peers itself on Cloud TPU (jax.distributed, no settings).
# N (hosts in the slice) is looked up with gcloud unless --workers gives it.
source "$(dirname "$0")/common.sh"
parse_common "$@"

WORKERS="" LOGS=""
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --workers) WORKERS="$2"; shift 2 ;;
    --logs) LOGS="$2"; shift 2 ;;
    *) die "unknown flag $1 (see the top of $0)" ;;
  esac
done
((${#COMMAND[@]})) || die "give the command after --, e.g. -- jaxdistill train --config ..."
LOGS="${LOGS:-tpu-logs/$NAME-$(date +%Y%m%d-%H%M%S)}"
mapfile -t FLAGS < <(where)
if [[ -z "$WORKERS" ]]; then
  ((DRY_RUN == 0)) || die "--dry-run needs --workers N (the number of hosts in the slice)"
  WORKERS="$(gcloud compute tpus tpu-vm describe "$NAME" "${FLAGS[@]}" \
    '--format=value(networkEndpoints.len())')"
fi
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive number, got '$WORKERS'"
REMOTE="cd $REMOTE_DIR && source .venv/bin/activate && $(show "${COMMAND[@]}")"

tpu_ssh all "$KILL_STALE"
if ((DRY_RUN)); then
  echo "mkdir -p $(quote "$LOGS")"
  for ((w = 0; w < WORKERS; w++)); do
    tpu_ssh_argv "$w" "$REMOTE"
    echo "$(show "${SSH_ARGV[@]}") > $(quote "$LOGS/worker-$w.log") 2>&1 &"
  done
  echo "wait  # on the first failure: the kill command above, on all workers"
  exit 0
fi

mkdir -p "$LOGS"
PIDS=()
stop_all() {
  echo "stopping the command on all workers" >&2
  tpu_ssh all "$KILL_STALE" >/dev/null 2>&1 || true
  kill "${PIDS[@]}" 2>/dev/null || true
}
trap 'stop_all; exit 130' INT TERM
for ((w = 0; w < WORKERS; w++)); do
  tpu_ssh_argv "$w" "$REMOTE"
  "${SSH_ARGV[@]}" >"$LOGS/worker-$w.log" 2>&1 &
  PIDS+=($!)
done
echo "started on $WORKERS workers; logs: $LOGS/worker-*.log" >&2

declare -A DONE=()
while ((${#DONE[@]} < WORKERS)); do
  for ((w = 0; w < WORKERS; w++)); do
    [[ -n "${DONE[$w]:-}" ]] && continue
    kill -0 "${PIDS[$w]}" 2>/dev/null && continue
    status=0
    wait "${PIDS[$w]}" || status=$?
    DONE[$w]=$status
    if ((status != 0)); then
      echo "error: worker $w failed (exit status $status); see $LOGS/worker-$w.log" >&2
      tail -n 20 "$LOGS/worker-$w.log" >&2 || true
      stop_all
      exit 1
    fi
  done
  sleep 2
done
echo "all $WORKERS workers finished; logs: $LOGS" >&2
