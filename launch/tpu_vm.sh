#!/usr/bin/env bash
# Runs bkd_jax on every host of a Cloud TPU VM slice (v4-32, v5e-64, ...).
#
# Not yet run on a TPU slice. The remote command it builds was checked with a stand-in
# gcloud, and the multi-process path it starts (--multihost) is tested with two CPU
# processes on one machine (tests/test_multihost.py).
#
# Every host runs the same command; with --multihost, jax.distributed.initialize() finds
# the other hosts from the TPU metadata, each host reads its own shard of the data, and
# orbax writes one checkpoint from all of them. So the workdir (and the TFDS data_dir)
# must be readable and writable by every host: use a gs:// bucket.
#
# Usage (environment variables, or the same names as KEY=value arguments):
#   TPU_NAME=my-slice ZONE=us-central2-b \
#   CONFIG=configs/imagenet.py:pair=r34_r18 WORKDIR=gs://BUCKET/runs/in1k_bkd_r34_r18 \
#     launch/tpu_vm.sh --config.dataset.data_dir=gs://BUCKET/tfds \
#                      --config.teacher_checkpoint=gs://BUCKET/teachers/imagenet_resnet34
# Arguments starting with -- are passed on to `python -m bkd_jax.main`.
#
# Optional: PROJECT (gcloud project), REPO_DIR (checkout on the hosts, default ~/bkd_jax),
# PYTHON (default python3). Rerunning the same command resumes from the last checkpoint,
# e.g. after a spot/preemptible slice was preempted (SIGTERM makes every host save first).
#
# One-time setup of every host (clone the project and install it with jax[tpu]):
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command=\
#     'git clone <this repo> ~/bkd_jax && pip install -e ~/bkd_jax "jax[tpu]"'
set -euo pipefail

main_args=()
for arg in "$@"; do
  case "$arg" in
    --*) main_args+=("$arg") ;;
    *=*) export "$arg" ;;
    *) echo "unexpected argument: $arg (want KEY=value or --flag)" >&2; exit 2 ;;
  esac
done

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR}"
REPO_DIR="${REPO_DIR:-~/bkd_jax}"
PYTHON="${PYTHON:-python3}"

# printf %q quotes every word for the remote shell; REPO_DIR stays unquoted so ~ expands.
remote="cd ${REPO_DIR} && $(printf '%q ' "$PYTHON" -m bkd_jax.main --multihost \
  "--config=${CONFIG}" "--workdir=${WORKDIR}" "${main_args[@]}")"

exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" \
  ${PROJECT:+--project="$PROJECT"} --worker=all --command="$remote"
