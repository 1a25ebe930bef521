"""`python -m bkd_jax.bench`: the step benchmark (`bkd_jax.bench`), its flags in --help."""

from absl import app, flags

from bkd_jax import bench

flags.adopt_module_key_flags(bench)
app.run(bench.main)
