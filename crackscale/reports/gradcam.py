"""Grad-CAM (Selvaraju et al., 2017) on MobileNetV2's last convolutional block: where the model sees a crack.

The artifact model is a chain: input → augmentation (inactive at inference) → Rescaling → the
nested ``mobilenetv2_…`` base → pooling → dense sigmoid. We run that chain layer by layer, take
the base's ``out_relu`` activation (the last conv block, 1/32 of the input resolution), and
weight its channels by the spatially averaged gradient of the crack logit (P(crack) before
the sigmoid, which saturates). The map is ReLU'd,
normalised to 0..1 and bilinearly upsampled to the image size.

For the head ``crackscale.model.build`` makes, that is the class activation map
(``crackscale.model.class_activation``): an artifact's ``heatmap.tflite`` gives the same maps on
LiteRT without TensorFlow, and a scoring report uses it when the artifact has one.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from crackscale import model as M

log = logging.getLogger(__name__)

LAST_CONV = M.LAST_CONV
find_base = M.find_base


def heatmaps(model: Any, images: np.ndarray, layer_name: str = LAST_CONV) -> tuple[np.ndarray, np.ndarray]:
    """(maps, probabilities): Grad-CAM maps in 0..1 of shape (N, H, W) for RGB 0..255 ``images``.

    ``images`` has the model's input size (N, H, W, 3); probabilities are P(crack), shape (N,).
    """
    import tensorflow as tf

    from crackscale.model import keras

    k = keras()
    base = find_base(model, layer_name)
    conv_out = base.get_layer(layer_name).output
    same = conv_out is base.output  # include_top=False: the last conv activation IS the output
    base_split = k.Model(base.inputs, conv_out if same else [conv_out, base.output])
    x = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)  # records the whole chain, frozen (non-trainable) layers included
        h = x
        conv = logit = None
        for layer in model.layers[1:]:  # [0] is the InputLayer
            if layer is base:
                if same:
                    conv = h = base_split(h, training=False)
                else:
                    conv, h = base_split(h, training=False)
            elif layer is model.layers[-1] and _is_sigmoid_dense(layer, k):
                # the logit, not the probability: a saturated sigmoid has ~zero gradient
                logit = tf.reshape(tf.matmul(h, layer.kernel) + layer.bias, [-1])
                h = tf.sigmoid(logit)
            else:
                h = layer(h, training=False)
        prob = tf.reshape(h, [-1])
        score = logit if logit is not None else prob
    if conv is None:
        raise ValueError(f"model {model.name!r}: the base model is not on its layer chain")
    grads = tape.gradient(score, conv)  # d score_i / d conv_i: samples are independent
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1))
    cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + 1e-12)
    up = tf.image.resize(cam[..., None], images.shape[1:3], method="bilinear")[..., 0]
    return up.numpy(), prob.numpy()


def _is_sigmoid_dense(layer: Any, k: Any) -> bool:
    return isinstance(layer, k.layers.Dense) and getattr(layer.activation, "__name__", "") == "sigmoid"


def peak(cam: np.ndarray) -> tuple[int, int]:
    """(row, col) of a map's maximum."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(cam)), cam.shape))  # type: ignore[return-value]


def overlay_png(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45, size: int = 0) -> bytes:
    """PNG bytes of ``image`` (H, W, 3 uint8) with ``cam`` (h, w in 0..1) as a 'jet' heatmap on top,
    ``alpha`` opaque where the map is 1 and transparent where it is 0.

    ``cam`` is resized to the image; ``size`` > 0 resizes the result to size × size.
    """
    from matplotlib import colormaps
    from PIL import Image

    img = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    cam_img = Image.fromarray(np.uint8(np.clip(cam, 0, 1) * 255)).resize(img.size, Image.BILINEAR)
    c = np.asarray(cam_img, dtype=np.float32)[..., None] / 255.0
    heat = colormaps["jet"](c[..., 0])[..., :3]
    a = alpha * c  # opacity follows the map: cold regions show the image itself, unobscured
    mixed = (1 - a) * np.asarray(img, dtype=np.float32) / 255.0 + a * heat
    out = Image.fromarray(np.uint8(np.clip(mixed, 0, 1) * 255))
    if size:
        out = out.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, "PNG", compress_level=1)  # optimize=True: several times slower for slightly smaller files
    return buf.getvalue()
