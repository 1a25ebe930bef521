"""How batches reach the devices: from device memory, or from the host's tf.data pipeline.

`make_loader(config.dataset, mesh)` picks the loader `dataset.loader` names ("auto",
"device" or "host", documented in `bkd_jax.data.datasets`) and logs which one runs and
why. Both yield global batches already on the mesh, split along its data axis, in the
same order: the global batch of step ``k`` holds the examples of
`datasets.epoch_permutation` as `bkd_jax.data.pipeline` describes, for any number of
devices and processes, so resuming is exact with either. Their augmentations draw from
different random streams, so their batches are not equal.

The device loader holds every split as uint8 arrays on the devices (CIFAR-10: 150 MiB for
the training split), so a step's input costs a gather and a few elementwise ops on the
device instead of decoding on the host: the host only sends the batch's example indices.
It needs neither TensorFlow nor tf.data. The arrays are replicated on each device when
they fit in ``dataset.device_memory_share`` of one device's memory, else split in equal
shards over the devices when a shard fits: then each device gathers the batch's rows it
holds and a reduce-scatter (uint8, one batch of images in all) hands every device its
own rows. Data too large for either goes through the host loader.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec

from bkd_jax.data import arrays, datasets, device_augment
from bkd_jax.training import prefetch, sharding

Batch = dict[str, jax.Array]


class Loader(Protocol):
    """Global batches on the mesh, for training and for one pass over the eval split."""

    kind: str  # "device" or "host"
    info: datasets.DatasetInfo

    def train_batches(self, global_batch_size: int, seed: int, start_step: int) -> Iterator[Batch]:
        """The endless training stream from `start_step` on."""
        ...

    def eval_batches(self, global_batch_size: int) -> Iterator[Batch]:
        """The eval split once, padded with examples whose ``mask`` is False."""
        ...


def make_loader(ds_config: ml_collections.ConfigDict, mesh: Mesh) -> Loader:
    """The loader `ds_config.loader` asks for, its data checked; logs which and why.

    Raises:
      ValueError: bad data or config, "device" asked for data it cannot hold, or "host"
        needed where TensorFlow is not installed; each in one line, before any compute.
    """
    datasets.check_choice("dataset", ds_config.name, datasets.DATASETS)
    datasets.check_choice("loader", ds_config.loader, datasets.LOADERS)
    datasets.check_choice("augmentation", ds_config.augment, datasets.AUGMENTATIONS)
    datasets.check_choice("strong view", ds_config.strong_view, datasets.STRONG_VIEWS)
    reason = None
    if ds_config.loader != "host":
        try:
            loader = DeviceLoader(ds_config, mesh)
        except arrays.NeedsHostLoader as why:
            if ds_config.loader == "device":
                raise ValueError(f"dataset.loader is 'device', but {why}") from None
            logging.info("Input: the host's tf.data pipeline, as %s.", why)
            reason = str(why)
        else:
            logging.info(
                "Input: device memory, %s of decoded %s images %s.",
                _mebibytes(loader.nbytes), ds_config.name,
                "on each device" if loader.placement == "replicated"
                else f"split over the {mesh.devices.size} devices",
            )  # fmt: skip
            return loader
    else:
        logging.info("Input: the host's tf.data pipeline (dataset.loader='host').")
    return HostLoader(ds_config, mesh, reason)


def device_memory_bytes(device: jax.Device) -> int:
    """Memory of one device: its allocator's limit, or host memory over the CPU devices."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // max(1, jax.local_device_count())


