# shellcheck shell=bash
# Sourced by the tpu_scripts: the flags they share and `run`, which prints a
# command (--dry-run: print only) before running it. Printed commands are
# exact and can be pasted into a shell.
#
# Shared flags (or environment): --name NAME (TPU_NAME), --zone ZONE (TPU_ZONE),
# --project PROJECT (TPU_PROJECT, optional), --dry-run.

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/quote.sh"

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
DRY_RUN=0
REST=()     # arguments the calling script parses itself
COMMAND=()  # everything after --

parse_common() {
  while (($#)); do
    case "$1" in
      --name) NAME="$2"; shift 2 ;;
      --name=*) NAME="${1#*=}"; shift ;;
      --zone) ZONE="$2"; shift 2 ;;
      --zone=*) ZONE="${1#*=}"; shift ;;
      --project) PROJECT="$2"; shift 2 ;;
      --project=*) PROJECT="${1#*=}"; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; COMMAND=("$@"); break ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  [[ -n "$NAME" ]] || die "--name NAME (or TPU_NAME) is required"
  [[ -n "$ZONE" ]] || die "--zone ZONE (or TPU_ZONE) is required"
}

die() {
  echo "error: $*" >&2
  exit 2
}

# Prints the command; runs it unless --dry-run.
run() {
  if ((DRY_RUN)); then
    show "$@"
  else
    echo "+ $(show "$@")" >&2
    "$@"
  fi
}

# Flags every gcloud TPU command gets.
where() {
  printf '%s\n' "--zone=$ZONE"
  if [[ -n "$PROJECT" ]]; then printf '%s\n' "--project=$PROJECT"; fi
}

# SSH_ARGV=(gcloud compute tpus tpu-vm ssh NAME --zone=.. [--project=..] --worker=W --command=CMD)
tpu_ssh_argv() {
  local worker="$1" cmd="$2"
  local -a flags
  mapfile -t flags < <(where)
  SSH_ARGV=(gcloud compute tpus tpu-vm ssh "$NAME" "${flags[@]}" "--worker=$worker" "--command=$cmd")
}

tpu_ssh() {
  tpu_ssh_argv "$1" "$2"
  run "${SSH_ARGV[@]}"
}

# Kills whatever holds the TPU chips (a crashed or stale run keeps them busy and
# the next one fails with "TPU in use"), and libtpu's lock file.
KILL_STALE='sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs -r sudo kill -9; sudo rm -f /tmp/libtpu_lockfile; true'

# Where setup.sh installs jaxdistill on every worker.
REMOTE_DIR='~/jaxdistill'
