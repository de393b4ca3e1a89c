"""The model a config names, and the published per-dataset constants it is built with.

`build_model` turns ``config["model"]`` into a `DPScaleModel` for uint8 images; with
``[finetune] source`` set, `finetune_model` builds a pretrained backbone plus a classifier
instead. Both read the dataset's class count (`NUM_CLASSES`) and, for this library's models,
its pixel statistics (`PIXEL_MEAN_STD`): published values, never statistics computed on the
private data.

Example:
    >>> model = build_model(load_config("mnist_cpu"), (28, 28, 1))
    >>> dataset_constant(NUM_CLASSES, "tfds:cifar100", "NUM_CLASSES")
    100
"""

from __future__ import annotations

import keras
import numpy as np

from dp_keras_scale import finetune, models
from dp_keras_scale.model import DPScaleModel
from dp_keras_scale.options import TFDS_PREFIX

__all__ = ["NUM_CLASSES", "PIXEL_MEAN_STD", "build_model", "dataset_constant", "finetune_model",
           "pixel_scale"]

# Published per-dataset pixel statistics (public constants; nothing is computed on private data).
PIXEL_MEAN_STD = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530),
                  "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                  "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
                  "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100,
               "imagenet2012": 1000}


def dataset_constant(table: dict, dataset: str, table_name: str):
    """``table[dataset]``; a "tfds:NAME" dataset uses NAME's entry.

    Args:
        table: `PIXEL_MEAN_STD` or `NUM_CLASSES` (or a table like them).
        dataset: ``config["data"]["dataset"]``.
        table_name: the table's name in this module, for the error message.

    Returns:
        The dataset's entry; raises ValueError naming the table when there is none.
    """
    key = dataset.removeprefix(TFDS_PREFIX).split(":")[0].split("/")[0]
    if key not in table:
        raise ValueError(f"Dataset {dataset!r} has no entry in dp_keras_scale.registry."
                         f"{table_name}: add {key!r} there (published values only, never "
                         "statistics computed on the private data).")
    return table[key]


def _standardized_input(input_shape, dataset: str):
    """uint8 images -> standardized floats, as the first layers of a model."""
    mean, std = dataset_constant(PIXEL_MEAN_STD, dataset, "PIXEL_MEAN_STD")
    inputs = keras.Input(input_shape, name="images")
    scaled = keras.layers.Rescaling(1 / 255.0)(inputs)
    return inputs, keras.layers.Normalization(mean=mean, variance=np.square(std),
                                              name="standardize")(scaled)


def build_model(config: dict, input_shape: tuple[int, ...]) -> keras.Model:
    """The `DPScaleModel` named by ``config["model"]`` for uint8 images of ``input_shape``.

    Args:
        config: a resolved config (`dp_keras_scale.config.load_config`).
        input_shape: one image's (height, width, channels).

    Returns:
        An uncompiled `DPScaleModel`, images -> logits.
    """
    m, dataset = config["model"], config["data"]["dataset"]
    classes = dataset_constant(NUM_CLASSES, dataset, "NUM_CLASSES")
    if m["architecture"] in ("small_cnn", "compact_cnn"):
        mean, std = dataset_constant(PIXEL_MEAN_STD, dataset, "PIXEL_MEAN_STD")
        if not np.isscalar(mean):
            mean, std = float(np.mean(mean)), float(np.mean(std))
        cnn = models.small_cnn if m["architecture"] == "small_cnn" else models.compact_cnn
        return cnn(input_shape, classes, widths=tuple(m["widths"]), groups=m["groups"] or None,
                   mean=mean, std=std, weight_standardization=m["weight_standardization"])
    if m["architecture"] == "wide_resnet":
        body = models.wide_resnet(m["depth"], int(m["width"]), classes,
                                  groups=m["groups"] or None, input_shape=input_shape,
                                  weight_standardization=m["weight_standardization"],
                                  dropout=m["dropout"], model_class=keras.Model)
    else:
        body = models.nf_resnet(m["depth"], classes, width=m["width"], input_shape=input_shape,
                                drop_rate=m["dropout"], stem=m["stem"], model_class=keras.Model)
    inputs, standardized = _standardized_input(input_shape, dataset)
    return DPScaleModel(inputs, body(standardized), name=body.name)


def pixel_scale(config: dict, source: keras.layers.Layer) -> float:
    """The factor from uint8 pixel values to what the backbone takes (``finetune.pixel_range``).

    ``"auto"``: [0, 1] (TF-Hub's image convention) for SavedModels and TF-Hub handles; raw
    0-255 values for Keras models (this library's models, like most Keras models, standardize
    inside).
    """
    rng = config["finetune"]["pixel_range"]
    if rng == "auto":
        rng = "0-1" if isinstance(source, finetune.SavedModelLayer) else "0-255"
    return 1 / 255.0 if rng == "0-1" else 1.0


def finetune_model(config: dict, image_shape: tuple[int, ...],
                   source: keras.layers.Layer | str | None = None) -> keras.Model:
    """The `DPScaleModel` images -> logits that ``config["finetune"]`` describes.

    `source` is the already loaded backbone (`finetune.load_source`), or None to load
    ``finetune.source``. Images of `image_shape` (the dataset's) are fitted to the backbone
    by `finetune.AdaptImages` inside the model (``image_size``, gray -> RGB, ``pixel_range``).
    """
    ft = config["finetune"]
    loaded = finetune.load_source(ft["source"]) if source is None else source
    return finetune.build(loaded, dataset_constant(NUM_CLASSES, config["data"]["dataset"],
                                                   "NUM_CLASSES"), mode=ft["mode"],
                          classifier=ft["classifier"], feature_layer=ft["feature_layer"] or None,
                          image_shape=tuple(image_shape), image_size=ft["image_size"] or None,
                          pixel_scale=pixel_scale(config, loaded), name="finetune")
