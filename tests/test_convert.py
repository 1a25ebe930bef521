"""PyTorch checkpoints -> bkd_jax: the `.pth` reader, the generic converter, and parity.

Parity runs the same weights through a PyTorch re-implementation of the original
(`torch_reference`) and through the converted Flax model, every zoo model, comparing the
logits and every feature tap (`BlockNet.taps`); tests needing torch skip without it, and
those reading the layout file skip without ../shared.
"""

from __future__ import annotations

import json
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MAP_MODELS, SHARED_DATA, images, input_size

from bkd_jax import blocknet, convert, models, pth

LAYOUT_FILE = "pytorch_state_dict_layouts.json"
# Taps as mdistiller's models return them: `feats` is [stem, *blocks] and `preact_feats`
# [stem, *preact], except where noted.
STEM_OUTSIDE_FEATS = {"imagenet_mobilenetv1"}  # feats hold only the blocks; stem = model.0
NO_PREACT_FEATS = {"mobilenetv2"}  # no preact_feats; a linear bottleneck's preact is its output


def _zoo_names() -> list[str]:
    """Model names of the layout file; parametrizes before fixtures can skip."""
    path = SHARED_DATA / LAYOUT_FILE
    return list(json.loads(path.read_text())) if path.is_file() else ["(layout file absent)"]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def layouts(shared_data):
    return json.loads((shared_data / LAYOUT_FILE).read_text())


def _registered(name: str) -> None:
    if name not in models.available():
        pytest.skip(f"{name} is not registered in bkd_jax.models yet")


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    leaves = ("weight", "bias", "running_mean", "running_var")
    return [(f"{prefix}.{leaf}", (c,)) for leaf in leaves] + [(f"{prefix}.num_batches_tracked", ())]


