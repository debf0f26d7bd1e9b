"""The run configuration: one schema, validated once, before anything trains.

Every knob of a run is a key of ``[tool.flwr.app.config]`` in ``pyproject.toml`` and can be
overridden with ``flwr run . --run-config "k=v ..."``. This module declares the keys every run
has (type, default, allowed values, meaning); each algorithm declares its own hyper-parameters
as a ``Params`` dataclass in its module (``strategies.registry``), and they join the schema from
there. ``python -m plateau.config --write .`` regenerates ``pyproject.toml``'s table and
``python -m server_app.docs --write .`` docs/config.md from the schema; ``tests/test_config.py``
fails when they are stale.
``RunConfig.from_mapping`` turns a raw mapping into a typed, frozen object or raises
``ConfigError`` with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

ConfigValue = bool | int | float | str


class ConfigError(ValueError):
    """A run-config value that is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class Check:
    """What a key accepts: a closed set of choices, or a numeric range."""

    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    pattern: str | None = None

    def describe(self) -> str:
        """Say in words what is allowed, for the error line."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.pattern is not None:
            return f"a string matching {self.pattern}"
        parts = []
        if self.min is not None:
            parts.append(f"{'>' if self.min_exclusive else '>='} {self.min:g}")
        if self.max is not None:
            parts.append(f"{'<' if self.max_exclusive else '<='} {self.max:g}")
        return " and ".join(parts) if parts else "any value"

    def accepts(self, value: ConfigValue) -> bool:
        """Whether a value of the right type is allowed."""
        if self.choices:
            return value in self.choices
        if self.pattern is not None:
            return re.fullmatch(self.pattern, str(value)) is not None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return True
        if not math.isfinite(value):
            return False
        below = self.min is not None and (
            value < self.min or (self.min_exclusive and value == self.min))
        above = self.max is not None and (
            value > self.max or (self.max_exclusive and value == self.max))
        return not (below or above)


def key(default: ConfigValue, doc: str, **check: Any) -> Any:
    """Declare one run-config key: its default, its meaning and what it accepts."""
    return field(default=default, metadata={"doc": doc, "check": Check(**check)})


@dataclass(frozen=True)
class Params:
    """An algorithm's typed hyper-parameters, declared with ``key`` like the run config's own.

    Field ``gamma`` of a group with ``prefix = "pgn"`` is the run-config key ``pgn-gamma``. A
    group belongs to the algorithm module that declares it; algorithms that share a knob (the
    SAM radius) list the same group. Read one with ``RunConfig.hparams(Group)``.
    """

    prefix: ClassVar[str] = ""

    @classmethod
    def key_fields(cls) -> dict[str, dataclasses.Field[Any]]:
        """Run-config key -> field."""
        return {f"{cls.prefix}-{f.name.rstrip('_').replace('_', '-')}": f
                for f in dataclasses.fields(cls)}


P = TypeVar("P", bound=Params)


@functools.cache
def algorithm_fields() -> dict[str, dataclasses.Field[Any]]:
    """Every algorithm's run-config keys (key -> field), from the table ``make docs`` generates
    from their ``Params`` groups (``plateau/algorithm_keys.py``): the run config validates them
    without importing the algorithms, which sit a floor above it."""
    from plateau.algorithm_keys import KEYS

    return {name: key(default, doc, **check) for name, (default, doc, check) in KEYS.items()}


def algorithm_key_table(fields: Mapping[str, dataclasses.Field[Any]]) -> str:
    """The source of ``plateau/algorithm_keys.py`` for ``fields`` (the registry's keys)."""
    lines = ['"""The algorithms\' run-config keys: (default, meaning, what is allowed) by key.',
             "",
             "Made by `make docs` from each algorithm's ``Params`` groups (strategies/*), so that",
             "the run config validates them without importing the algorithms: do not edit.",
             '"""', "", "KEYS = {"]
    for name, f in fields.items():
        check = {k: v for k, v in dataclasses.asdict(f.metadata["check"]).items()
                 if v != Check.__dataclass_fields__[k].default}
        lines.append(f"    {name!r}: ({f.default!r}, {f.metadata['doc']!r}, {check!r}),")
    return "\n".join([*lines, "}", ""])


IMAGE_DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100")
TEXT_DATASETS = ("rotten-tomatoes", "20newsgroups", "sst2", "mrpc", "qnli", "qqp", "imdb")
DATASETS = IMAGE_DATASETS + TEXT_DATASETS
LOCAL_DATASET = "local"  # each silo's own files (node config `data`, or data-dir in simulation)
PARTITIONERS = ("iid", "dirichlet", "pathological")
IMAGE_MODELS = ("linear", "mlp", "cnn", "resnet10", "resnet18", "vit", "tiny-vit")
TABULAR_MODELS = ("linear", "mlp")
TEXT_MODELS = ("minilm", "tiny-bert", "roberta-base", "distilbert-base-uncased",
               "bert-base-uncased")
MODELS = IMAGE_MODELS + TEXT_MODELS
TRANSFORMER_MODELS = ("vit", "tiny-vit", *TEXT_MODELS)
DP_MODES = ("off", "central", "distributed", "local")
EVALUATION_MODES = ("auto", "central", "federated", "both")
KEEP_BEST = ("last", "central", "federated")
USER_MODEL = r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*"  # 'package.module:function'


@dataclass(frozen=True)
class RunConfig:
    """Typed view of ``[tool.flwr.app.config]``: attribute ``local_steps`` is ``local-steps``."""

    algorithm: str = key("fedavg", "Federated algorithm; see the README section 'Algorithms'.",
                         pattern=r"[a-z0-9-]+")
    num_server_rounds: int = key(20, "Communication rounds T.", min=1)
    sample_rate: float = key(
        0.5, "Fraction q of the clients sampled each round.", min=0, max=1, min_exclusive=True
    )
    min_available_clients: int = key(
        2, "Clients that must be connected before the first round is sampled.", min=1
    )
    local_steps: int = key(
        20, "Local SGD steps K per round, the same for every client and algorithm.", min=1
    )
    batch_size: int = key(32, "Mini-batch size B of a local step.", min=1)
    lr: float = key(0.1, "Local learning rate of round 1.", min=0, min_exclusive=True)
    lr_decay: float = key(
        1.0, "Per-round decay d of the local learning rate: lr_t = lr * d^(t-1).", min=0, max=1,
        min_exclusive=True,
    )
    weight_decay: float = key(1e-3, "L2 weight decay added to every local gradient.", min=0)
    grad_clip: float = key(
        10.0, "Per-step gradient-norm clip for training stability (not DP); 0 = off.", min=0
    )
    dataset: str = key("digits", "Dataset: a bundled one, or 'local' (each silo's own files; "
                       "see README 'Your own data').", choices=(*DATASETS, LOCAL_DATASET))
    data_dir: str = key("", "dataset='local' in simulation: a folder holding one file or folder "
                        "per partition (silo-<i>.parquet, .csv, .jsonl, or silo-<i>/); a "
                        "SuperNode's node config `data` takes precedence.")
    label_column: str = key("label", "dataset='local': the column holding the class.")
    feature_columns: str = key("", "dataset='local', tabular: comma-separated feature columns; "
                               "'' = every column but the label.",
                               pattern=r"([^,]+(,[^,]+)*)?")
    categories: str = key("", "dataset='local', tabular: declared vocabularies of the string "
                          "columns, 'col=a|b|c;col2=x|y' (one-hot, plus one bucket for "
                          "values not declared).")
    feature_scaling: str = key("auto", "dataset='local', tabular: numeric features standardised "
                               "with each silo's own mean and std (computed on the silo, never "
                               "sent: 'silo'), with feature-mean/feature-std ('given'), or not "
                               "at all; 'auto' = 'silo', or 'none' under record-dp (a silo's "
                               "own statistics would couple each record to all the others).",
                               choices=("auto", "silo", "given", "none"))
    feature_mean: str = key("", "feature-scaling='given': comma-separated means, one per "
                            "numeric feature column, in column order.")
    feature_std: str = key("", "feature-scaling='given': comma-separated standard deviations.")
    text_column: str = key("", "dataset='local': the text column (makes the data text).")
    text_pair_column: str = key("", "dataset='local': a second text column (sentence pairs).")
    image_column: str = key("image", "dataset='local': the image column (image folders: "
                            "'image').")
    image_size: int = key(0, "dataset='local': resize every image to this square size; 0 = keep "
                          "(every image must then have one square size).", min=0, max=1024)
    image_channels: int = key(0, "dataset='local': convert images to 1 (grey) or 3 (RGB) "
                              "channels; 0 = as stored.", min=0, max=3)
    image_mean: str = key("0.5", "dataset='local': per-channel normalisation mean (one value, "
                          "or one per channel).")
    image_std: str = key("0.5", "dataset='local': per-channel normalisation std.")
    label_names: str = key("", "dataset='local': comma-separated class names of string labels "
                           "(position = class id); '' = integer labels.")
    num_classes: int = key(0, "dataset='local': the number of classes; 0 = from label-names, "
                           "or one more than the largest label any silo holds.", min=0)
    input_shape: str = key("", "dataset='local': what the model reads, 'F' (tabular features "
                           "after one-hot) or 'CxHxW'; '' = from the silos' agreed schema (the "
                           "server resolves it before round 1).",
                           pattern=r"(\d+(x\d+x\d+)?)?")
    evaluate: str = key("auto", "Where the global model is evaluated: on the server's held-out "
                        "data ('central': a bundled dataset's test split, or with "
                        "dataset='local' the server's own test-data file), by each silo on its "
                        "own held-out records ('federated', dataset='local'), or 'both'; "
                        "'auto' = what the data allows (dataset='local': 'both' with test-data, "
                        "else 'federated').", choices=EVALUATION_MODES)
    evaluate_every: int = key(1, "Federated evaluation every this many rounds (and always "
                              "after the last).", min=1)
    test_data: str = key("", "dataset='local': a file or folder of labelled records that only "
                         "the ServerApp reads (the silos' schema), for central evaluation; "
                         "relative to the ServerApp's working directory.", pattern=r".*")
    keep_best: str = key("last", "Which round's model results/<run>/model/ holds: the last, or "
                         "the best by the 'central' or 'federated' evaluation (federated "
                         "accuracy is computed on the silos' private records: under DP the "
                         "selection is then not covered by epsilon, and model.json says so).",
                         choices=KEEP_BEST)
    export_lora: str = key("merged", "trainable='lora': the exported model has the adapters "
                           "merged into its weights ('merged', a plain transformers model) or "
                           "keeps them apart ('adapters': the adapters and head, applied to "
                           "the base model rebuilt from its source).",
                           choices=("merged", "adapters"))
    partitioner: str = key("dirichlet", "How the training split is divided among clients.",
                           choices=PARTITIONERS)
    dirichlet_alpha: float = key(
        0.5, "Concentration of the Dirichlet label split (smaller = more skewed).", min=0,
        min_exclusive=True,
    )
    classes_per_client: int = key(2, "Classes per client for the pathological split.", min=1)
    min_partition_size: int = key(
        -1, "Dirichlet split: the fewest examples a client may get (flwr-datasets redraws up to "
        "10 times); -1 = min(10, n / (4N)). 0 makes heavy skew with many clients possible "
        "(Fashion-MNIST, 500 clients, alpha 0.1); a client left without data declines.", min=-1)
    test_fraction: float = key(
        0.2, "Held-out test fraction for datasets without an official test split (digits).",
        min=0.05, max=0.5,
    )
    validation_fraction: float = key(
        0.0, "If > 0, hold out this fraction of the training split and evaluate on it instead of "
        "the test split (hyper-parameter tuning never sees the test split); clients train on "
        "the rest.", min=0, max=0.5, max_exclusive=True)
    model: str = key("linear", "Model: softmax regression, a small GroupNorm CNN, a CIFAR-style "
                     "ResNet or a ViT for images; a transformers text classifier for text (see "
                     "'Transformers'), an MLP for tabular data, or your own, "
                     "'package.module:function'. Under DP the noise grows with the released "
                     "coordinates.", pattern=rf"[a-z0-9-]+|{USER_MODEL}")
    mlp_widths: str = key("256,128", "model='mlp': comma-separated hidden widths.",
                          pattern=r"\d+(,\d+)*")
    trainable: str = key(
        "all", "Transformers: what clients train and release: every weight, the task 'head', "
        "the last trainable-layers encoder layers plus head ('top-k'), or LoRA adapters plus "
        "head ('lora'). Frozen weights never travel.", choices=("all", "head", "top-k", "lora"))
    trainable_layers: int = key(2, "trainable='top-k': how many of the last encoder layers "
                                "are trained.", min=1)
    lora_rank: int = key(8, "trainable='lora': rank r of the adapters.", min=1)
    lora_alpha: float = key(16.0, "trainable='lora': scaling alpha (the update is "
                            "alpha/r * B A).", min=0, min_exclusive=True)
    lora_targets: str = key("query,value", "trainable='lora': comma-separated names of the "
                            "modules that get adapters (DistilBERT: 'q_lin,v_lin').",
                            pattern=r"[A-Za-z0-9_.]+(,[A-Za-z0-9_.]+)*")
    max_length: int = key(64, "Text: tokens per example (longer texts are truncated; each "
                          "batch is cut to its longest sequence).", min=8, max=512)
    norm: str = key("group", "Normalisation layers: GroupNorm (no buffers), BatchNorm, or "
                    "none (mlp only).", choices=("group", "batch", "none"))
    model_width: int = key(0, "Base channel width, even (GroupNorm uses 2 groups); 0 = the "
                           "model's default (cnn 32, resnet 64).", min=0, max=4096)
    seed: int = key(0, "Seed of the data split, model init, client sampling and batches "
                    "(never of DP noise or of DP sampling).", min=0, max=2**32 - 1)
    weighting: str = key(
        "equal", "Weights of the client average; 'num-examples' is refused with DP.",
        choices=("equal", "num-examples"),
    )
    dp: str = key("off", "Client-level DP: where the Gaussian noise is added.", choices=DP_MODES)
    clip_norm: float = key(1.0, "C: flat L2 bound on each client's released update.", min=0,
                           min_exclusive=True)
    noise_multiplier: float = key(1.0, "sigma: noise std on the sum is sigma * C.", min=0)
    target_delta: float = key(0.0, "delta of the (epsilon, delta) guarantee; 0 = min(1e-5, "
                              "0.01/N), well below 1/N.", min=0, max=1, max_exclusive=True)
    sampling: str = key(
        "auto", "Client sampling: 'poisson' (each client joins with probability sample-rate; "
        "central DP only), 'fixed' (floor(q*N) without replacement), 'auto' = poisson with "
        "dp='central', fixed otherwise (distributed and local noise shares would reveal a "
        "Poisson cohort's size).",
        choices=("auto", "poisson", "fixed"),
    )
    population_size: int = key(
        0, "N, the clients registered for the federation (deployment); 0 = the nodes connected "
        "when the first round starts (simulation: the number of SuperNodes).", min=0,
    )
    accountant: str = key("rdp", "Privacy accountant: 'rdp' (Renyi DP) or 'pld' (privacy loss "
                          "distributions, tightest; Poisson sampling only).",
                          choices=("rdp", "pld"))
    target_epsilon: float = key(
        0.0, "If > 0, calibrate noise-multiplier to the smallest value keeping epsilon <= this "
        "after num-server-rounds rounds (replaces noise-multiplier); also a cap: the run stops "
        "before a round that would exceed it, even when resumed with more rounds.", min=0,
    )
    max_epsilon: float = key(0.0, "If > 0, stop the run before a round that would take epsilon "
                             "above this budget.", min=0)
    record_dp: str = key(
        "off", "Record-level DP inside each silo (cross-silo): every local step Poisson-samples "
        "the silo's records, clips each record's gradient and adds Gaussian noise (DP-SGD); each "
        "silo accounts for its own epsilon. Combines with dp (client level).",
        choices=("off", "on"))
    record_clip_norm: float = key(1.0, "record-dp: L2 bound on each record's gradient.", min=0,
                                  min_exclusive=True)
    record_noise_multiplier: float = key(
        1.0, "record-dp: noise std on each step's sum of clipped gradients is this * "
        "record-clip-norm (per gradient query).", min=0)
    record_target_epsilon: float = key(
        0.0, "record-dp: if > 0, each silo calibrates its own record-noise-multiplier so that "
        "its epsilon after num-server-rounds rounds of local-steps steps stays <= this; also a "
        "cap (a silo declines a round that would exceed it), except under client-level dp for "
        "a silo without record-public-size, whose declines would reveal its count.", min=0)
    record_delta: float = key(0.0, "record-dp: if > 0, the largest delta the run asks of a "
                              "silo; each silo uses the smaller of this and its own "
                              "(max-record-delta in its node config, default min(1e-5, 0.01/n)); "
                              "0 = each silo's own.", min=0, max=1, max_exclusive=True)
    record_accountant: str = key("rdp", "record-dp: the accountant (Opacus) of silos that declare "
                                 "record-public-size (add/remove): 'rdp' or 'prv' (privacy random "
                                 "variables, tighter); the others account under substitution "
                                 "with dp-accounting's PLD.", choices=("rdp", "prv"))
    record_per_sample: str = key(
        "hooks", "record-dp: how Opacus clips per record: 'hooks' (per-sample gradients, "
        "GradSampleModule) or 'ghost' (ghost clipping: per-sample norms without per-sample "
        "gradients, a second backward pass; less memory for large layers).",
        choices=("hooks", "ghost"))
    audit_canaries: int = key(
        0, "In-run audit: add this many canary clients to the population (sampled like the "
        "others; a random half inserted, the rest held out) and report an empirical lower bound "
        "and an estimate of epsilon beside the accountant's; 0 = off. Needs formal DP.", min=0,
        max=100_000)
    audit_every: int = key(0, "Compute the in-run audit every this many rounds (and at the end); "
                           "0 = at the end only.", min=0)
    dp_clip_mode: str = key(
        "flat", "'flat': one L2 clip to clip-norm (formally DP); 'code': the authors' per-tensor "
        "clip at the client's median tensor norm (NOT DP, no epsilon; needs dp='distributed').",
        choices=("flat", "code"),
    )
    dp_allow_batchnorm: bool = key(
        False, "Allow norm='batch' with DP: BatchNorm statistics are then released without "
        "protection and no guarantee covers them.",
    )
    direction_shrinkage: str = key(
        "off", "DP-FedPGN, FedCM, MoFedSAM, FedLESAM under DP: 'snr' scales the global direction "
        "c_t by the estimated signal fraction of the noisy aggregate D, max(0, 1 - d (s C / m)^2 "
        "/ |D|^2) with s the noise multiplier on the sum, m the cohort and d the released "
        "coordinates (positive-part James-Stein; post-processing, no privacy cost); 'off' = the "
        "papers' rules.", choices=("off", "snr"))
    max_test_examples: int = key(2000, "Central evaluation uses at most this many held-out "
                                 "examples (a fixed random subset); 0 = all.", min=0)
    sharpness_every: int = key(0, "Every this many rounds, measure the global model's SAM "
                               "sharpness and top Hessian eigenvalue; 0 = off.", min=0)
    sharpness_rho: float = key(0.05, "Radius of the SAM-sharpness probe.", min=0,
                               min_exclusive=True)
    sharpness_batch_size: int = key(256, "Held-out examples the flatness probes use.", min=1)
    sharpness_iters: int = key(20, "Power iterations for the top Hessian eigenvalue.", min=1)
    min_replies: int = key(1, "A round with fewer accepted replies than this (of those sampled) "
                           "counts as failed.", min=1)
    max_failed_rounds: int = key(3, "Stop the run after this many failed rounds in a row.",
                                 min=1)
    norm_outlier_factor: float = key(
        0.0, "Without DP, reject updates whose norm exceeds this factor times the round's "
        "median update norm; 0 = off.", min=0,
    )
    metrics_port: int = key(0, "Port of the Prometheus metrics endpoint; 0 = off.", min=0,
                            max=65535)
    metrics_addr: str = key("127.0.0.1", "Address the metrics endpoint binds (0.0.0.0 in "
                            "containers).", pattern=r"[0-9A-Za-z.:\[\]-]+")
    metrics_pushgateway: str = key("", "host:port of a Prometheus Pushgateway to push to after "
                                   "every round; '' = off.", pattern=r"[0-9A-Za-z.:/\[\]-]*")
    metrics_linger: float = key(0.0, "Seconds the metrics endpoint stays up after the last "
                                "round, so a final scrape sees it.", min=0)
    checkpoint_dir: str = key("", "Folder of the run's checkpoint; '' = <results-dir>/<run-name>"
                              "/checkpoint.", pattern=r".*")
    checkpoint: bool = key(True, "Write an atomic checkpoint after every round.")
    run_ledger: str = key("", "Folder of the server's run ledger, outside any results folder: "
                          "how many rounds each DP run has accounted, so that a copied "
                          "checkpoint folder cannot be resumed twice; '' = "
                          "$XDG_STATE_HOME/plateau/runs (~/.local/state/plateau/runs).",
                          pattern=r".*")
    resume: bool = key(False, "Continue run-name from its last checkpoint (also extends a "
                       "finished run to a larger num-server-rounds).")
    device: str = key("auto", "Where tensors live: 'auto' picks CUDA when available.",
                      choices=("auto", "cpu", "cuda"))
    round_timeout: float = key(600.0, "Seconds the server waits for a round's replies.", min=0,
                               min_exclusive=True)
    reply_poll_interval: float = key(0.1, "Longest wait in seconds between the server's looks "
                                     "for replies: it looks after 2 ms, each wait doubling up "
                                     "to this (Flower's own loop waits 3 s on a deployment).",
                                     min=0, min_exclusive=True)
    results_dir: str = key("results", "Folder for rounds.jsonl and summary.json, relative to "
                           "the working directory of the process that runs the ServerApp (the "
                           "checkout for make run; the ServerApp SuperExec's in a deployment).",
                           pattern=r".+")
    run_name: str = key("", "Sub-folder of results-dir; '' = <algorithm>-<dataset>-<time>.",
                        pattern=r"(?!\.+$)[A-Za-z0-9._-]*")

    # every algorithm's hyper-parameters, validated (key -> value; not a key itself)
    algorithm_options: tuple[tuple[str, ConfigValue], ...] = field(default=(), repr=False)

    @classmethod
    def key_fields(cls) -> dict[str, dataclasses.Field[Any]]:
        """The keys every run has (not the algorithms' own): key -> field."""
        return {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)
                if "check" in f.metadata}

    @classmethod
    def from_mapping(cls, raw: Mapping[str, ConfigValue]) -> RunConfig:
        """Validate a flat key -> value mapping (missing keys take their defaults), every
        algorithm's hyper-parameters included."""
        fields, options = cls.key_fields(), algorithm_fields()
        unknown = sorted(set(raw) - set(fields) - set(options))
        if unknown:
            import difflib

            known = sorted({*fields, *options})
            close = difflib.get_close_matches(unknown[0], known, n=3, cutoff=0.75)
            hint = (f"did you mean {' or '.join(repr(k) for k in close)}?" if close else
                    "the keys are listed in docs/config.md (python -m plateau.config --list)")
            raise ConfigError(f"unknown run-config key {unknown[0]!r}; {hint}")
        values = cls._core_values(raw)
        values["algorithm_options"] = tuple(
            (name, _coerce(name, raw.get(name, f.default), type(f.default), f.metadata["check"]))
            for name, f in options.items()
        )
        config = cls(**values)
        config._check_combinations()
        return config

    def hparams(self, kind: type[P]) -> P:
        """The typed hyper-parameters of one group (validated in ``from_mapping``)."""
        options = dict(self.algorithm_options)
        missing = sorted(set(kind.key_fields()) - set(options))
        if missing:
            raise ConfigError(f"this config was read without the algorithm keys ({missing[0]!r} "
                              "missing): use RunConfig.from_mapping or from_record(..., "
                              "algorithm_keys=True)")
        return kind(**{f.name: options[name] for name, f in kind.key_fields().items()})

    def _check_combinations(self) -> None:
        if not re.fullmatch(USER_MODEL, self.model) and self.model not in MODELS:
            raise ConfigError(f"model={self.model!r} is not allowed; expected one of "
                              + ", ".join(repr(m) for m in MODELS)
                              + ", or your own as 'package.module:function'")
        if self.norm == "none" and self.model != "mlp":
            raise ConfigError(f"norm='none' with model={self.model!r}: only the mlp has no "
                              "normalisation layers; allowed: 'group', 'batch'")
        if self.dataset == LOCAL_DATASET:
            self._check_local()
        elif self.evaluate in ("federated", "both"):
            raise ConfigError(f"evaluate={self.evaluate!r} with dataset={self.dataset!r}: the "
                              "clients of a bundled dataset hold no held-out records of their "
                              "own; allowed: 'central' or 'auto' (or dataset='local')")
        elif self.test_data:
            raise ConfigError(f"test-data with dataset={self.dataset!r}: a bundled dataset is "
                              "evaluated on its own test split; allowed: test-data='' (or "
                              "dataset='local')")
        if self.keep_best == "central" and not self.central_evaluation:
            raise ConfigError("keep-best='central' without central evaluation: with "
                              "dataset='local' the server needs test-data=<file>; allowed: "
                              "'last' or 'federated'")
        if self.keep_best == "federated" and not self.federated_evaluation:
            raise ConfigError(f"keep-best='federated' with evaluate={self.evaluate!r} and "
                              f"dataset={self.dataset!r}: no federated evaluation runs; "
                              "allowed: 'last'" + (" or 'central'" if self.central_evaluation
                                                   else ""))
        text_model, text_data = self.model in TEXT_MODELS, self.dataset in TEXT_DATASETS
        if self.dataset == LOCAL_DATASET:
            text_data = bool(self.text_column)
        if not self.user_model and text_model != text_data:
            allowed = TEXT_MODELS if text_data else IMAGE_MODELS
            raise ConfigError(
                f"model={self.model!r} with dataset={self.dataset!r}: "
                f"{'text' if text_data else 'image'} data needs one of "
                + ", ".join(repr(m) for m in allowed)
            )
        if self.trainable != "all" and self.model not in TRANSFORMER_MODELS:
            raise ConfigError(
                f"trainable={self.trainable!r} with model={self.model!r}: partial training is "
                "for transformer models; allowed: 'all', or a model among "
                + ", ".join(repr(m) for m in TRANSFORMER_MODELS)
            )
        if self.dp != "off" and self.weighting != "equal":
            raise ConfigError(
                f"weighting={self.weighting!r} with dp={self.dp!r}: client-level DP needs equal "
                "weights (sample-count weights break the sensitivity bound); allowed: 'equal'"
            )
        if (self.sampling == "poisson" and self.dp in ("distributed", "local")
                and self.dp_clip_mode == "flat"):
            raise ConfigError(
                f"sampling='poisson' with dp={self.dp!r}: the number of noise shares in the "
                "aggregate would reveal how many clients took part, which Poisson amplification "
                "assumes hidden; allowed: sampling='fixed' or 'auto', or dp='central'")
        if (self.accountant == "pld" and self.dp_enabled and self.dp_clip_mode == "flat"
                and self.sampling_method == "fixed"):
            raise ConfigError(f"accountant='pld' with sampling={self.sampling!r} and dp="
                              f"{self.dp!r} (fixed-size cohorts): PLD accounting covers Poisson "
                              "sampling only; allowed: accountant='rdp', or dp='central' with "
                              "sampling='poisson' or 'auto'")
        if (self.dp in ("distributed", "local") and self.noise_multiplier == 0
                and self.target_epsilon == 0 and self.dp_clip_mode == "flat"):
            raise ConfigError(
                f"noise-multiplier=0 with dp={self.dp!r}: clients would have no noise share to "
                "add (and no epsilon would hold); allowed: noise-multiplier > 0, target-epsilon "
                "> 0, or dp='central' for a noiseless clipped baseline")
        for name, value in (("target-epsilon", self.target_epsilon),
                            ("max-epsilon", self.max_epsilon)):
            if value > 0 and (self.dp == "off" or self.dp_clip_mode != "flat"):
                raise ConfigError(f"{name}={value:g} needs a formally DP run; allowed with dp in "
                                  "'central', 'distributed', 'local' and dp-clip-mode='flat'")
        if self.audit_canaries and (self.dp == "off" or self.dp_clip_mode != "flat"
                                    or (self.norm == "batch")):
            raise ConfigError(f"audit-canaries={self.audit_canaries} audits a formally DP run; "
                              "allowed with dp in 'central', 'distributed', 'local', "
                              "dp-clip-mode='flat' and norm='group'")
        if 0 < self.max_epsilon < self.target_epsilon:
            raise ConfigError(f"max-epsilon={self.max_epsilon:g} is below target-epsilon="
                              f"{self.target_epsilon:g}: the run would stop before its last round")
        if self.resume and not self.run_name:
            raise ConfigError("resume=true needs run-name: the run whose checkpoint to continue")
        if self.model_width % 2:
            raise ConfigError(f"model-width={self.model_width} is not allowed; expected an even "
                              "number (GroupNorm splits channels into 2 groups) or 0")
        if self.dp_clip_mode == "code" and self.dp != "distributed":
            raise ConfigError(
                f"dp-clip-mode='code' with dp={self.dp!r}: the authors' per-tensor median clip "
                "comes with per-client noise; allowed: dp='distributed'"
            )
        if self.dp != "off" and self.norm == "batch" and not self.dp_allow_batchnorm:
            raise ConfigError(
                f"norm='batch' with dp={self.dp!r}: BatchNorm running statistics cannot be "
                "clipped or noised; allowed: norm='group', or set dp-allow-batchnorm=true to "
                "release them unprotected"
            )

        if self.record_dp == "on":
            self._check_record_dp()

    def _check_local(self) -> None:
        """What dataset='local' needs that one key alone cannot say."""
        if self.evaluate in ("central", "both") and not self.test_data:
            raise ConfigError(f"evaluate={self.evaluate!r} with dataset='local' needs "
                              "test-data=<file or folder>: otherwise the server holds no data "
                              "to evaluate on; allowed: 'federated' or 'auto'")
        if self.sharpness_every:
            raise ConfigError("sharpness-every with dataset='local': the flatness probes need "
                              "held-out data on the server; allowed: sharpness-every=0")
        for name in ("feature-mean", "feature-std", "image-mean", "image-std"):
            try:
                _floats(getattr(self, name.replace("-", "_")))
            except ValueError:
                raise ConfigError(f"{name}={getattr(self, name.replace('-', '_'))!r} is not "
                                  "allowed; expected comma-separated numbers") from None
        if (self.feature_scaling == "given") != bool(self.feature_mean and self.feature_std):
            raise ConfigError(f"feature-scaling={self.feature_scaling!r} with feature-mean="
                              f"{self.feature_mean!r}, feature-std={self.feature_std!r}: "
                              "'given' needs both lists, the other modes neither")
        if any(s <= 0 for s in _floats(self.feature_std) + _floats(self.image_std)):
            raise ConfigError("feature-std and image-std must be > 0")
        if self.image_channels == 2:
            raise ConfigError("image-channels=2 is not allowed; expected 0 (as stored), 1 or 3")
        names = [n for n in self.label_names.split(",") if n] if self.label_names else []
        if names and len(set(names)) != len(names):
            raise ConfigError(f"label-names={self.label_names!r} repeats a name")
        if names and self.num_classes and self.num_classes != len(names):
            raise ConfigError(f"num-classes={self.num_classes} with {len(names)} label-names: "
                              "they must agree (or leave num-classes=0)")
        if self.record_dp == "on" and self.feature_scaling == "silo":
            raise ConfigError("feature-scaling='silo' with record-dp='on': a silo's own mean "
                              "and std make every record's input depend on all the others, "
                              "which per-record clipping does not bound; allowed: 'given' "
                              "(public constants), 'none' or 'auto'")
        if self.text_column and self.user_model:
            raise ConfigError(f"model={self.model!r} with text-column={self.text_column!r}: "
                              "text is tokenised for the bundled text models; allowed: one of "
                              + ", ".join(repr(m) for m in TEXT_MODELS))
        if self.text_column and self.model in TABULAR_MODELS:
            raise ConfigError(f"model={self.model!r} with text-column={self.text_column!r}: "
                              "text needs one of " + ", ".join(repr(m) for m in TEXT_MODELS))

    @property
    def user_model(self) -> bool:
        """Whether the model is the user's own, 'package.module:function'."""
        return re.fullmatch(USER_MODEL, self.model) is not None

    @property
    def central_evaluation(self) -> bool:
        """Whether the server evaluates on data of its own: a bundled dataset's held-out split,
        or with dataset='local' its test-data file."""
        if self.dataset != LOCAL_DATASET:
            return True
        return bool(self.test_data) and self.evaluate in ("auto", "central", "both")

    @property
    def federated_evaluation(self) -> bool:
        """Whether the silos evaluate the global model on their own held-out records."""
        return self.dataset == LOCAL_DATASET and self.evaluate != "central"

    def _check_record_dp(self) -> None:
        if self.norm == "batch":
            raise ConfigError("record-dp='on' with norm='batch': BatchNorm mixes records of a "
                              "batch (no per-record gradient) and releases their statistics; "
                              "allowed: norm='group'")
        if self.dp_clip_mode != "flat":
            raise ConfigError("record-dp='on' with dp-clip-mode='code': the authors' per-tensor "
                              "median clip is not DP; allowed: dp-clip-mode='flat'")
        if self.weighting != "equal" and self.dp != "off":
            raise ConfigError("record-dp='on' with client-level dp needs weighting='equal'")

    @classmethod
    def keys(cls) -> frozenset[str]:
        """Every run-config key, the algorithms' included."""
        return frozenset(cls.key_fields()) | frozenset(algorithm_fields())

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, algorithm_keys: bool = True) -> RunConfig:
        """Validate the run-config keys of a message's config record, ignoring round scalars.

        ``algorithm_keys=False`` reads only the keys every run has, without importing the
        algorithms (torch): for a process that only checks the node's policy and hands the work
        on. ``hparams`` is then refused.
        """
        if algorithm_keys:
            names = cls.keys()
            return cls.from_mapping({k: v for k, v in record.items() if k in names})
        config = cls(**cls._core_values(record))
        config._check_combinations()
        return config

    @classmethod
    def _core_values(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The keys every run has, checked, by attribute name (missing ones: their default)."""
        return {f.name: _coerce(name, raw.get(name, f.default), type(f.default),
                                f.metadata["check"]) for name, f in cls.key_fields().items()}

    def to_dict(self) -> dict[str, ConfigValue]:
        """The resolved config with its run-config keys, as written to summary.json."""
        return {**{name: getattr(self, f.name) for name, f in self.key_fields().items()},
                **dict(self.algorithm_options)}

    @property
    def sampling_method(self) -> str:
        """'poisson' or 'fixed', with 'auto' resolved (Poisson exactly with central DP)."""
        if self.sampling == "auto":
            return "poisson" if self.dp == "central" else "fixed"
        return self.sampling

    @property
    def dp_enabled(self) -> bool:
        """Whether client updates are clipped and noised."""
        return self.dp != "off"


def _floats(text: str) -> tuple[float, ...]:
    """'0.5,0.25' -> (0.5, 0.25); '' -> ()."""
    return tuple(float(v) for v in text.split(",")) if text.strip() else ()


def _coerce(name: str, value: Any, kind: type, check: Check) -> ConfigValue:
    """Check one value's type and range; ints are accepted where floats are expected."""
    ok_type = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok_type = float(value), True
    if not ok_type:
        raise ConfigError(
            f"{name}={value!r} has type {type(value).__name__}; expected {kind.__name__} "
            f"({check.describe()})"
        )
    if not check.accepts(value):
        raise ConfigError(f"{name}={value!r} is not allowed; expected {check.describe()}")
    return value


def describe_keys() -> list[tuple[str, ConfigValue, str, str]]:
    """(key, default, allowed, meaning) for every key: the run's own in declaration order, then
    the algorithms' by key: the README table."""
    rows = []
    for name, f in [*RunConfig.key_fields().items(), *sorted(algorithm_fields().items())]:
        check: Check = f.metadata["check"]
        allowed = "true / false" if isinstance(f.default, bool) else check.describe()
        rows.append((name, f.default, allowed, f.metadata["doc"]))
    return rows


def toml_value(value: ConfigValue) -> str:
    """A value as it is written in pyproject.toml and on the ``--run-config`` command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and 0 < abs(value) < 1e-3:
        return f"{value:g}".replace("e-0", "e-")
    return repr(value)


def readme_table() -> str:
    """The run-config table of docs/config.md, generated from the schema."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for name, default, allowed, doc in describe_keys():
        lines.append(f"| `{name}` | `{toml_value(default)}` | {allowed} | {doc} |")
    return "\n".join(lines)


def toml_table() -> str:
    """The ``[tool.flwr.app.config]`` body of pyproject.toml, generated from the schema."""
    return "\n".join(f"{name} = {toml_value(default)}" for name, default, _, _ in describe_keys())


def write_docs(root: Path) -> None:
    """Rewrite the config table of pyproject.toml from the schema (docs/config.md: ``python -m
    server_app.docs``)."""
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    start = text.index("[tool.flwr.app.config]\n") + len("[tool.flwr.app.config]\n")
    pyproject.write_text(text[:start] + toml_table() + text[text.index("\n\n", start):])


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"]:
        write_docs(Path(sys.argv[2] if len(sys.argv) > 2 else "."))
    elif sys.argv[1:] == ["--list"]:
        print("\n".join(f"{name} = {toml_value(default)}  # {allowed}"
                        for name, default, allowed, _ in describe_keys()))
    else:
        print(toml_table() if sys.argv[1:] == ["--toml"] else readme_table())

