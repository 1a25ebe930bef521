"""Config files of the recipes, loaded by path (`--config=configs/cifar100.py`); installed,
the folder is the package `bkd_jax.configs`."""
