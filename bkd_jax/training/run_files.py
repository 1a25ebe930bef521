"""What a training run leaves in its workdir, by name, and the metric its summary ranks by.

The loop writes these; the report, the sweep and the demo read them. They live here, apart
from the loop, so that reading a finished run never imports the trainer and TensorFlow
with it.
"""

RESULTS_FILE = "results.json"  # the run's summary: best and last evaluation, steps
BEST_METRIC = "eval/student/top1"  # what "best" means in that summary
# Config keys that may change between runs of one experiment without invalidating its
# workdir (the guard in `config_guard` ignores them).
COSMETIC_KEYS = ("log_every_steps", "tensorboard", "eval_only", "profile_steps")
