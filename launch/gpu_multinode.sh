#!/usr/bin/env bash
# Runs bkd_jax on several GPU nodes: one process per node, each driving all its GPUs.
#
# Not yet run on a GPU cluster. The multi-process code path it starts (--multihost) is
# tested with two CPU processes on one machine (tests/test_multihost.py; the plain mode
# below starts the same).
#
# --multihost makes every process call jax.distributed.initialize() (bkd_jax/main.py),
# which finds the others by itself under SLURM; each process reads its own shard of the
# data and orbax writes one checkpoint from all of them. So the workdir, the data_dir and
# the teacher checkpoint must be on storage every node sees (NFS, Lustre, gs://...).
#
# SLURM (JAX reads SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and
# SLURM_LOCALID; the coordinator is the first node, on a port derived from the job id,
# or JAX_COORDINATOR_PORT if set):
#   CONFIG=configs/imagenet.py:pair=r34_r18 WORKDIR=/shared/runs/in1k_bkd_r34_r18 \
#     sbatch --nodes=4 launch/gpu_multinode.sh --config.dataset.data_dir=/shared/tfds \
#       --config.teacher_checkpoint=/shared/teachers/imagenet_resnet34
#
# Plain (no scheduler): start the same command on every node, with
#   COORDINATOR  host:port of node 0, reachable from every node (any free port)
#   NUM_NODES    number of nodes
#   NODE_RANK    0 .. NUM_NODES-1, 0 on the coordinator's node
#   e.g. COORDINATOR=10.0.0.1:8476 NUM_NODES=2 NODE_RANK=1 CONFIG=... WORKDIR=... \
#          launch/gpu_multinode.sh --config.dataset.data_dir=/shared/tfds
#
# Arguments are passed on to `python -m bkd_jax.main`. PYTHON overrides the interpreter
# (default python3; the environment needs bkd_jax installed, `pip install -e . "jax[cuda12]"`). Rerunning
# the same command resumes from the last checkpoint; SIGTERM, which SLURM sends 120 s
# before the time limit below, makes every process save at the same step and exit.
#
#SBATCH --job-name=bkd_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail

: "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR}"
cmd=("${PYTHON:-python3}" -m bkd_jax.main --multihost "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@")

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  exec srun --ntasks-per-node=1 "${cmd[@]}"
fi

: "${COORDINATOR:?set COORDINATOR (host:port of node 0), or submit with sbatch}"
: "${NUM_NODES:?set NUM_NODES}" "${NODE_RANK:?set NODE_RANK}"
# Read by bkd_jax.main.initialize_distributed (and the address by JAX itself).
export JAX_COORDINATOR_ADDRESS="$COORDINATOR" JAX_NUM_PROCESSES="$NUM_NODES"
export JAX_PROCESS_ID="$NODE_RANK"
exec "${cmd[@]}"
