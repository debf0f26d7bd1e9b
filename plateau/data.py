"""Datasets, their split among clients, and the per-process cache that keeps both in memory.

Images are loaded once per process as uint8/float arrays, the training split is divided with a
flwr-datasets partitioner (run on the label column only), and a client's partition is turned into
normalised torch tensors once. A ClientApp call in a long-lived Ray worker therefore reuses them
every round instead of redoing the split.
"""

from __future__ import annotations

import functools
import gzip
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIRS = (
    os.environ.get("PLATEAU_FASHION_MNIST_DIR", ""),
    "/usr/share/datasets/fashion-mnist",
)
OFFLINE_HINT = (
    "datasets that work offline: 'digits' (bundled with scikit-learn) and 'fashion-mnist' "
    "(apt-get install dataset-fashion-mnist)"
)


class DataError(RuntimeError):
    """A dataset that cannot be loaded or split as configured."""


@dataclass(frozen=True)
class DatasetInfo:
    """Shape, classes and normalisation constants of a dataset (public, not data-dependent)."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hub_id: str = ""
    image_column: str = "image"
    label_column: str = "label"


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 1, 8, 10, (0.3053,), (0.3760,)),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,), hub_id="zalando-datasets/fashion_mnist"
    ),
    "cifar10": DatasetInfo(
        "cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        hub_id="uoft-cs/cifar10", image_column="img",
    ),
    "cifar100": DatasetInfo(
        "cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        hub_id="uoft-cs/cifar100", image_column="img", label_column="fine_label",
    ),
}


@dataclass(frozen=True)
class Split:
    """Images as uint8 NHWC (or float in [0, 1]) and integer labels."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Tensors:
    """A normalised split ready for training: NCHW float32 images and int64 labels."""

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


def _load_hub(info: DatasetInfo) -> tuple[Split, Split]:
    """Load a dataset from the Hugging Face Hub, failing with one line when it is unreachable."""
    import datasets

    try:
        dataset = datasets.load_dataset(info.hub_id)
    except Exception as err:  # noqa: BLE001 - any Hub failure gets the same actionable message
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"dataset {info.name!r} is fetched from the Hugging Face Hub ({info.hub_id}) and could "
            f"not be loaded ({reason[:160]}); {OFFLINE_HINT}"
        ) from None

    def split(name: str) -> Split:
        part = dataset[name].with_format("numpy")
        images = np.stack([np.asarray(im, dtype=np.uint8) for im in part[info.image_column]])
        if images.ndim == 3:
            images = images[..., None]
        return Split(images, np.asarray(part[info.label_column], dtype=np.int64))

    return split("train"), split("test")


@functools.lru_cache(maxsize=4)
def load_splits(name: str, test_fraction: float, seed: int) -> tuple[Split, Split]:
    """Train and test split of a dataset, cached for the life of the process."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "digits":
        return _load_digits(test_fraction, seed)
    if name == "fashion-mnist" and (folder := fashion_mnist_dir()) is not None:
        return _load_fashion_mnist_files(folder)
    return _load_hub(DATASETS[name])


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    *,
    alpha: float,
    classes_per_client: int,
    seed: int,
) -> list[np.ndarray]:
    """Split sample indices among clients with the flwr-datasets partitioner of that name."""
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
            min_partition_size=min(10, len(labels) // (2 * num_partitions)), seed=seed,
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
    except ValueError as err:
        raise DataError(
            f"partitioner={partitioner!r} cannot split {len(labels)} samples into "
            f"{num_partitions} partitions: {err}"
        ) from None


def to_tensors(split: Split, info: DatasetInfo, index: np.ndarray | None = None) -> Tensors:
    """Normalise (fixed public constants) and convert NHWC images to NCHW float32 tensors."""
    images = split.images if index is None else split.images[index]
    labels = split.labels if index is None else split.labels[index]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if images.dtype == np.uint8:
        x = x / 255.0
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return Tensors(((x - mean) / std).contiguous(), torch.from_numpy(labels.astype(np.int64)))


@functools.lru_cache(maxsize=8)
def _all_partitions(
    name: str, test_fraction: float, seed: int, num_partitions: int, partitioner: str,
    alpha: float, classes_per_client: int,
) -> tuple[np.ndarray, ...]:
    train, _ = load_splits(name, test_fraction, seed)
    return tuple(
        partition_indices(
            train.labels, num_partitions, partitioner, alpha=alpha,
            classes_per_client=classes_per_client, seed=seed,
        )
    )


@functools.lru_cache(maxsize=512)
def client_partition(
    name: str, *, test_fraction: float, seed: int, num_partitions: int, partition_id: int,
    partitioner: str, alpha: float, classes_per_client: int,
) -> Tensors:
    """One client's training tensors, computed once per process and reused every round."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id={partition_id} is outside 0..{num_partitions - 1}")
    indices = _all_partitions(
        name, test_fraction, seed, num_partitions, partitioner, alpha, classes_per_client
    )
    train, _ = load_splits(name, test_fraction, seed)
    return to_tensors(train, DATASETS[name], indices[partition_id])


@functools.lru_cache(maxsize=4)
def held_out_tensors(name: str, *, test_fraction: float, seed: int) -> Tensors:
    """The held-out test split used for central evaluation."""
    _, test = load_splits(name, test_fraction, seed)
    return to_tensors(test, DATASETS[name])
