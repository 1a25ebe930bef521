"""Published teachers in one command: mdistiller's CIFAR-100 teacher archive (as a .tar
and as the folder it extracts to) and torchvision's ImageNet ResNet files by name.

The archive is built here with torch, in mdistiller's layout
(`cifar_teachers/<model>_vanilla/ckpt_epoch_240.pth`, `{"model": state_dict, ...}`), from
the PyTorch re-implementations in `torch_reference`; every converted teacher must give
the logits its PyTorch original gives.
"""

from __future__ import annotations

import pathlib
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import images

from bkd_jax import convert, models

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402  (needs torch)

# Folder in mdistiller's archive -> zoo name (its PyTorch original is torch_reference's);
# two of the six teachers, the small ones, and a folder that is no teacher of mdistiller's.
TEACHERS = {"resnet56_vanilla": "resnet56", "wrn_40_2_vanilla": "wrn_40_2"}
STRANGER = "resnet8x4_kd"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """The teachers' folder tree, the same as a .tar, and the PyTorch models."""
    root = tmp_path_factory.mktemp("download")
    originals = {}
    for seed, (folder, name) in enumerate(TEACHERS.items()):
        originals[name] = torch_reference.build(name, seed=seed)  # random BatchNorms too
        _save(originals[name], root / "cifar_teachers" / folder)
    _save(torch_reference.build("resnet8x4", seed=9), root / "cifar_teachers" / STRANGER)
    tar = root / "cifar_teachers.tar"
    with tarfile.open(tar, "w") as out:
        out.add(root / "cifar_teachers", arcname="cifar_teachers")
    return {"folder": root / "cifar_teachers", "tar": tar, "originals": originals}


def _save(model, folder: pathlib.Path) -> None:
    folder.mkdir(parents=True)
    checkpoint = {"model": model.state_dict(), "best_acc": 0.5, "epoch": 240}
    torch.save(checkpoint, folder / convert.MDISTILLER_CHECKPOINT)


def _logits_match(original, name: str, directory: pathlib.Path, size: int) -> dict:
    from bkd_jax.training import checkpointing

    variables, metadata = checkpointing.load_variables(directory)
    assert metadata["model"] == name
    x = np.asarray(images(2, size, seed=4))
    with torch.no_grad():
        expected, _ = original(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    expected = expected.numpy()
    net = models.get_model(name, metadata["num_classes"])
    logits = np.asarray(net.apply(variables, jnp.asarray(x))[0])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    return metadata


@pytest.mark.parametrize("form", ["tar", "folder"])
def test_every_teacher_of_the_archive_is_converted(archive, form, tmp_path, capsys):
    convert.main(["--input", str(archive[form]), "--output", str(tmp_path / "teachers")])
    out = capsys.readouterr().out
    assert f"skipped {STRANGER}: not one of mdistiller's teachers" in out
    assert sorted(p.name for p in (tmp_path / "teachers").iterdir()) == ["resnet56", "wrn_40_2"]
    for folder, name in TEACHERS.items():
        metadata = _logits_match(archive["originals"][name], name, tmp_path / "teachers" / name, 32)
        assert metadata["num_classes"] == 100
        assert metadata["published_top1"] == convert.MDISTILLER_TEACHERS[folder][1]
        assert metadata["source"].endswith(f"cifar_teachers/{folder}/ckpt_epoch_240.pth")
        assert f"wrote {name} (100 classes) from {metadata['source']}" in out


def test_published_figures_are_those_of_the_dkd_paper():
    # Teacher rows of Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, Tables 1-2.
    assert {z: top1 for z, top1 in convert.MDISTILLER_TEACHERS.values()} == {
        "resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "resnet50": 79.34,
        "wrn_40_2": 75.61, "vgg13": 74.64,
    }  # fmt: skip
    assert all(zoo in models.available() for zoo, _ in convert.MDISTILLER_TEACHERS.values())
    assert all(zoo in models.available() for zoo, _ in convert.TORCHVISION_FILES.values())


def test_an_archive_refuses_existing_outputs_before_converting_any(archive, tmp_path, capsys):
    (tmp_path / "teachers" / "wrn_40_2").mkdir(parents=True)
    with pytest.raises(SystemExit):
        convert.main(["--input", str(archive["tar"]), "--output", str(tmp_path / "teachers")])
    assert "wrn_40_2 already exists" in capsys.readouterr().err
    assert not (tmp_path / "teachers" / "resnet56").exists()


def test_torchvision_file_names_name_the_model(tmp_path, capsys):
    original = torch_reference.build("imagenet_resnet18", seed=5)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(original.state_dict(), path)  # torchvision's files are plain state dicts
    convert.main(["--input", str(path), "--output", str(tmp_path / "r18")])
    metadata = _logits_match(original, "imagenet_resnet18", tmp_path / "r18", 64)
    assert metadata["published_top1"] == 69.758
    assert "its publisher reports 69.758% top-1" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        convert.main(["--input", str(path), "--model", "resnet8", "--output", str(tmp_path / "x")])
    assert "resnet18-f37072fd.pth is torchvision's imagenet_resnet18, not resnet8" in (
        capsys.readouterr().err
    )
    renamed = tmp_path / "my_resnet18.pth"
    path.rename(renamed)
    with pytest.raises(SystemExit):
        convert.main(["--input", str(renamed), "--output", str(tmp_path / "y")])
    assert "cannot tell the model of my_resnet18.pth; name it with --model" in (
        capsys.readouterr().err
    )
