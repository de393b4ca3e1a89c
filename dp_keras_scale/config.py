"""Run configurations: a TOML file (or a bundled config name) plus ``section.key=value`` overrides.

Every key has a default and a type; unknown sections/keys, wrong types and values outside
their choices raise `ConfigError` naming the key and what is valid. Bundled configs live in
``dp_keras_scale/configs/*.toml`` (``dp-keras-scale train --config NAME``).

``[data] dataset`` names a dataset of ``DATASETS`` (loaded into memory) or ``"tfds:NAME"``: a
TFDS dataset prepared in the array_record format in ``data_dir`` (a TFDS data directory;
default $TFDS_DATA_DIR or ~/tensorflow_datasets), read by example index (ImageNet:
``"tfds:imagenet2012"``). ``image_size``: ``0`` keeps the stored size; N centre-crops and
resizes every image to N x N as it is read ("tfds:" datasets only; needed when the stored
sizes vary).

A config file may set a string key to ``"REQUIRED"``: the config then cannot run until the
user supplies a value (``--set section.key=value``); `check_complete` says which keys are
missing and `experiment.train` calls it before doing anything.

``[finetune]`` fine-tunes a pretrained backbone instead of training ``[model]`` from scratch:

- ``source``: a TF-Hub handle/URL, a SavedModel directory or a ``.keras``/``.h5`` file; ``""``
  (default) trains ``[model]`` from scratch. When set, ``[model]`` is ignored.
- ``mode``: ``"all_layers"`` (DP-SGD through the whole network) or ``"classifier_only"``
  (frozen backbone; features computed once and cached in the run directory, where they are
  private data, not covered by DP; no augmult).
- ``classifier``: ``"reset"`` (new zero-initialized final Dense layer), ``"keep"`` (the
  pretrained one; same label set) or ``"add"`` (the source is a feature extractor).
- ``feature_layer``: with ``classifier = "add"``, the layer of a Keras source whose output
  are the features (``""``: the model's output).
- ``image_size``: ``0`` keeps the dataset's image size; N resizes images to N x N inside the
  model (bilinear, antialiased), e.g. 224 for TF-Hub ImageNet backbones. Gray images are
  repeated to 3 channels when the backbone takes 3.
- ``pixel_range``: the pixel values the backbone takes: ``"0-255"`` (raw pixel values, like
  this library's models and most Keras models that standardize inside), ``"0-1"`` (the
  TF-Hub image convention) or ``"auto"``: ``"0-1"`` for TF-Hub handles and SavedModel
  directories, ``"0-255"`` for ``.keras``/``.h5`` files.

Example:
    >>> config = load_config("fashion_mnist_cpu", ["training.epochs=3", "privacy.target_epsilon=8"])
    >>> config["training"]["epochs"]
    3.0
"""

from __future__ import annotations

import copy
import math
import os
import sys
from importlib import resources
from typing import Any, Iterable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dp_keras_scale.data.sources import DATASETS
from dp_keras_scale.options import (ACCOUNTANTS, FINETUNE_CLASSIFIERS, FINETUNE_MODES, SAMPLINGS,
                                    TFDS_PREFIX)

ARCHITECTURES = ("small_cnn", "compact_cnn", "wide_resnet", "nf_resnet")
PIXEL_RANGES = ("auto", "0-255", "0-1")
REQUIRED = "REQUIRED"

