#!/usr/bin/env bash
#SBATCH --job-name=freezeempath
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# Multi-node GPU training, one process per node driving all of that node's GPUs.
#
#   CONFIG=configs/freezeempath_7b.py STAGE=1 WORKDIR=/shared/runs/stage1 \
#       sbatch launch/gpu_slurm.sh --config.init.llm=/shared/ckpt/Qwen2.5-7B-Instruct ...
#   sbatch --nodes=8 launch/gpu_slurm.sh ...        # more nodes: command-line options win
#
# Environment: CONFIG, STAGE (default configs/freezeempath_7b.py, 1); WORKDIR (required, on a
# filesystem every node sees: all processes write and restore the same checkpoints);
# REPO_DIR (default: the submission directory); PYTHON (default: python);
# JAX_COORDINATOR_PORT (default: derived from the job id, so jobs sharing a node differ);
# DRY_RUN=1 prints the srun command instead of running it.
# Arguments are passed to launch/train.py unchanged.
set -euo pipefail

: "${WORKDIR:?set WORKDIR to a directory shared by all nodes}"
CONFIG=${CONFIG:-configs/freezeempath_7b.py}
STAGE=${STAGE:-1}
PYTHON=${PYTHON:-python}
# sbatch runs a copy of this script from its spool directory: find the repository explicitly.
cd "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}"

# What train.step.maybe_initialize_distributed reads. JAX_COORDINATOR_ADDRESS takes its first
# branch, which passes these to jax.distributed.initialize explicitly (jax's own SLURM
# detection would find the same values, with a port it picks from the job id).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
export JAX_COORDINATOR_ADDRESS="${first_node}:${JAX_COORDINATOR_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export JAX_NUM_PROCESSES="${SLURM_NTASKS:-$SLURM_NNODES}"
# Under SLURM, jax assumes one process per GPU and, unless told otherwise, restricts each
# process to the GPU numbered SLURM_LOCALID (so one task per node would use GPU 0 only).
# Listing every GPU of the node keeps all of them in this node's process.
gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}"
gpus="${gpus##*:}"  # "h100:8" -> "8"
export JAX_LOCAL_DEVICE_IDS
JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))

# JAX_PROCESS_ID differs per task, so it is set inside each task from its own SLURM_PROCID
# (the batch script itself runs once, on the first node). "$@" reaches train.py as given.
cmd=(srun --kill-on-bad-exit=1 bash -c
     'export JAX_PROCESS_ID="$SLURM_PROCID"; exec "$0" launch/train.py "$@"'
     "$PYTHON" --config "$CONFIG" --config.stage="$STAGE" --workdir "$WORKDIR" "$@")

echo "coordinator $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES processes, GPUs $JAX_LOCAL_DEVICE_IDS each"
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
