"""The package declaration: every package is installed, and the configs go with it."""

from __future__ import annotations

import pathlib
import tomllib

from bkd_jax import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_under_bkd_jax_is_declared():
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "bkd_jax").rglob("__init__.py")
    }
    assert found <= set(PYPROJECT["tool"]["setuptools"]["packages"])


def test_configs_ship_as_bkd_jax_configs():
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"bkd_jax.configs": "configs"}
    assert "bkd_jax.configs" in setuptools["packages"]
    assert (ROOT / "configs" / "__init__.py").is_file()


def test_demo_finds_its_config():
    assert demo._DEFAULT_CONFIG.is_file()
    assert demo._DEFAULT_CONFIG.parent.resolve() == (ROOT / "configs").resolve()


def test_requirements_install_the_dev_extra():
    lines = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines == ["-e .[dev]"]
    assert {"pytest", "ruff", "tensorboard", "nbclient", "ipykernel"} <= {
        req.split(">")[0].split("=")[0]
        for req in PYPROJECT["project"]["optional-dependencies"]["dev"]
    }
