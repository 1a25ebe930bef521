"""The ResNet bottleneck unit, shared by the CIFAR and the torchvision ImageNet ResNet50.

Both follow ResNet v1.5: 1x1 reduce, 3x3 carrying the stride, 1x1 expand by 4, and a
projection (1x1 convolution + BatchNorm) on the residual path when the shape changes. They
differ only in what PyTorch calls that projection: torchvision's `downsample`, mdistiller's
CIFAR `shortcut`; `shortcut_name` picks the state-dict name. The constructor takes
`(planes, stride, downsample, dtype)` like `resnet_cifar.BasicBlock`, so stages can build
either unit.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bkd_jax.models.layers import batch_norm, conv

EXPANSION = 4  # output channels per `planes`


class Bottleneck(nn.Module):
    """One bottleneck unit; output after the final ReLU, `EXPANSION * planes` channels."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: jnp.dtype = jnp.float32
    shortcut_name: str = "downsample"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        features = EXPANSION * self.planes
        out = conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
        out = conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv2")(out)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(out))
        out = conv(features, 1, dtype=self.dtype, name="conv3")(out)
        out = batch_norm(train, dtype=self.dtype, name="bn3")(out)
        if self.downsample:
            name = self.shortcut_name
            x = conv(features, 1, self.stride, dtype=self.dtype, name=f"{name}_0")(x)
            x = batch_norm(train, dtype=self.dtype, name=f"{name}_1")(x)
        return nn.relu(out + x)