# section -> key -> default. The default's type is the key's type (ints are accepted for floats).
SCHEMA: dict[str, dict[str, Any]] = {
    "run": {"name": "run", "description": "", "training_metrics": True},
    "data": {"dataset": "fashion_mnist", "data_dir": "", "train_subset": 0, "test_subset": 0,
             "image_size": 0},
    "model": {"architecture": "small_cnn", "widths": [16, 32, 32, 64], "groups": 8,
              "weight_standardization": True, "depth": 16, "width": 4.0, "stem": "cifar",
              "dropout": 0.0},
    "privacy": {"target_epsilon": 3.0, "delta": 1e-5, "noise_multiplier": "auto",
                "l2_norm_clip": 1.0, "rescale_to_unit_norm": True, "accountant": "pld",
                "sampling": "poisson", "deterministic_noise": False},
    "training": {"batch_size": 512, "microbatch_size": 192, "epochs": 2.0, "steps": 0,
                 "learning_rate": 4.0, "momentum": 0.0, "augmult": 0, "pad": 4, "flip": False,
                 "ema_decay": 0.0, "seed": "random", "jit_compile": True,
                 "clipping_method": "reference"},
    "finetune": {"source": "", "mode": "all_layers", "classifier": "reset", "feature_layer": "",
                 "image_size": 0, "pixel_range": "auto"},
}

CHOICES: dict[tuple[str, str], tuple] = {
    ("data", "dataset"): tuple(DATASETS),
    ("model", "architecture"): ARCHITECTURES,
    ("model", "stem"): ("cifar", "imagenet"),
    ("training", "clipping_method"): ("reference", "auto"),     # DPScaleModel.clipping_method
    ("privacy", "accountant"): ACCOUNTANTS,
    ("privacy", "sampling"): SAMPLINGS,
    ("finetune", "mode"): FINETUNE_MODES,
    ("finetune", "classifier"): FINETUNE_CLASSIFIERS,
    ("finetune", "pixel_range"): PIXEL_RANGES,
}

# Keys that take either one keyword or a number of the given type.
KEYWORDS: dict[tuple[str, str], tuple[str, type]] = {
    ("privacy", "noise_multiplier"): ("auto", float),   # calibrated from target_epsilon, steps
    # An int fixes sampling, augmentation and initialisation (keep it secret, like the data);
    # the noise stays OS-random unless privacy.deterministic_noise = true (no guarantee then).
    ("training", "seed"): ("random", int),
}


class ConfigError(ValueError):
    """An invalid configuration: names the key and the valid choices."""


def describe(name_or_path: str) -> str:
    """The one-line description of a config: its ``[run] description``, else its first comment.

    Example:
        >>> describe("mnist_cpu")
        'MNIST, CPU: compact WS + GroupNorm CNN, Poisson batches of 1024, 8 epochs, EMA, (3, 1e-5)-DP'
    """
    raw, _ = _read(name_or_path)
    description = raw.get("run", {}).get("description", "")
    if description:
        return description
    text = (open(name_or_path).read() if os.path.exists(name_or_path) else
            (resources.files("dp_keras_scale") / "configs" / f"{name_or_path}.toml").read_text())
    comments = [line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")]
    return comments[0] if comments else ""


def bundled_configs() -> list[str]:
    """Names of the configs shipped with the package."""
    folder = resources.files("dp_keras_scale") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read(name_or_path: str) -> tuple[dict, str]:
    if os.path.exists(name_or_path):
        with open(name_or_path, "rb") as f:
            return tomllib.load(f), os.path.splitext(os.path.basename(name_or_path))[0]
    if name_or_path in bundled_configs():
        text = (resources.files("dp_keras_scale") / "configs" / f"{name_or_path}.toml").read_text()
        return tomllib.loads(text), name_or_path
    raise ConfigError(f"No config file or bundled config named {name_or_path!r}. Bundled: "
                      f"{', '.join(bundled_configs())}; or pass a path to a .toml file.")


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"training.epochs=3"`` -> ("training", "epochs", 3); values are TOML (bare words are strings)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"Override {text!r} must look like section.key=value, "
                          "e.g. training.epochs=3 or privacy.target_epsilon=8.")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def _check_value(section: str, key: str, value: Any) -> Any:
    where = f"{section}.{key}"
    default = SCHEMA[section][key]
    keyword, kind = KEYWORDS.get((section, key), (None, type(default)))
    if keyword is not None and value == keyword:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {toml_value(value)}.")
        return value
    if kind in (int, float):
        expected = f"{'an integer' if kind is int else 'a number'}" + (
            f" or {toml_value(keyword)}" if keyword else "")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or (kind is int and value != int(value)):
            raise ConfigError(f"{where} must be {expected}, got {toml_value(value)}.")
        return kind(value)
    if kind is list:
        if not isinstance(value, list) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise ConfigError(f"{where} must be a list of positive integers, got "
                              f"{toml_value(value)}.")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {toml_value(value)}.")
    if value == REQUIRED:
        return value          # a placeholder the user must fill (see check_complete)
    if (section, key) == ("data", "dataset") and value.startswith(TFDS_PREFIX):
        if value == TFDS_PREFIX:
            raise ConfigError(f"{where} = {toml_value(value)} names no dataset; write e.g. "
                              "\"tfds:imagenet2012\" (a TFDS dataset prepared as array_record).")
        return value
    choices = CHOICES.get((section, key))
    if choices is not None and value not in choices:
        more = ' or "tfds:NAME" (a TFDS dataset prepared as array_record)' if (
            section, key) == ("data", "dataset") else ""
        raise ConfigError(f"{where} = {toml_value(value)} is not valid; choose one of "
                          f"{', '.join(choices)}{more}.")
    return value


