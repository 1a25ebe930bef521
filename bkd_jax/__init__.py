"""bkd_jax: knowledge distillation in JAX/Flax, built around Block-KD."""
