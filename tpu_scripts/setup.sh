#!/usr/bin/env bash
# Installs jaxdistill (this checkout) with jax[tpu] on every worker of the slice.
#
#   tpu_scripts/setup.sh --name my-tpu --zone us-east5-a [--bucket BUCKET] [--project P] [--dry-run]
#
# Copies this source tree (without .venv, .git, workdirs) to ~/jaxdistill on all
# workers and installs it into ~/jaxdistill/.venv. Rerun it after changing code.
# --bucket BUCKET also mounts gs://BUCKET at /mnt/gcs/BUCKET on every worker
# (gcsfuse), for data files read by path; workdirs can be gs:// URLs (gcsfs is installed).
source "$(dirname "$0")/common.sh"
parse_common "$@"

BUCKET=""
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --bucket) BUCKET="${2#gs://}"; shift 2 ;;
    *) die "unknown flag $1 (see the top of $0)" ;;
  esac
done
SRC="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/jaxdistill-src.tgz"
mapfile -t FLAGS < <(where)

run tar czf "$TARBALL" --exclude=./.venv --exclude=./.git --exclude=./workdirs \
  --exclude=__pycache__ -C "$SRC" .
run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:jaxdistill-src.tgz" "${FLAGS[@]}" --worker=all
tpu_ssh all "set -e; mkdir -p $REMOTE_DIR; tar xzf ~/jaxdistill-src.tgz -C $REMOTE_DIR; \
cd $REMOTE_DIR; [ -d .venv ] || python3 -m venv .venv; .venv/bin/pip install -q -U pip; \
.venv/bin/pip install -q -e . 'jax[tpu]>=0.6,<0.11' 'gcsfs>=2024.2'; \
.venv/bin/python -c 'import jax, jaxdistill; print(\"jax\", jax.__version__)'"

if [[ -n "$BUCKET" ]]; then
  MOUNT="/mnt/gcs/$BUCKET"
  tpu_ssh all "set -e; if ! command -v gcsfuse >/dev/null; then \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \
gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
sudo apt-get update -q; sudo apt-get install -y -q gcsfuse; fi; \
sudo mkdir -p $MOUNT; sudo chown \$USER $MOUNT; \
mountpoint -q $MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=200000 $BUCKET $MOUNT"
fi
