"""The model a run releases, as files a user can load, ship and serve: ``<run>/model/``.

``model.json`` says what the weights are (architecture, or the user's import path), what they
read (the input spec, label names, the preprocessing constants), where they come from (round,
config digest, Plateau, Flower and torch versions, how the round was selected) and under which
privacy guarantee they were released (as summary.json states it; ``null`` with the reason where
none holds). The weights are ``model.safetensors`` (plain torch and user models: the whole
state dict), a transformers ``save_pretrained`` folder with LoRA merged into the weights, or,
with ``export-lora='adapters'``, the adapters and head alone, applied to the base model rebuilt
from its source (its digest is checked). ``load_export`` reads it back without the run config;
every file's SHA-256 is in ``model.json`` so a truncated or altered file is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import LOCAL_DATASET, TRANSFORMER_MODELS, ConfigError, RunConfig
from .data import DATASETS, DatasetInfo, InputSpec, dataset_info
from .errors import DataError
from .models import frozen_digest, input_spec, load_travelling, model_from_config
from .silo_data import LocalSpec, local_spec

FORMAT_VERSION = 1
DESCRIPTOR = "model.json"
WEIGHTS = "model.safetensors"
CLASSIFIER = "classifier.safetensors"  # a mean-pooled sentence encoder's head
# the run-config keys the model and the reading of its input depend on: all predict needs
BUILD_KEYS = ("dataset", "model", "mlp-widths", "norm", "model-width", "trainable",
              "trainable-layers", "lora-rank", "lora-alpha", "lora-targets", "max-length",
              "seed", "num-classes", "input-shape", "label-names", "label-column",
              "feature-columns", "categories", "feature-scaling", "feature-mean",
              "feature-std", "text-column", "text-pair-column", "image-column", "image-size",
              "image-channels", "image-mean", "image-std", "export-lora")
LAYOUTS = ("torch", "transformers", "adapters")
# every key of model.json and what it means (docs/outputs.md is made from these; a test checks
# an export has exactly these)
DESCRIPTOR_KEYS: dict[str, str] = {
    "format_version": f"the export format ({FORMAT_VERSION}); predict refuses a newer one",
    "created": "when it was written (UTC)",
    "run_name": "the run it comes from",
    "round": "the round whose model it is",
    "architecture": "model name, layout ('torch': model.safetensors holds the state dict; "
                    "'transformers': a save_pretrained folder, LoRA merged; 'adapters': the "
                    "adapters and head, with the base model's digest), class, parameter count, "
                    "widths or the user's import path, LoRA settings",
    "input": "what one example is: kind, shape, label column, feature columns and categories, "
             "image column, size, channels, mean and std, or text columns and max-length",
    "num_classes": "the number of classes",
    "label_names": "class names by id (null: integer labels)",
    "preprocessing": "tabular feature scaling: 'none', 'given' (with its constants) or 'silo' "
                     "(each silo's own statistics; predict uses the file's own)",
    "selection": "how the round was chosen: keep-best, the metric and its value, and whether "
                 "choosing it is post-processing of what epsilon covers",
    "privacy": "the release's guarantee as summary.json states it: client_level (epsilon, "
               "delta, placement, adjacency, ...), record_level (each silo's epsilon and "
               "delta, adjacency), each null with the reason in why_not; formally_dp",
    "versions": "Plateau, Flower, torch and transformers versions that wrote it",
    "config_digest": "SHA-256 of the run's resolved config",
    "build": "the run-config keys predict rebuilds the model and reads files with",
    "files": "SHA-256 of every other file in the folder (a truncated or altered one is "
             "refused)",
}


class ExportError(DataError):
    """An export that cannot be written or read; the message is one line."""


def layout_of(config: RunConfig) -> str:
    """'torch' (a state dict), 'transformers' (save_pretrained, LoRA merged) or 'adapters'."""
    if config.model not in TRANSFORMER_MODELS or config.user_model:
        return "torch"
    if config.trainable == "lora" and config.export_lora == "adapters":
        return "adapters"
    return "transformers"


def build_keys(config: RunConfig, feature_columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config keys predict rebuilds the model and reads files with: feature-scaling as
    the silos applied it ('auto' resolved), and the feature columns the silos agreed on (a
    file with more columns is then read as the silos' were)."""
    values = config.to_dict()
    keys = {key: values[key] for key in BUILD_KEYS}
    if config.dataset == LOCAL_DATASET:
        keys["feature-scaling"] = local_spec(config).feature_scaling
        if feature_columns and not config.feature_columns:
            keys["feature-columns"] = ",".join(feature_columns)
    return keys


