"""configs/glue.py: its values, its refusals, and that every recipe builds and traces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from test_recipes import CONFIGS

from bkd_jax import console, distillers, steps, text_train
from bkd_jax.models import bert

glue = console.load_config_file(CONFIGS / "glue.py")
METHODS = ("ce", "kd", "dkd", "dist", "wttm", "blockkd", "blockkd_lite")


def test_the_papers_schedule_and_berts_optimiser():
    config = glue.get_config("task=mrpc,method=blockkd")
    assert (config.num_epochs, config.global_batch_size) == (10, 32)
    o = config.optim
    assert (o.learning_rate, o.warmup_fraction, o.weight_decay) == (2e-5, 0.1, 0.01)
    assert config.dataset.name == "glue/mrpc" and config.dataset.max_length == 128
    assert config.groups == 3 and config.distill.blockkd.warmup_epochs == 1
    assert glue.get_config("student=bert_4x312").groups == 4
    assert glue.get_config("method=ce,student=bert_base").groups == 4
    for method in ("ce", "kd", "blockkd", "blockkd_lite"):
        assert glue.get_config(f"task=stsb,method={method}").dataset.name == "glue/stsb"
    for method in ("dkd", "dist", "wttm"):
        with pytest.raises(ValueError, match=rf"task=stsb \(a regression\) with method='{method}'"):
            glue.get_config(f"task=stsb,method={method}")
    with pytest.raises(ValueError, match="task='sst5': one of sst2, mrpc, cola, stsb"):
        glue.get_config("task=sst5")
    with pytest.raises(ValueError, match="student='bert_huge'"):
        glue.get_config("student=bert_huge")


def test_the_schedule_warms_up_linearly_then_decays_to_zero():
    config = glue.get_config("")
    params = {"w": jnp.ones((2, 2))}
    optimizer = text_train.make_optimizer(config.optim, total_steps=100)
    state = optimizer.init(params)
    grads = {"w": jnp.ones((2, 2))}
    sizes = []
    for _ in range(100):
        updates, state = optimizer.update(grads, state, params)
        sizes.append(float(jnp.abs(updates["w"][0, 0])))
    assert (
        sizes[0] == 0 and sizes[5] < sizes[9] and max(sizes) == pytest.approx(sizes[10], rel=0.05)
    )
    assert sizes[99] < 0.02 * max(sizes)


@pytest.mark.parametrize("method", METHODS)
def test_every_glue_recipe_builds_and_blockkd_traces_its_step(method):
    config = glue.get_config(f"method={method}")
    student = bert.get_model(config.student, 2, groups=config.groups)
    teacher = bert.get_model(config.teacher, 2, groups=config.groups)
    shape = (3, config.dataset.max_length)
    distiller = distillers.make_distiller(config.distill, student, teacher, shape)
    if method != "blockkd":
        return
    assert distiller.modules.connectors.kinds == ("identity",) * 3  # both 768 wide
    x = jnp.zeros((2, *shape), jnp.int32)
    batch = {"image": x, "label": jnp.array([0, 1], jnp.int32)}
    optimizer = text_train.make_optimizer(config.optim, total_steps=10)
    state = jax.eval_shape(
        lambda key: steps.create_train_state(distiller, optimizer, key, x), jax.random.key(0)
    )
    teacher_vars = jax.eval_shape(teacher.init, jax.random.key(1), x)
    step = steps.make_train_step(distiller, optimizer, lambda s: jnp.float32(1.0))
    _, metrics = jax.eval_shape(step, state, teacher_vars, batch)
    assert metrics["loss"].shape == ()


def test_the_report_shows_glue_metrics_of_text_runs(tmp_path):
    import json

    from bkd_jax import report

    config = glue.get_config("task=mrpc,method=kd").to_dict()
    metrics = {"eval/student/top1": 0.8, "eval/student/f1": 0.85, "eval/teacher/top1": 0.9}
    results = {"last": metrics, "best": metrics, "steps": 10, "total_steps": 10}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "results.json").write_text(json.dumps(results))
    runs, _ = report.find_runs([tmp_path])
    table = report.markdown_table(report.summarize(runs))
    header, _, row = table.splitlines()
    assert "f1 last" in header and "top-5" not in header
    assert "| 80.00 | 80.00 |" in row and "| 85.00 |" in row
