"""DP fine-tuning of pretrained backbones: TF-Hub handles, SavedModels and Keras models.

The package's modules, one concern each (every public name is importable from here):

- `hub`: TF-Hub handles (`BackboneNotFoundError`);
- `trust`: the `trusted_sources` registry that Keras safe mode consults;
- `saved_model`: `SavedModelLayer`, a SavedModel as a trainable Keras layer;
- `adapters`: `AdaptImages` and `InferenceMode`, per-example layers without weights;
- `sources`: `load_source` and `backbone` (files, handles, built-in backbones);
- `builder`: `build`, the images -> logits model;
- `features`: `extract_features` and `classifier_head` for classifier-only training;
- `cache`: `cached_features`, the run directory's feature cache.

Two modes, as in De et al. (2022):

- ``"all_layers"``: every weight of the backbone and the classifier is trained with DP-SGD
  (per-example gradients through the whole network). Plain Keras ``Conv2D`` layers of a Keras
  backbone keep their weights and run through the library's per-example-fast convolution
  (`DPScaleModel` routes them automatically); BatchNormalization layers are frozen
  (``trainable=False``: stored statistics, an affine map per example). SavedModels are opaque
  graphs: their convolutions cannot be rerouted, so they train exactly but on TensorFlow's slow
  per-example loop, with a warning.
- ``"classifier_only"``: the backbone is frozen and runs in inference mode; only the classifier
  layer is trained. Because the features are then a fixed function of each example (the
  backbone was trained on public data and is never updated), they can be computed once
  (`extract_features`) and DP-SGD can train the classifier on the cached feature rows
  (`classifier_head`): Poisson sampling of rows of the feature array is the same mechanism, with
  the same guarantee, as sampling the images, and each step costs a single Dense layer.

Images are fitted to the backbone inside the model by `AdaptImages` (``build(...,
image_shape=..., image_size=..., pixel_scale=...)``): resize, gray -> RGB, pixel scale, all per
example and vectorized. Models whose backbone is a SavedModel reload it when loaded from a
``.keras`` file; Keras safe mode refuses that unless the source is listed in
`trusted_sources`.

The classifier is either new (``classifier="reset"``: the source's final Dense layer is replaced
by a zero-initialized one; ``classifier="add"``: the source is a feature extractor, a
zero-initialized Dense layer is added on its output) or the pretrained one (``"keep"``, for
label sets that match the pretraining labels, in the same order).

Example:
    >>> model = build("pretrained.keras", num_classes=10, mode="all_layers")
    >>> model.compile(optimizer=dks.DPSGD(...), loss=..., metrics=["accuracy"])
    >>> model.fit(sampler.dataset(x, y, steps=steps), ...)
    >>>
    >>> model = build("saved_model_dir/", num_classes=10, mode="classifier_only",
    ...               classifier="add")
    >>> features = extract_features(model, x)                   # computed once
    >>> head = classifier_head(model)                           # DP-trains model's classifier
    >>> head.compile(optimizer=dks.DPSGD(...), loss=...)
    >>> head.fit(dks.data.BatchSampler(len(features), 256).dataset(features, y, steps=steps))
    >>> model.evaluate(x_test, y_test)                          # images -> trained classifier
"""

from dp_keras_scale.finetune.adapters import AdaptImages, InferenceMode
from dp_keras_scale.finetune.builder import CLASSIFIER_NAME, CLASSIFIERS, MODES, build
from dp_keras_scale.finetune.cache import (FEATURE_FILES, FEATURE_KEY, cached_features,
                                           source_fingerprint)
from dp_keras_scale.finetune.features import classifier_head, extract_features
from dp_keras_scale.finetune.hub import BackboneNotFoundError
from dp_keras_scale.finetune.saved_model import SavedModelLayer
from dp_keras_scale.finetune.sources import (BACKBONE_NAME, BUILTIN_BACKBONES, backbone,
                                             load_source)
from dp_keras_scale.finetune.trust import trusted_sources

__all__ = ["MODES", "CLASSIFIERS", "BACKBONE_NAME", "CLASSIFIER_NAME", "BUILTIN_BACKBONES",
           "BackboneNotFoundError", "SavedModelLayer", "InferenceMode", "AdaptImages",
           "backbone", "build", "extract_features", "classifier_head", "load_source",
           "trusted_sources", "FEATURE_FILES", "FEATURE_KEY", "cached_features",
           "source_fingerprint"]
