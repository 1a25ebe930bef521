#!/usr/bin/env bash
# Runs a grid of runs (teachers first, then every pair x method x seed) on one host with
# several GPUs: one `python -m bkd_jax.sweep` per GPU, each on its own share of the pairs,
# all writing under the same root (the sweep skips finished runs and resumes interrupted
# ones, so rerunning this script continues the grid). Then prints the report of the root.
#
# Usage (environment variables):
#   CONFIG=configs/cifar100.py ROOT=runs/c100 METHODS=kd,dkd,blockkd SEEDS=0,1,2 \
#   PAIRS="resnet32x4:resnet8x4 wrn_40_2:wrn_16_2 vgg13:vgg8" launch/sweep.sh \
#       --extra=--config.dataset.data_dir=$TFDS_DATA_DIR
# Teachers are dealt to the GPUs round-robin, each with all its pairs, so that no teacher
# trains twice (GPUS, default: all that nvidia-smi lists).
# Arguments are passed on to every `python -m bkd_jax.sweep`.
set -euo pipefail

: "${CONFIG:?set CONFIG}" "${ROOT:?set ROOT}" "${METHODS:?set METHODS}" "${PAIRS:?set PAIRS}"
SEEDS=${SEEDS:-0,1,2}
PYTHON=${PYTHON:-python3}
GPUS=${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)}
IFS=, read -r -a gpus <<<"$GPUS"
read -r -a pairs <<<"$PAIRS"

declare -A share gpu_of
next=0
for pair in "${pairs[@]}"; do
  teacher=${pair%%:*}
  if [[ -z "${gpu_of[$teacher]:-}" ]]; then
    gpu_of[$teacher]=${gpus[$((next % ${#gpus[@]}))]}
    next=$((next + 1))
  fi
  gpu=${gpu_of[$teacher]}
  share[$gpu]=${share[$gpu]:+${share[$gpu]},}$pair
done
pids=()
for gpu in "${!share[@]}"; do
  CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" -m bkd_jax.sweep --config="$CONFIG" --root="$ROOT" \
    --pairs="${share[$gpu]}" --methods="$METHODS" --seeds="$SEEDS" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
"$PYTHON" -m bkd_jax.report "$ROOT"
exit $status