def resnet8_layout(num_classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """mdistiller's resnet8 state-dict keys and shapes, written out independently."""
    layout = [("conv1.weight", (16, 3, 3, 3)), *_bn("bn1", 16)]
    for k, (cin, cout) in enumerate(((16, 16), (16, 32), (32, 64)), start=1):
        unit = f"layer{k}.0"
        layout += [(f"{unit}.conv1.weight", (cout, cin, 3, 3)), *_bn(f"{unit}.bn1", cout)]
        layout += [(f"{unit}.conv2.weight", (cout, cout, 3, 3)), *_bn(f"{unit}.bn2", cout)]
        if cin != cout:
            layout += [(f"{unit}.downsample.0.weight", (cout, cin, 1, 1))]
            layout += _bn(f"{unit}.downsample.1", cout)
    return [*layout, ("fc.weight", (num_classes, 64)), ("fc.bias", (num_classes,))]


def random_state_dict(layout, seed: int = 0) -> dict[str, np.ndarray]:
    """Distinct random values per key; variances positive, step counters integer."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            sd[key] = np.array(7, np.int64)
        elif key.endswith("running_var"):
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return sd


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
    """PyTorch conv (O, I, H, W) -> (H, W, I, O); linear (out, in) -> (in, out)."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def _fingerprints(arrays) -> list[tuple[tuple[int, ...], bytes]]:
    return sorted((a.shape, np.asarray(a, np.float32).tobytes()) for a in arrays)


# (a) every zoo model in the layout file converts, value for value.


def test_hand_written_layout_matches_layout_file(layouts):
    assert [(k, tuple(s)) for k, s in layouts["resnet8"]] == resnet8_layout(100)


@pytest.mark.parametrize("name", _zoo_names())
def test_every_zoo_layout_converts_exactly(name, layouts):
    _registered(name)
    sd = random_state_dict(layouts[name])
    variables = convert.from_pytorch_state_dict(name, sd)
    # Every weight lands somewhere, transposed, and nothing else is in the variables.
    expected = [_to_flax_layout(v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]
    assert _fingerprints(jax.tree.leaves(variables)) == _fingerprints(expected)
    num_classes = sd[[k for k, s in layouts[name] if len(s) == 2][-1]].shape[0]
    net = models.get_model(name, num_classes)
    # The model accepts the tree as is (traced only: parity below runs real numbers).
    logits, _ = jax.eval_shape(net.apply, variables, images(1, input_size(name)))
    assert logits.shape == (1, num_classes)


def test_resnet8_variables_sit_where_the_naming_rule_puts_them():
    sd = random_state_dict(resnet8_layout(10))
    variables = convert.from_pytorch_state_dict("resnet8", sd)
    np.testing.assert_array_equal(
        variables["params"]["block1"]["conv1"]["kernel"],
        np.transpose(sd["conv1.weight"], (2, 3, 1, 0)),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["block2"]["layer2_0"]["downsample_1"]["mean"],
        sd["layer2.0.downsample.1.running_mean"],
    )
    np.testing.assert_array_equal(variables["params"]["head"]["fc"]["kernel"], sd["fc.weight"].T)
    assert variables["params"]["head"]["fc"]["bias"].shape == (10,)  # classes from the file


# (b) whatever does not fit is named, all of it in one message.


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        convert.from_pytorch_state_dict("resnet9", random_state_dict(resnet8_layout(10)))


def test_missing_extra_and_misshapen_keys_are_all_named():
    sd = random_state_dict(resnet8_layout(10))
    del sd["layer1.0.conv2.weight"], sd["layer3.0.bn2.running_var"]
    sd["layer4.0.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    sd["layer2.0.bn1.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ValueError) as err:
        convert.from_pytorch_state_dict("resnet8", sd)
    message = str(err.value)
    assert "layer4.0.conv1.weight (64, 64, 3, 3)" in message
    assert "layer1.0.conv2.weight (16, 16, 3, 3)" in message
    assert "layer3.0.bn2.running_var (64,)" in message
    assert "layer2.0.bn1.bias: checkpoint (7,), model (32,)" in message
    assert "1 unexpected keys" in message and "2 missing keys" in message
    assert "1 shape mismatches" in message


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (
            lambda sd: sd.pop("bn1.weight"),
            "missing keys (model variables the checkpoint lacks):\n    bn1.weight (16,)",
        ),
        (lambda sd: sd.update({"bn1.gamma": sd["bn1.weight"]}), "bn1.gamma (16,)"),
        (
            lambda sd: sd.update({"conv1.weight": sd["conv1.weight"].transpose(2, 3, 1, 0)}),
            "conv1.weight: checkpoint (3, 3, 3, 16), model (16, 3, 3, 3)",
        ),
    ],
    ids=["missing", "extra", "already-transposed"],
)
def test_single_faults_are_named(edit, named):
    sd = random_state_dict(resnet8_layout(10))
    edit(sd)
    with pytest.raises(ValueError) as err:
        convert.from_pytorch_state_dict("resnet8", sd)
    assert named in str(err.value)


def test_checkpoint_without_classifier_is_refused():
    sd = random_state_dict(resnet8_layout(10))
    del sd["fc.weight"]
    with pytest.raises(ValueError, match=re.escape("no 2-D classifier weight 'fc.weight'")):
        convert.from_pytorch_state_dict("resnet8", sd)