def config_digest(config: RunConfig) -> str:
    """SHA-256 of the whole resolved run config (as in summary.json)."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reading_spec(config: RunConfig) -> LocalSpec:
    """How files are read for this model: the run's own spec for dataset='local'; for a bundled
    dataset its columns, image size, channels and classes."""
    if config.dataset == LOCAL_DATASET:
        return dataclasses.replace(local_spec(config), drop_unusable=False)
    info = DATASETS[config.dataset]
    text = info.text_columns + ("",) * (2 - len(info.text_columns))
    return LocalSpec(label_column=info.label_column, image_column=info.image_column,
                     image_size=info.image_size, image_channels=info.in_channels,
                     text_column=text[0], text_pair_column=text[1],
                     num_classes=info.num_classes, feature_scaling="none")


def _input(config: RunConfig, info: DatasetInfo, spec: LocalSpec) -> dict[str, Any]:
    """model.json's "input": what one example is and how a file is turned into it."""
    described: dict[str, Any] = {"kind": info.kind, "shape": list(info.input_shape),
                                 "label_column": spec.label_column}
    if info.kind == "tabular":
        described |= {"feature_columns": list(spec.feature_columns) or "every column but the "
                      "label, in file order",
                      "categories": {name: list(values) for name, values in spec.categories}}
    elif info.kind == "image":
        described |= {"image_column": spec.image_column, "image_size": info.image_size,
                      "channels": info.in_channels, "mean": list(info.mean),
                      "std": list(info.std), "scale": "pixels / 255, then (x - mean) / std"}
    else:
        described |= {"text_columns": list(info.text_columns), "max_length": config.max_length,
                      "tokenizer": "the tokenizer files in this folder"}
    return described


def _preprocessing(config: RunConfig, spec: LocalSpec, kind: str) -> dict[str, Any]:
    if kind != "tabular":
        return {"feature_scaling": None}
    scaling = spec.feature_scaling
    notes = {"none": "features are used as stored",
             "given": "each numeric feature is standardised with the constants here",
             "silo": "each silo standardised its numeric features with its own mean and std "
                     "(never sent); predict standardises a file with that file's own"}
    return {"feature_scaling": scaling,
            "feature_mean": list(spec.feature_mean) if scaling == "given" else None,
            "feature_std": list(spec.feature_std) if scaling == "given" else None,
            "note": notes[scaling]}


def _architecture(config: RunConfig, model: nn.Module, layout: str) -> dict[str, Any]:
    described: dict[str, Any] = {"model": config.model, "layout": layout,
                                 "class": type(model).__name__,
                                 "parameters": sum(p.numel() for p in model.parameters())}
    if config.user_model:
        described["import_path"] = config.model
    if config.model == "mlp":
        described |= {"widths": [int(w) for w in config.mlp_widths.split(",")],
                      "norm": config.norm}
    elif config.model in ("cnn", "resnet10", "resnet18"):
        described |= {"norm": config.norm, "width": config.model_width or None}
    if config.model in TRANSFORMER_MODELS:
        described["trainable"] = config.trainable
        if config.trainable == "lora":
            described["lora"] = {"rank": config.lora_rank, "alpha": config.lora_alpha,
                                 "targets": config.lora_targets.split(","),
                                 "export": config.export_lora}
    if layout == "adapters":
        described["base_digest"] = frozen_digest(model)
    return described