class DeviceLoader:
    """Every split as uint8 arrays on each device; batches gathered and augmented there."""

    kind = "device"

    def __init__(self, ds_config: ml_collections.ConfigDict, mesh: Mesh):
        if ds_config.augment == "inception":
            raise arrays.NeedsHostLoader(
                "the 'inception' augmentation crops full-size images, which device memory "
                "does not hold"
            )
        source = arrays.open_source(ds_config)
        size = ds_config.image_size
        counts = {
            split: _capped(source.count(split), cap)
            for split, cap in (
                (ds_config.train_split, ds_config.max_train_examples),
                (ds_config.eval_split, ds_config.max_eval_examples),
            )
        }
        self.nbytes = sum(counts.values()) * size * size * 3
        memory = device_memory_bytes(mesh.devices.flat[0])
        budget = ds_config.device_memory_share * memory
        devices = mesh.devices.size
        if self.nbytes <= budget:
            self.placement = "replicated"
        elif math.ceil(self.nbytes / devices) <= budget:
            self.placement = "sharded"
        else:
            split = f", even split over {devices} devices" if devices > 1 else ""
            raise arrays.NeedsHostLoader(
                f"its decoded splits take {_mebibytes(self.nbytes)}, more than "
                f"dataset.device_memory_share {ds_config.device_memory_share} of the "
                f"{_mebibytes(memory)} of one device ({_mebibytes(budget)}){split}"
            )
        self._config = ds_config
        self._mesh = mesh
        self._white = source.white
        train = source.load(ds_config.train_split, counts[ds_config.train_split])
        evaluation = source.load(ds_config.eval_split, counts[ds_config.eval_split])
        self.info = datasets.DatasetInfo(
            num_classes=source.num_classes,
            image_shape=(size, size, 3),
            num_train=len(train.labels),
            num_eval=len(evaluation.labels),
        )
        self._train = (self._place(train.images), self._replicate(train.labels))
        self._eval = (self._place(evaluation.images), self._replicate(evaluation.labels))
        self._take = (
            _take_replicated
            if self.placement == "replicated"
            else functools.partial(_take_sharded, mesh=mesh)
        )

    def _replicate(self, array: np.ndarray) -> jax.Array:
        """`array` on every device of the mesh (every process passes the same array)."""
        return jax.make_array_from_callback(
            array.shape, sharding.replicated(self._mesh), lambda index: array[index]
        )

    def _place(self, images: np.ndarray) -> jax.Array:
        """The images replicated, or split in equal shards (zero rows pad the last)."""
        if self.placement == "replicated":
            return self._replicate(images)
        rows = -len(images) % self._mesh.devices.size
        padded = np.concatenate([images, np.zeros((rows, *images.shape[1:]), images.dtype)])
        return jax.make_array_from_callback(
            padded.shape, sharding.batch_sharded(self._mesh), lambda index: padded[index]
        )

    def train_batches(self, global_batch_size: int, seed: int, start_step: int) -> Iterator[Batch]:
        steps = datasets.steps_per_epoch(self.info, global_batch_size)
        if steps < 1:
            raise ValueError(
                f"global_batch_size {global_batch_size} exceeds the {self.info.num_train} "
                "training examples: not even one step per epoch"
            )
        gather = jax.jit(
            functools.partial(
                _train_batch, take=self._take, seed=seed, config=self._config, white=self._white
            ),
            out_shardings=sharding.batch_sharded(self._mesh),
        )
        epoch, order = None, None
        step = start_step
        while True:
            step_epoch, position = divmod(step, steps)
            if step_epoch != epoch:
                epoch = step_epoch
                order = datasets.epoch_permutation(seed, epoch, self.info.num_train)
            indices = order[position * global_batch_size : (position + 1) * global_batch_size]
            yield gather(*self._train, self._on_mesh(indices, epoch))
            step += 1

    def eval_batches(self, global_batch_size: int) -> Iterator[Batch]:
        count = self.info.num_eval
        padded = np.full(math.ceil(count / global_batch_size) * global_batch_size, -1)
        padded[:count] = np.arange(count)
        gather = jax.jit(
            functools.partial(_eval_batch, take=self._take, config=self._config, white=self._white),
            out_shardings=sharding.batch_sharded(self._mesh),
        )
        for indices in np.split(padded, len(padded) // global_batch_size):
            yield gather(*self._eval, self._on_mesh(indices, 0))

    def _on_mesh(self, indices: np.ndarray, epoch: int) -> Batch:
        """The global batch's example indices (and epoch), split along the data axis: each
        process passes its rows, as `sharding.global_batch` expects."""
        rows = len(indices) // jax.process_count()
        mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
        local = {
            "index": indices[mine].astype(np.int32),
            "epoch": np.full(rows, epoch, np.int32),
        }
        with jax.transfer_guard("allow"):
            return sharding.global_batch(local, self._mesh)


def _take_replicated(images: jax.Array, indices: jax.Array) -> jax.Array:
    """Rows `indices` of images held whole on every device."""
    return images[indices]


def _take_sharded(images: jax.Array, indices: jax.Array, *, mesh: Mesh) -> jax.Array:
    """Rows `indices` (batch-sharded) of images split in equal shards over `mesh`: each
    device gathers the rows it holds, zeros elsewhere, and a reduce-scatter gives every
    device its own rows of the batch."""

    def take(shard: jax.Array, local_indices: jax.Array) -> jax.Array:
        wanted = jax.lax.all_gather(local_indices, sharding.DATA_AXIS, tiled=True)
        local = wanted - jax.lax.axis_index(sharding.DATA_AXIS) * shard.shape[0]
        held = (local >= 0) & (local < shard.shape[0])
        rows = jnp.take(shard, jnp.clip(local, 0, shard.shape[0] - 1), axis=0)
        rows = jnp.where(held[:, None, None, None], rows, jnp.zeros_like(rows))
        return jax.lax.psum_scatter(rows, sharding.DATA_AXIS, scatter_dimension=0, tiled=True)

    split = PartitionSpec(sharding.DATA_AXIS)
    return jax.shard_map(take, mesh=mesh, in_specs=(split, split), out_specs=split)(images, indices)


def _train_batch(
    images: jax.Array,
    labels: jax.Array,
    where: Batch,
    *,
    take: Callable[[jax.Array, jax.Array], jax.Array],
    seed: int,
    config: ml_collections.ConfigDict,
    white: int,
) -> Batch:
    """The augmented training batch of the examples `where["index"]`."""
    indices = where["index"]
    keys = device_augment.example_keys(seed, where["epoch"], indices)
    pixels = take(images, indices)
    batch = {
        "image": device_augment.train_images(
            pixels,
            keys,
            augment=config.augment,
            cutout_size=config.cutout,
            white=white,
            mean=config.mean,
            std=config.std,
        ),
        "label": labels[indices],
        "index": indices,
    }
    if config.strong_view == "randaugment":
        batch["image_strong"] = device_augment.strong_images(
            pixels, keys, white=white, mean=config.mean, std=config.std
        )
    return batch


def _eval_batch(
    images: jax.Array,
    labels: jax.Array,
    where: Batch,
    *,
    take: Callable[[jax.Array, jax.Array], jax.Array],
    config: ml_collections.ConfigDict,
    white: int,
) -> Batch:
    """The eval batch of `where["index"]`; index -1 is padding: a blank, masked example."""
    indices = where["index"]
    mask = indices >= 0
    safe = jnp.where(mask, indices, 0)
    image = device_augment.normalise(take(images, safe), white, config.mean, config.std)
    blank = jnp.zeros_like(image)
    return {
        "image": jnp.where(mask[:, None, None, None], image, blank),
        "label": jnp.where(mask, labels[safe], 0),
        "index": indices,
        "mask": mask,
    }


class HostLoader:
    """The tf.data pipeline (`bkd_jax.data.pipeline`): batches decoded and augmented on the
    host CPU, the next one sent to the devices while the current step runs."""

    kind = "host"

    def __init__(self, ds_config: ml_collections.ConfigDict, mesh: Mesh, reason: str | None = None):
        """`reason`: why device memory cannot hold the data, for the error without TF."""
        try:
            from bkd_jax.data import pipeline  # TensorFlow: only the host loader needs it.
        except ImportError as error:
            why = reason or "dataset.loader is 'host'"
            raise ValueError(
                f"dataset {ds_config.name!r} needs the host's tf.data pipeline ({why}), "
                f"which needs TensorFlow ({error}): pip install 'bkd_jax[tf]'"
            ) from None
        if ds_config.cutout:
            raise ValueError("dataset.cutout runs on the device loader only; set it to 0")
        if ds_config.strong_view != "none":
            raise ValueError(
                "dataset.strong_view runs on the device loader only; this data set needs the "
                f"host loader ({reason or 'dataset.loader is host'})"
            )
        self._pipeline = pipeline
        self._config = ds_config
        self._mesh = mesh
        self.info = pipeline.dataset_info(ds_config)

    def train_batches(self, global_batch_size: int, seed: int, start_step: int) -> Iterator[Batch]:
        host_batches = self._pipeline.train_batches(
            self._config, global_batch_size=global_batch_size, seed=seed, start_step=start_step
        )
        return prefetch.prefetch_to_mesh(host_batches, self._mesh)

    def eval_batches(self, global_batch_size: int) -> Iterator[Batch]:
        for local in self._pipeline.eval_batches(self._config, global_batch_size=global_batch_size):
            # On several processes JAX assembles the array through a transfer that the
            # loop's transfer guard would refuse.
            with jax.transfer_guard("allow"):
                yield sharding.global_batch(local, self._mesh)


def _capped(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def _mebibytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"