# (c) the .pth reader, against files torch itself writes.


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pth_reader_matches_torch(torch, tmp_path, zip_format):
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    sd = {
        "float": torch.randn(3, 4),
        "long": torch.tensor([1, -2, 2**40]),
        "scalar": torch.tensor(5),
        "transposed": base.t(),  # non-contiguous view of `base`'s storage
        "offset_view": base[2:5, 3:7],  # strided view, storage offset 19
        "base": base,
        "half": torch.randn(5).half(),
        "bfloat16": torch.randn(5).bfloat16(),
        "empty": torch.zeros(0, 3),
        "bool": torch.tensor([True, False]),
    }
    assert sd["offset_view"].storage_offset() == 19
    path = tmp_path / "sd.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    read = pth.load(path)
    assert read.keys() == sd.keys()
    for key, tensor in sd.items():
        expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        assert read[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(read[key], expected, err_msg=key)


@pytest.mark.parametrize("wrapper", ["model", "state_dict", None])
def test_load_state_dict_unwraps_and_strips_data_parallel_prefix(torch, tmp_path, wrapper):
    sd = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict()
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    if wrapper:
        wrapped = {wrapper: wrapped, "epoch": 240, "best_acc": 0.7, "optimizer": {"lr": 0.05}}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    read = pth.load_state_dict(tmp_path / "ckpt.pth")
    assert list(read) == list(sd)
    for key, tensor in sd.items():
        np.testing.assert_array_equal(read[key], tensor.numpy())


def test_pth_reader_refuses_arbitrary_objects(torch, tmp_path):
    torch.save(torch.nn.Linear(2, 3), tmp_path / "module.pth")  # a pickled nn.Module
    with pytest.raises(pickle.UnpicklingError, match=re.escape("torch.nn.modules.linear.Linear")):
        pth.load(tmp_path / "module.pth")


def test_legacy_storage_views_of_old_torch_are_read_as_torch_reads_them(torch, tmp_path):
    """Old torch wrote views of a storage as ("storage", type, root key, location, numel,
    (view key, element offset, element count)); torch.load still reads them."""
    import collections
    import struct

    class Ref:  # a storage, pickled as its persistent id
        def __init__(self, pid):
            self.pid = pid

    class Tensor:
        def __init__(self, ref, offset, size, stride):
            self.args = (ref, offset, size, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, Ref) else None

    root = np.arange(10, dtype=np.float32) * 1.5
    whole = Ref(("storage", torch.FloatStorage, "7", "cpu", 10, None))
    view = Ref(("storage", torch.FloatStorage, "7", "cpu", 10, ("8", 2, 6)))
    obj = {"whole": Tensor(whole, 1, (2, 3), (3, 1)), "view": Tensor(view, 1, (2, 2), (1, 3))}
    path = tmp_path / "old.pth"
    with open(path, "wb") as f:
        for header in (pth.LEGACY_MAGIC, pth.LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(obj)
        pickle.dump(["7"], f, protocol=2)
        f.write(struct.pack("<q", 10) + root.tobytes())
    read = pth.load(path)
    theirs = torch.load(path, weights_only=False)
    np.testing.assert_array_equal(read["whole"], root[1:7].reshape(2, 3))
    np.testing.assert_array_equal(read["view"], root[[3, 6, 4, 7]].reshape(2, 2))
    for key in obj:
        np.testing.assert_array_equal(read[key], theirs[key].numpy())


def test_pth_reader_refuses_a_truncated_legacy_file(tmp_path):
    path = tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C))  # legacy files open with this magic
    with pytest.raises(ValueError, match="legacy format checkpoint that ends inside its header"):
        pth.load(path)


# (d) numerical parity with the PyTorch originals.


@pytest.mark.parametrize("name", MAP_MODELS)
def test_reference_matches_layout_file(name, torch, layouts):
    import torch_reference

    sd = torch_reference.build(name, seed=0).state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(k, s) for k, s in layouts[name]]


def _nhwc(t) -> np.ndarray:
    a = t.numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def _reference_taps(name: str, reference, x) -> tuple[np.ndarray, blocknet.Taps]:
    """Logits and `Taps` of the PyTorch model, NHWC, read from its mdistiller-style feats."""
    logits, out = reference(x)
    feats = [_nhwc(f) for f in out["feats"]]
    if name in STEM_OUTSIDE_FEATS:
        stem, blocks = _nhwc(reference.model[0](x)), feats
        preact = [_nhwc(f) for f in out["preact_feats"]]
    else:
        stem, blocks = feats[0], feats[1:]
        preact = blocks if name in NO_PREACT_FEATS else [_nhwc(f) for f in out["preact_feats"]][1:]
    pooled = _nhwc(out["pooled_feat"])
    return logits.numpy(), blocknet.Taps(stem, tuple(blocks), tuple(preact), pooled)


