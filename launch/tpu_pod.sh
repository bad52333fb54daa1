#!/usr/bin/env bash
# Runs one training stage on every worker of a Cloud TPU VM pod slice.
#
#   TPU_NAME=fe-v5p-64 ZONE=us-east5-a WORKDIR=gs://my-bucket/runs/stage1 \
#   CONFIG=configs/freezeempath_7b.py STAGE=1 \
#       launch/tpu_pod.sh [--install] [--config.x=y ...]
#
# Environment:
#   TPU_NAME, ZONE   the slice (required); PROJECT: gcloud project (optional)
#   WORKDIR          run directory (required): gs://... or a path every worker shares
#   REPO_DIR         checkout of this repository on every worker, relative to the remote home
#                    or absolute (default: freezeempath-jax)
#   CONFIG, STAGE    config file inside REPO_DIR and stage (default: configs/freezeempath_7b.py, 1)
#   PYTHON           interpreter on the workers (default: python3)
#   JAX_COMPILATION_CACHE_DIR  forwarded when set (e.g. gs://my-bucket/jax_cache): restarts and
#                    later stages skip the multi-minute compile of the 7B step
#   DRY_RUN=1        print the gcloud command instead of running it
# Arguments: --install (first) runs `pip install -e .[tpu]` on every worker before training;
# everything else is passed to launch/train.py unchanged (--config.* overrides).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${ZONE:?set ZONE to the slice zone}"
# Every host writes its shards of each checkpoint and reads them back on resume, so the
# workdir must be one place all of them see: a bucket, or a shared filesystem.
: "${WORKDIR:?set WORKDIR to gs://... or a path shared by all workers}"
REPO_DIR=${REPO_DIR:-freezeempath-jax}
CONFIG=${CONFIG:-configs/freezeempath_7b.py}
STAGE=${STAGE:-1}
PYTHON=${PYTHON:-python3}

install=0
if [[ "${1:-}" == "--install" ]]; then
  install=1
  shift
fi

# Quote every piece once here: gcloud hands --command to a remote shell, which splits it
# again, so arguments with spaces or quotes (e.g. --config.init.previous="('/runs/s1',)")
# must arrive escaped.
q() { printf '%q' "$1"; }
train_cmd="$(q "$PYTHON") launch/train.py --config $(q "$CONFIG") --config.stage=$(q "$STAGE")"
train_cmd+=" --workdir $(q "$WORKDIR")"
for arg in "$@"; do
  train_cmd+=" $(q "$arg")"
done

remote="set -euo pipefail; cd $(q "$REPO_DIR")"
if ((install)); then
  # Each worker has its own Python environment; jax[tpu] brings the libtpu that matches jax.
  remote+="; $(q "$PYTHON") -m pip install -q -e '.[tpu]'"
fi
if [[ -n "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
  remote+="; export JAX_COMPILATION_CACHE_DIR=$(q "$JAX_COMPILATION_CACHE_DIR")"
fi
# No coordinator settings: on a multi-host slice jax.distributed.initialize (called by the
# trainer, train.step.maybe_initialize_distributed) reads the hosts from the TPU metadata.
remote+="; exec $train_cmd"

# --worker=all starts the same program on every host at once: a multi-host TPU program only
# runs when all hosts join it, and each host feeds its own slice of every global batch.
gcloud_cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all
            --command "$remote")
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_cmd+=(--project "$PROJECT")
fi

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${gcloud_cmd[@]}"
  printf '\n'
  exit 0
fi
# The remote programs end when this ssh session ends (SIGHUP): run this script from a machine
# that stays up (or inside tmux/screen) for the length of the stage.
exec "${gcloud_cmd[@]}"
