"""Datasets, partitions and the per-process cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plateau.config import ConfigError
from plateau.data import (
    DATASETS,
    PartitionSpec,
    client_partition,
    ensure_partitions,
    fashion_mnist_dir,
    held_out_tensors,
    load_splits,
    partition_indices,
)

ROOT = Path(__file__).resolve().parent.parent


def test_digits_split_is_stratified_and_disjoint() -> None:
    train, test = load_splits("digits", 0.2, 0)
    assert len(train.labels) + len(test.labels) == 1797
    assert len(test.labels) == 360
    assert set(np.unique(test.labels)) == set(range(10))
    assert train.inputs.shape[1:] == (8, 8, 1) and train.inputs.max() <= 1.0


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_cover_the_training_split_exactly_once(partitioner: str) -> None:
    labels = load_splits("digits", 0.2, 0)[0].labels
    parts = partition_indices(labels, 20, partitioner, alpha=0.5, classes_per_client=2, seed=0)
    assert len(parts) == 20 and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))
    if partitioner != "pathological":
        assert sorted(joined.tolist()) == list(range(len(labels)))
    else:
        assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_dirichlet_split_is_label_skewed_and_seeded() -> None:
    labels = load_splits("digits", 0.2, 0)[0].labels
    a = partition_indices(labels, 10, "dirichlet", alpha=0.1, classes_per_client=2, seed=3)
    b = partition_indices(labels, 10, "dirichlet", alpha=0.1, classes_per_client=2, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    dominant = [np.bincount(labels[p], minlength=10).max() / len(p) for p in a]
    assert np.mean(dominant) > 0.4  # iid would give ~0.1 per class


def test_client_partition_is_cached_per_process() -> None:
    kwargs = {"test_fraction": 0.2, "seed": 0, "num_partitions": 5, "partition_id": 2,
              "partitioner": "iid", "alpha": 0.5, "classes_per_client": 2}
    first = client_partition("digits", **kwargs)
    assert client_partition("digits", **kwargs) is first
    assert first.x.shape[1:] == (1, 8, 8) and first.x.dtype.is_floating_point
    assert abs(float(first.x.mean())) < 0.3  # normalised with the public constants


def test_partition_id_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(Exception, match=r"partition-id=5 is outside 0\.\.4"):
        client_partition("digits", test_fraction=0.2, seed=0, num_partitions=5, partition_id=5,
                         partitioner="iid", alpha=0.5, classes_per_client=2)


def test_impossible_split_is_a_clear_error() -> None:
    labels = load_splits("digits", 0.2, 0)[0].labels
    with pytest.raises(Exception, match=r"partitioner='pathological' cannot split"):
        partition_indices(labels, 20, "pathological", alpha=0.5, classes_per_client=11, seed=0)


@pytest.mark.skipif(fashion_mnist_dir() is None,
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_reads_the_debian_files() -> None:
    train, test = load_splits("fashion-mnist", 0.2, 0)
    assert train.inputs.shape == (60000, 28, 28, 1) and test.inputs.shape == (10000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    tensors = held_out_tensors("fashion-mnist", test_fraction=0.2, seed=0)
    assert tensors.x.shape == (10000, 1, 28, 28)
    assert abs(float(tensors.x.mean())) < 0.05 and abs(float(tensors.x.std()) - 1) < 0.05


@pytest.mark.slow
def test_hub_dataset_offline_fails_with_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path)}
    code = "from plateau.data import load_splits; load_splits('cifar10', 0.2, 0)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("plateau.errors.DataError: dataset 'cifar10' is fetched from the "
                           "Hugging")
    assert "work offline: 'digits'" in last and "'fashion-mnist'" in last


@pytest.mark.parametrize(("name", "labels"), [("cifar10", ("label",)),
                                              ("cifar100", ("fine_label", "coarse_label"))])
def test_hub_images_load_from_the_hubs_own_columns(tmp_path: Path, name: str,
                                                   labels: tuple[str, ...],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub loader on a local copy with the Hub's schema (images in `img`, CIFAR-100's fine
    label beside its coarse one), written to disk and read back: the right columns become the
    images and labels, and the label range fits the model's class count."""
    import datasets
    from PIL import Image

    from plateau import data

    info = DATASETS[name]
    rng = np.random.default_rng(0)

    def part(n: int) -> datasets.Dataset:
        pixels = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        columns = {"img": [Image.fromarray(p) for p in pixels]}
        columns |= {column: rng.integers(0, 100 if column == "fine_label" else 10, size=n)
                    .tolist() for column in labels}
        return datasets.Dataset.from_dict(columns).cast_column("img", datasets.Image())

    local = datasets.DatasetDict({"train": part(12), info.test_split: part(5)})
    local.save_to_disk(tmp_path / name)
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *args, **kw: datasets.load_from_disk(tmp_path / name))
    train, test = data._load_hub(info)
    assert train.inputs.shape == (12, 32, 32, 3) and train.inputs.dtype == np.uint8
    assert np.array_equal(train.inputs[0], np.asarray(local["train"][0]["img"]))
    assert np.array_equal(train.labels, local["train"][labels[0]])
    assert np.array_equal(test.labels, local[info.test_split][labels[0]])
    assert train.labels.max() < info.num_classes