@pytest.mark.parametrize("name", MAP_MODELS)
def test_converted_taps_match_pytorch(name, torch, tmp_path):
    """Both sides compute in float64 from the same float32 weights (exact in float64), so
    that float32 rounding, which reaches 2e-4 in the deepest networks, hides nothing: they
    agree to about 1e-12."""
    import torch_reference

    reference = torch_reference.build(name, seed=1)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": reference.state_dict(), "epoch": 240}, path)
    variables = convert.from_pytorch_file(name, path)

    x = np.asarray(images(2, input_size(name), seed=2), np.float64)
    with torch.no_grad():
        expected_logits, expected = _reference_taps(
            name, reference.double(), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        )
    with jax.enable_x64(True):
        net = models.get_model(name, expected_logits.shape[1], dtype=jnp.float64)
        variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)
        logits, taps, _ = net.taps(variables, jnp.asarray(x))
        got, want = _named(logits, taps), _named(expected_logits, expected)
    assert got.keys() == want.keys()
    assert all(v.dtype == np.float64 for v in got.values())
    diff = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
    print(f"{name}: max |flax - torch| over logits and taps = {diff:.2e}")
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-8, atol=1e-8, err_msg=key)


def _named(logits, taps: blocknet.Taps) -> dict[str, np.ndarray]:
    """The logits and every tap, by name (`blocks[2]`)."""
    named = {"logits": logits, "stem": taps.stem, "pooled": taps.pooled}
    for field in ("blocks", "preact"):
        named.update({f"{field}[{k}]": a for k, a in enumerate(getattr(taps, field))})
    return {k: np.asarray(v) for k, v in named.items()}


# The command line.


def test_command_line_writes_a_loadable_variables_checkpoint(torch, tmp_path, capsys):
    from bkd_jax.training import checkpointing

    sd = random_state_dict(resnet8_layout(10))
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "t.pth")
    args = ["--model", "resnet8", "--input", str(tmp_path / "t.pth")]
    convert.main([*args, "--output", str(tmp_path / "out")])
    assert "resnet8 (10 classes)" in capsys.readouterr().out

    variables, metadata = checkpointing.load_variables(tmp_path / "out")
    assert metadata["model"] == "resnet8" and metadata["num_classes"] == 10
    expected = convert.from_pytorch_state_dict("resnet8", sd)
    jax.tree.map(np.testing.assert_array_equal, variables, expected)

    with pytest.raises(SystemExit) as exit_info:  # the output directory now exists
        convert.main([*args, "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert "already exists" in capsys.readouterr().err


def test_converted_teacher_is_evaluated_and_distilled_from_by_the_trainer(torch, tmp_path):
    """A torch-written .pth -> CLI -> eval-only run and a KD run of the trainer."""
    from bkd_jax.config_defaults import base_config
    from bkd_jax.data import pipeline
    from bkd_jax.training import loop

    sd = random_state_dict(resnet8_layout(10), seed=3)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "t.pth")
    teacher_dir = tmp_path / "teacher"
    convert.main(["--model", "resnet8", "--input", str(tmp_path / "t.pth"),
                  "--output", str(teacher_dir)])  # fmt: skip

    config = base_config("digits", teacher="resnet8", student="resnet8", method="ce")
    config.eval_only, config.student_checkpoint = True, str(teacher_dir)
    config.eval_batch_size = 64
    summary = loop.train_and_evaluate(config, str(tmp_path / "eval"))
    # The same accuracy computed directly from the converted variables.
    net, variables = models.get_model("resnet8", 10), convert.from_pytorch_state_dict("resnet8", sd)
    hits = total = 0
    for batch in pipeline.eval_batches(config.dataset, global_batch_size=64):
        logits, _ = net.apply(variables, jnp.asarray(batch["image"]))
        predicted = np.argmax(logits, axis=-1)
        hits += int(((predicted == batch["label"]) & batch["mask"]).sum())
        total += int(batch["mask"].sum())
    assert summary["eval"]["eval/count"] == total == 360
    assert summary["eval"]["eval/student/top1"] == pytest.approx(hits / total)

    config = base_config("digits", teacher="resnet8", student="resnet8", method="kd")
    config.teacher_checkpoint, config.num_train_steps = str(teacher_dir), 2
    config.eval_batch_size = 64
    summary = loop.train_and_evaluate(config, str(tmp_path / "kd"))
    assert summary["last"]["eval/teacher/top1"] == pytest.approx(hits / total)
