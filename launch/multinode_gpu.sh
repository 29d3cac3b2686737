#!/usr/bin/env bash
# jaxdistill on several GPU machines without a scheduler: one process per GPU.
#
# From one machine, over ssh (node 0 is the first host and the coordinator):
#   launch/multinode_gpu.sh --hosts gpu1,gpu2 [--port 29500] [--gpus-per-node 8] \
#       [--dir DIR] [--python PY] [--dry-run] -- jaxdistill train --config ... --workdir /shared/run
# Or on each machine yourself, R = 0..N-1:
#   launch/multinode_gpu.sh --nodes N --node-rank R --coordinator gpu1:29500 \
#       [--gpus-per-node 8] [--dry-run] -- jaxdistill train ...
#
# Each node runs launch/local.py --platform gpu, which starts one process per
# GPU with the coordinator, process count and id jaxdistill reads
# (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) and stops the
# node's processes when one fails. Over ssh, output lines are prefixed
# [host] and a failed node stops all nodes. DIR (default: this checkout's path)
# must hold jaxdistill on every host, and the workdir must be a path every host
# sees (a shared file system). The port must be open between the hosts.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/quote.sh"
HOSTS="" NODES="" RANK="" COORD="" PORT=29500 GPUS=8 DIR="$(dirname "$HERE")" PY=python3
DRY_RUN=0 HEARTBEAT="${JAXDISTILL_HEARTBEAT_TIMEOUT:-60}"
die() { echo "error: $*" >&2; exit 2; }
while (($#)); do
  case "$1" in
    --hosts) HOSTS="$2"; shift 2 ;;
    --nodes) NODES="$2"; shift 2 ;;
    --node-rank) RANK="$2"; shift 2 ;;
    --coordinator) COORD="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --gpus-per-node) GPUS="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) die "unknown flag $1 (see the top of $0)" ;;
  esac
done
(($#)) || die "give the command after --, e.g. -- jaxdistill train --config ..."

# The per-node command: launch/local.py with this node's place in the job.
node_cmd() {  # nodes rank coordinator
  show "$PY" "$DIR/launch/local.py" --platform gpu --processes "$GPUS" \
    --devices-per-process 1 --num-nodes "$1" --node-rank "$2" --coordinator "$3" \
    --heartbeat-timeout "$HEARTBEAT" -- "${@:4}"
}

if [[ -z "$HOSTS" ]]; then
  [[ -n "$NODES" && -n "$RANK" && -n "$COORD" ]] ||
    die "give --hosts H1,H2,... or all of --nodes, --node-rank and --coordinator"
  cmd="$(node_cmd "$NODES" "$RANK" "$COORD" "$@")"
  if ((DRY_RUN)); then echo "$cmd"; exit 0; fi
  eval "exec $cmd"
fi

IFS=, read -r -a HOST_LIST <<<"$HOSTS"
N=${#HOST_LIST[@]}
COORD="${HOST_LIST[0]}:$PORT"
PIDS=()
for ((r = 0; r < N; r++)); do
  host="${HOST_LIST[$r]}"
  # -tt: when this script stops an ssh, the remote launcher gets SIGHUP and stops its processes.
  remote="cd $(quote "$DIR") && $(node_cmd "$N" "$r" "$COORD" "$@")"
  if ((DRY_RUN)); then
    echo "$(show ssh -tt "$host" "$remote") 2>&1 | sed 's/^/[$host] /' &"
    continue
  fi
  ssh -tt "$host" "$remote" > >(sed -u "s/^/[$host] /") 2>&1 &
  PIDS+=($!)
done
if ((DRY_RUN)); then echo "wait  # on the first failure: stop the other ssh sessions"; exit 0; fi

trap 'kill "${PIDS[@]}" 2>/dev/null; exit 130' INT TERM
declare -A DONE=()
while ((${#DONE[@]} < N)); do
  for ((r = 0; r < N; r++)); do
    [[ -n "${DONE[$r]:-}" ]] && continue
    kill -0 "${PIDS[$r]}" 2>/dev/null && continue
    status=0
    wait "${PIDS[$r]}" || status=$?
    DONE[$r]=$status
    if ((status != 0)); then
      echo "error: node $r (${HOST_LIST[$r]}) failed with exit status $status; stopping the others" >&2
      kill "${PIDS[@]}" 2>/dev/null || true
      exit 1
    fi
  done
  sleep 1
done
echo "all $N nodes finished" >&2