SPLIT = {"test_fraction": 0.2, "seed": 0, "partitioner": "dirichlet", "alpha": 0.5,
         "classes_per_client": 2}


def spec(num_partitions: int, **overrides: object) -> PartitionSpec:
    values = {**SPLIT, **overrides}
    return PartitionSpec("digits", values["test_fraction"], values["seed"], num_partitions,
                         values["partitioner"], values["alpha"], values["classes_per_client"])


@pytest.mark.slow
def test_the_split_is_computed_once_and_stored(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call writes indices and offsets; a fresh process memory-maps them and a client
    reads exactly its rows of what the partitioner produced."""
    monkeypatch.setenv("PLATEAU_DATA_DIR", str(tmp_path))
    folder = ensure_partitions(spec(7))
    assert folder.parent == tmp_path / "partitions"
    offsets = np.load(folder / "offsets.npy")
    labels = load_splits("digits", 0.2, 0)[0].labels
    expected = partition_indices(labels, 7, "dirichlet", alpha=0.5, classes_per_client=2, seed=0)
    assert np.diff(offsets).tolist() == [len(p) for p in expected]
    stamp = (folder / "indices.npy").stat().st_mtime_ns
    assert ensure_partitions(spec(7)) == folder and (folder / "indices.npy").stat().st_mtime_ns \
        == stamp  # not recomputed
    code = ("import numpy as np; from plateau.data import client_partition; "
            "p = client_partition('digits', test_fraction=0.2, seed=0, num_partitions=7, "
            "partition_id=3, partitioner='dirichlet', alpha=0.5, classes_per_client=2); "
            "print(len(p))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ,
                          "PLATEAU_DATA_DIR": str(tmp_path)}, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
    assert int(proc.stdout.strip()) == len(expected[3])
    assert (folder / "indices.npy").stat().st_mtime_ns == stamp


def test_every_spec_gets_its_own_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLATEAU_DATA_DIR", str(tmp_path))
    folders = {ensure_partitions(spec(5)), ensure_partitions(spec(5, seed=1)),
               ensure_partitions(spec(5, alpha=0.1)), ensure_partitions(spec(6))}
    assert len(folders) == 4


def test_an_infeasible_dirichlet_split_is_a_config_error_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """300 Dirichlet partitions of 1,437 digits, each of at least 1,437 // (4 * 300) = 1
    example, cannot be drawn: one line naming the keys and what would work, from the
    launcher's up-front check (not 10 attempts per client, every round)."""
    from server_app.launcher import check_config

    monkeypatch.setenv("PLATEAU_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"partitioner='dirichlet'.*300 clients.*cannot split "
                       r".*allowed: fewer clients, or a larger dirichlet-alpha, "
                       r"min-partition-size=0, or partitioner='iid'"):
        check_config(ROOT, {}, clients=300)


def test_images_are_stored_decoded_and_memory_mapped(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLATEAU_DATA_DIR", str(tmp_path))
    load_splits.cache_clear()
    try:
        train, test = load_splits("digits", 0.2, 0)
        assert isinstance(train.inputs, np.memmap) and isinstance(test.labels, np.memmap)
        assert len(list((tmp_path / "arrays").rglob("*.npy"))) == 4
    finally:
        load_splits.cache_clear()