def _save_transformer(model: nn.Module, folder: Path) -> None:
    """save_pretrained of the inner transformers model, LoRA merged into its weights; a
    mean-pooled sentence encoder saves its encoder so, and its linear head beside it."""
    from safetensors.torch import save_file

    inner = model.net if hasattr(model, "net") else model
    if hasattr(inner, "merge_and_unload"):  # peft
        inner = inner.merge_and_unload()
    if hasattr(inner, "save_pretrained"):
        inner.save_pretrained(folder, safe_serialization=True)
        return
    inner.encoder.save_pretrained(folder, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in inner.classifier.state_dict().items()},
              str(folder / CLASSIFIER))


def write_export(folder: Path, config: RunConfig, state: Mapping[str, torch.Tensor], *,
                 server_round: int, run_name: str, selection: Mapping[str, Any],
                 privacy: Mapping[str, Any],
                 feature_columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write ``folder`` (replaced whole, never half-written) and return model.json;
    ``feature_columns``: the tabular columns the silos agreed on, in order."""
    from safetensors.torch import save_file

    layout = layout_of(config)
    model = model_from_config(config)
    load_travelling(model, {k: v.detach().cpu() for k, v in state.items()})
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if layout == "torch":
        weights = model.state_dict()
    elif layout == "adapters":
        weights = {k: v.detach().cpu() for k, v in state.items()}
    if layout in ("torch", "adapters"):
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()},
                  str(staging / WEIGHTS))
    else:
        _save_transformer(model, staging)
    info = dataset_info(config)
    if info.kind == "text":
        from .hub import load_tokenizer

        load_tokenizer(input_spec(config).tokenizer).save_pretrained(staging)
    spec = reading_spec(RunConfig.from_mapping(build_keys(config, feature_columns)))
    descriptor = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_name": run_name,
        "round": server_round,
        "architecture": _architecture(config, model, layout),
        "input": _input(config, info, spec),
        "num_classes": info.num_classes,
        "label_names": [n for n in config.label_names.split(",") if n] or None,
        "preprocessing": _preprocessing(config, spec, info.kind),
        "selection": dict(selection),
        "privacy": dict(privacy),
        "versions": {"plateau": __version__, "flwr": _package_version("flwr"),
                     "torch": torch.__version__,
                     "transformers": (_package_version("transformers")
                                      if config.model in TRANSFORMER_MODELS else None)},
        "config_digest": config_digest(config),
        "build": build_keys(config, feature_columns),
        "files": {path.name: _sha256(path) for path in sorted(staging.iterdir())},
    }
    (staging / DESCRIPTOR).write_text(json.dumps(descriptor, indent=2) + "\n")
    for path in staging.iterdir():  # safetensors writes 0600: an export is for sharing
        path.chmod(0o644)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return descriptor


@dataclass
class Export:
    """A loaded export: the model (eval mode, CPU), its descriptor, the config it was built
    from, and how files are read for it."""

    model: nn.Module
    descriptor: dict[str, Any]
    config: RunConfig
    spec: LocalSpec
    info: DatasetInfo
    inputs: InputSpec


def read_descriptor(folder: Path) -> dict[str, Any]:
    """model.json, checked: its format version, and every file's SHA-256."""
    path = folder / DESCRIPTOR
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder (expected <results>/<run>/model)")
    if not path.is_file():
        raise ExportError(f"{folder} has no {DESCRIPTOR}: not a Plateau model export")
    try:
        descriptor = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{path} cannot be read as JSON ({type(err).__name__})") from None
    found = descriptor.get("format_version") if isinstance(descriptor, dict) else None
    if not isinstance(found, int) or isinstance(found, bool):
        raise ExportError(f"{path} has no format_version: not a Plateau model export")
    if found > FORMAT_VERSION:
        raise ExportError(f"{path} is export format {found}, newer than this Plateau "
                          f"({__version__}) reads (up to {FORMAT_VERSION}): upgrade Plateau")
    _check_shape(descriptor, path)
    files = descriptor.get("files")
    if not isinstance(files, dict) or not files:
        raise ExportError(f"{path} lists no files")
    for name, expected in files.items():
        file = folder / str(name)
        if not file.is_file():
            raise ExportError(f"{folder} lacks {name}, which {DESCRIPTOR} lists")
        if _sha256(file) != expected:
            raise ExportError(f"{file} is truncated or altered: its SHA-256 differs from the "
                              f"one in {DESCRIPTOR}")
    return descriptor


def _check_shape(descriptor: dict[str, Any], path: Path) -> None:
    """The keys predict reads, of the types it reads them as (model.json is a text file
    anyone may edit: what it says is checked, not trusted)."""
    def bad(key: str, expected: str) -> ExportError:
        return ExportError(f"{path}: {key!r} is missing or not {expected}")

    for key in ("input", "architecture", "build", "files"):
        if not isinstance(descriptor.get(key), dict):
            raise bad(key, "an object")
    for key in ("round", "num_classes"):
        value = descriptor.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(key, "a non-negative integer")
    if not isinstance(descriptor["input"].get("kind"), str) or not isinstance(
            descriptor["input"].get("shape"), list):
        raise bad("input", "an object with a kind and a shape")
    names = descriptor.get("label_names")
    if names is not None and (not isinstance(names, list) or len(names) != descriptor[
            "num_classes"] or not all(isinstance(n, str) for n in names)):
        raise bad("label_names", "null or one name per class")
    if not isinstance(descriptor.get("preprocessing"), dict):
        raise bad("preprocessing", "an object")


def _load_transformer(folder: Path, config: RunConfig, info: DatasetInfo) -> nn.Module:
    from safetensors.torch import load_file

    from .hf import ImageTransformer, MeanPoolClassifier, SequenceClassifier
    from .hub import load_tokenizer, quiet

    quiet()
    if info.kind == "image":
        from transformers import ViTForImageClassification

        return ImageTransformer(ViTForImageClassification.from_pretrained(folder))
    types = "token_type_ids" in load_tokenizer(str(folder)).model_input_names
    if (folder / CLASSIFIER).is_file():
        from transformers import AutoModel

        pooled = MeanPoolClassifier(AutoModel.from_pretrained(folder), info.num_classes)
        pooled.classifier.load_state_dict(load_file(str(folder / CLASSIFIER)))
        return SequenceClassifier(pooled, token_types=types)
    from transformers import AutoModelForSequenceClassification

    net = AutoModelForSequenceClassification.from_pretrained(folder)
    return SequenceClassifier(net, token_types=types)


def load_export(folder: str | Path) -> Export:
    """The exported model, ready to predict, from its folder alone."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder).expanduser().resolve()
    descriptor = read_descriptor(folder)
    try:
        config = RunConfig.from_mapping(descriptor["build"])
    except (KeyError, TypeError, ConfigError) as err:
        raise ExportError(f"{folder / DESCRIPTOR}: its build keys are not a valid model "
                          f"config ({err})") from None
    layout = descriptor.get("architecture", {}).get("layout")
    if layout not in LAYOUTS:
        raise ExportError(f"{folder / DESCRIPTOR}: unknown layout {layout!r}")
    info = dataset_info(config)
    inputs = input_spec(config)
    if info.kind == "text":
        inputs = InputSpec(tokenizer=str(folder), max_length=config.max_length)
    try:
        if layout == "transformers":
            model = _load_transformer(folder, config, info)
        else:
            model = model_from_config(config)
            weights = load_file(str(folder / WEIGHTS))
            if layout == "adapters":
                expected = descriptor["architecture"].get("base_digest")
                if frozen_digest(model) != expected:
                    raise ExportError("the base model rebuilt from its source differs from the "
                                      "one the adapters were trained on (frozen-weight digest "
                                      f"{frozen_digest(model)} != {expected}): install the same "
                                      "weights and library versions, or export merged")
                load_travelling(model, weights)
            else:
                model.load_state_dict(weights, strict=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ExportError(f"the weights in {folder} cannot be loaded into "
                          f"{descriptor['architecture'].get('model')!r} "
                          f"({type(err).__name__}: {first})") from None
    model.eval()
    return Export(model, descriptor, config, reading_spec(config), info, inputs)