def resolve(raw: dict, overrides: Iterable[tuple[str, str, Any]] = ()) -> dict:
    """Defaults, then ``raw``, then overrides; every key checked. Returns a new dict."""
    config = copy.deepcopy(SCHEMA)
    items = [(s, k, v) for s, table in raw.items() for k, v in _section_items(s, table)]
    required = set()
    for section, key, value in [*items, *overrides]:
        if section not in SCHEMA:
            raise ConfigError(f"Unknown config section [{section}]; valid sections: "
                              f"{', '.join(SCHEMA)}.")
        if key not in SCHEMA[section]:
            raise ConfigError(f"Unknown key {section}.{key}; valid keys of [{section}]: "
                              f"{', '.join(SCHEMA[section])}.")
        if value == REQUIRED and not isinstance(SCHEMA[section][key], str):
            raise ConfigError(f"{section}.{key}: only string keys can be {toml_value(REQUIRED)}.")
        if value == REQUIRED:
            required.add((section, key))
        elif (section, key) in required and value == "":
            raise ConfigError(f"{section}.{key} is required by this config and cannot be "
                              f"empty: {_REQUIRED_HINTS.get((section, key), 'set a value')}.")
        config[section][key] = _check_value(section, key, value)
    _check_ranges(config)
    return config


_REQUIRED_HINTS = {
    ("finetune", "source"): "give the pretrained backbone with --set finetune.source=PATH (a "
                            ".keras/.h5 file, a SavedModel directory or a TF-Hub handle)",
}


def check_complete(config: dict) -> None:
    """Raises `ConfigError` if a key the config marks ``"REQUIRED"`` was not given a value.

    Example:
        >>> check_complete(load_config("fashion_mnist_finetune_cpu"))
        Traceback (most recent call last):
        ConfigError: finetune.source is REQUIRED by config 'fashion_mnist_finetune_cpu': ...
    """
    missing = [(s, k) for s, table in config.items() for k, v in table.items() if v == REQUIRED]
    if missing:
        name = config.get("run", {}).get("name", "?")
        raise ConfigError("; ".join(
            f"{s}.{k} is REQUIRED by config {name!r}: "
            f"{_REQUIRED_HINTS.get((s, k), f'set it with --set {s}.{k}=VALUE')}"
            for s, k in missing) + ".")


def _section_items(section: str, table: Any):
    if not isinstance(table, dict):
        raise ConfigError(f"Top-level key {section} must be a [section]; valid sections: "
                          f"{', '.join(SCHEMA)}.")
    return table.items()


