#!/usr/bin/env bash
# The accelerator study (bkd_jax/accelerator_study.py) on a GPU host without TensorFlow.
#
# The host needs jax with CUDA, flax, optax, orbax-checkpoint, absl-py, numpy and pillow
# (a typical rented GPU machine has them); bkd_jax and ml_collections travel as wheels,
# built where pip reaches the package index (from the root of a clone):
#
#   python3 -m pip wheel --no-deps -w wheels . ml_collections
#
# Then, on the GPU host, beside the wheels/ folder and the CIFAR-10 JPEG tarball (or a
# folder laid out as <data>/{train,test}/<class>/<image>), this script is the one line:
#
#   python3 -m pip install -q --no-index --no-deps wheels/*.whl && \
#     python3 -m bkd_jax.accelerator_study --data=cifar10-jpeg.tar.gz --workdir=runs/study --bench
#
# The teacher and five students take about 8 minutes of one H200 by design (the schedule is
# in configs/cifar10_study.py); --bench spends what is left of --budget_minutes (default 8)
# on bkd_jax.bench.gpu's step table. The table lands in runs/study/study.md. Rerunning
# resumes. Arguments: DATA (default cifar10-jpeg.tar.gz), WORKDIR (default runs/study),
# WHEELS (default wheels); further arguments go to the study.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps "${WHEELS:-wheels}"/*.whl
exec python3 -m bkd_jax.accelerator_study --data="${DATA:-cifar10-jpeg.tar.gz}" \
  --workdir="${WORKDIR:-runs/study}" --bench "$@"
