#!/usr/bin/env bash
# Reruns a job until it finishes, each attempt resuming from the latest checkpoint.
#
#   tpu_scripts/resume_loop.sh --name my-tpu --zone us-east5-a --type v5p-32 \
#       --version v2-alpha-tpuv5 [--spot] [--workers N] [--bucket BUCKET] \
#       [--max-attempts 50] [--sleep 60] [--logs DIR] [--project P] [--dry-run] \
#       -- jaxdistill train --config configs/X.py --workdir gs://BUCKET/runs/X
#
# Each attempt: if the queued resource is not ACTIVE (a spot slice was
# preempted, or there is none yet) it is deleted, created again (create.sh) and
# set up (setup.sh); then run.sh runs the command on all workers. The same
# command resumes from the latest checkpoint of its workdir, so the workdir
# must be where a new VM finds it (a bucket, never the VMs' own disks). The
# loop ends when worker 0's log shows jaxdistill's last line ("done: ..." or
# "nothing to do: ..."), stops at a user error ("error: ..."), and gives up
# after --max-attempts.
source "$(dirname "$0")/common.sh"
parse_common "$@"

HERE="$(dirname "$0")"
MAX=50 SLEEP=60 LOGS="" CREATE=() SETUP=() RUN=()
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --type | --version) CREATE+=("$1" "$2"); shift 2 ;;
    --spot | --reserved) CREATE+=("$1"); shift ;;
    --bucket) SETUP+=("$1" "$2"); shift 2 ;;
    --workers) RUN+=("$1" "$2"); shift 2 ;;
    --max-attempts) MAX="$2"; shift 2 ;;
    --sleep) SLEEP="$2"; shift 2 ;;
    --logs) LOGS="$2"; shift 2 ;;
    *) die "unknown flag $1 (see the top of $0)" ;;
  esac
done
((${#COMMAND[@]})) || die "give the command after --, e.g. -- jaxdistill train --config ..."
((${#CREATE[@]} >= 4)) || die "--type and --version are required (to recreate a preempted slice)"
LOGS="${LOGS:-tpu-logs/$NAME-$(date +%Y%m%d-%H%M%S)}"
COMMON=(--name "$NAME" --zone "$ZONE")
[[ -z "$PROJECT" ]] || COMMON+=(--project "$PROJECT")
((DRY_RUN == 0)) || COMMON+=(--dry-run)
mapfile -t FLAGS < <(where)
DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${FLAGS[@]}"
  "--format=value(state.state)")

if ((DRY_RUN)); then
  echo "# each attempt (at most $MAX):"
  show "${DESCRIBE[@]}"
  echo "# if that does not print ACTIVE:"
  bash "$HERE/delete.sh" "${COMMON[@]}"
  bash "$HERE/create.sh" "${COMMON[@]}" "${CREATE[@]}"
  bash "$HERE/setup.sh" "${COMMON[@]}" "${SETUP[@]+"${SETUP[@]}"}"
  echo "# then:"
  bash "$HERE/run.sh" "${COMMON[@]}" "${RUN[@]+"${RUN[@]}"}" --logs "$LOGS/attempt-1" \
    -- "${COMMAND[@]}"
  echo "# until $LOGS/attempt-N/worker-0.log has a line 'done: ...' or 'nothing to do: ...'"
  exit 0
fi

for ((attempt = 1; attempt <= MAX; attempt++)); do
  state="$("${DESCRIBE[@]}" 2>/dev/null || echo MISSING)"
  if [[ "$state" != ACTIVE ]]; then
    echo "attempt $attempt: queued resource $NAME is $state; (re)creating it" >&2
    [[ "$state" == MISSING ]] || bash "$HERE/delete.sh" "${COMMON[@]}" || true
    if ! bash "$HERE/create.sh" "${COMMON[@]}" "${CREATE[@]}"; then
      sleep "$SLEEP"
      continue
    fi
    bash "$HERE/setup.sh" "${COMMON[@]}" "${SETUP[@]+"${SETUP[@]}"}"
  fi
  log="$LOGS/attempt-$attempt/worker-0.log"
  status=0
  bash "$HERE/run.sh" "${COMMON[@]}" "${RUN[@]+"${RUN[@]}"}" --logs "$LOGS/attempt-$attempt" \
    -- "${COMMAND[@]}" || status=$?
  if grep -qE '(^|[[:space:]])(done|nothing to do): ' "$log" 2>/dev/null && ((status == 0)); then
    echo "finished after $attempt attempt(s); logs: $LOGS" >&2
    exit 0
  fi
  if grep -qE '^error: ' "$log" 2>/dev/null; then
    die "the command reported an error (not a preemption); see $log"
  fi
  echo "attempt $attempt did not finish (status $status); retrying in $SLEEP s" >&2
  sleep "$SLEEP"
done
die "gave up after $MAX attempts; logs: $LOGS"