def _check_ranges(config: dict) -> None:
    t, p = config["training"], config["privacy"]
    positive = [("training", "batch_size"), ("training", "microbatch_size"),
                ("training", "learning_rate"), ("privacy", "l2_norm_clip"),
                ("privacy", "target_epsilon"), ("privacy", "delta")]
    for section, key in positive:
        if not config[section][key] > 0:
            raise ConfigError(f"{section}.{key} must be > 0, got {config[section][key]}.")
    for section, key in [("training", "steps"), ("training", "augmult"), ("training", "pad"),
                         ("data", "train_subset"), ("data", "test_subset"),
                         ("data", "image_size"),
                         ("model", "groups"),
                         ("training", "momentum"), ("training", "ema_decay")]:
        if config[section][key] < 0:
            raise ConfigError(f"{section}.{key} must be >= 0, got {config[section][key]}.")
    if config["model"]["architecture"] == "compact_cnn" and len(config["model"]["widths"]) != 2:
        raise ConfigError(f"model.architecture = \"compact_cnn\" has two convolutions: set "
                          f"model.widths to two numbers, e.g. [16, 32] (got "
                          f"{config['model']['widths']}).")
    if t["steps"] == 0 and not t["epochs"] > 0:
        raise ConfigError("Set training.epochs > 0 or training.steps > 0.")
    if not t["ema_decay"] < 1:
        raise ConfigError(f"training.ema_decay must be in [0, 1), got {t['ema_decay']}.")
    if not p["delta"] < 1:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {p['delta']}.")
    if p["noise_multiplier"] != "auto" and p["noise_multiplier"] < 0:
        raise ConfigError(f"privacy.noise_multiplier must be >= 0 or \"auto\", got "
                          f"{p['noise_multiplier']}.")
    _check_finetune(config)


def _check_finetune(config: dict) -> None:
    f, t = config["finetune"], config["training"]
    if f["image_size"] < 0:
        raise ConfigError(f"finetune.image_size must be >= 0 (0 keeps the dataset's size), "
                          f"got {f['image_size']}.")
    if not f["source"]:
        changed = [k for k, v in f.items() if k != "source" and v != SCHEMA["finetune"][k]]
        if changed:
            raise ConfigError(
                f"finetune.{', finetune.'.join(changed)} set but finetune.source is empty (no "
                "fine-tuning): set finetune.source to a pretrained backbone, or remove them.")
        return
    if f["feature_layer"] and f["classifier"] != "add":
        raise ConfigError("finetune.feature_layer picks the features for a new classifier: "
                          "use it with finetune.classifier = \"add\".")
    if f["mode"] == "classifier_only" and t["augmult"]:
        raise ConfigError(
            "training.augmult > 0 with finetune.mode = \"classifier_only\": the features are "
            "computed once from the un-augmented images and cached, so there are no augmented "
            "copies to average. Set training.augmult = 0, or use finetune.mode = "
            "\"all_layers\".")


def load_config(name_or_path: str, overrides: Iterable[str] = ()) -> dict:
    """A validated config from a bundled name or a TOML path, with ``section.key=value`` overrides.

    Example:
        >>> load_config("mnist_cpu", ["training.steps=20"])["training"]["steps"]
        20
    """
    raw, name = _read(name_or_path)
    raw.setdefault("run", {}).setdefault("name", name)
    return resolve(raw, [parse_override(o) for o in overrides])


def toml_value(v: Any) -> str:
    """A value as the user writes it in TOML or after ``--set``: ``true``, ``"rdp"``, ``[8, 16]``.

    Example:
        >>> toml_value(True), toml_value("rdp"), toml_value([8, 16])
        ('true', '"rdp"', '[8, 16]')
    """
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def dumps(config: dict) -> str:
    """The config as TOML text (round-trips through `resolve`)."""
    value = toml_value

    lines = []
    for section, table in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value(v)}" for key, v in table.items()]
        lines.append("")
    return "\n".join(lines)
