"""A silo's own data: every format read from real files, the preprocessing, the refusals of bad
data (one line, never a count or a raw value), and the schema check across silos."""

from __future__ import annotations

import io
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord
from PIL import Image
from sklearn.datasets import load_digits

from plateau.silo_data import (
    IMAGE,
    TABULAR,
    TEXT,
    LocalSpec,
    Schema,
    SiloDataError,
    data_stamp,
    detect_format,
    disagreement,
    load_silo,
    local_spec,
    parse_categories,
    resolve_classes,
    silo_path,
)

DIGITS = load_digits()
RECORDS = 300  # digits records a silo holds in these tests
PIXELS = [f"p{i}" for i in range(64)]


def digits_frame(count: int = RECORDS) -> pd.DataFrame:
    frame = pd.DataFrame(DIGITS.data[:count], columns=PIXELS)
    frame["label"] = DIGITS.target[:count]
    return frame


def digit_images(count: int = RECORDS) -> list[Image.Image]:
    return [Image.fromarray((image * 15).astype(np.uint8), "L") for image in DIGITS.images[:count]]


def write_imagefolder(folder: Path, images: list[Image.Image], labels: np.ndarray) -> Path:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        image.save(folder / str(label) / f"{i}.png")
    return folder


def image_dataset(images: list[Image.Image], labels: np.ndarray):
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": images, "label": labels.tolist()},
                                      features=features)


def write(frame: pd.DataFrame, path: Path) -> Path:
    """The frame as the file its suffix names (a folder: save_to_disk)."""
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix in (".jsonl", ".json"):
        frame.to_json(path, orient="records", lines=path.suffix == ".jsonl")
    else:
        import datasets

        datasets.Dataset.from_pandas(frame, preserve_index=False).save_to_disk(str(path))
    return path


NONE = LocalSpec(feature_scaling="none", eval_fraction=0.2)


def sorted_rows(inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    rows = np.concatenate([inputs.reshape(len(labels), -1).astype(np.float64),
                           labels[:, None]], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def test_tabular_formats_give_the_same_arrays(tmp_path: Path) -> None:
    frame = digits_frame()
    loaded = {}
    for name, fmt in (("silo.parquet", "parquet"), ("silo.csv", "csv"), ("silo.jsonl", "jsonl"),
                      ("silo.json", "jsonl"), ("silo", "save_to_disk")):
        path = write(frame, tmp_path / name)
        assert detect_format(path) == fmt
        data = load_silo(path, NONE)
        assert data.schema.format == fmt and data.schema.kind == TABULAR
        assert data.schema.input_shape == (64,)
        assert data.schema.columns == (*((p, "float") for p in PIXELS), ("label", "int"))
        assert data.train.inputs.dtype == np.float32 and data.train.labels.dtype == np.int64
        # each record held out by a keyed hash of its content: about a fifth, the same
        # records whatever the format
        assert data.schema.records + data.schema.eval_records == 300
        assert 40 <= data.schema.eval_records <= 80
        loaded[name] = data
    first = loaded["silo.parquet"]
    for data in loaded.values():
        np.testing.assert_array_equal(data.train.inputs, first.train.inputs)
        np.testing.assert_array_equal(data.held_out.labels, first.held_out.labels)
        assert data.schema.labels == first.schema.labels
    # every record lands in exactly one split, unchanged (feature-scaling='none')
    both = np.concatenate([first.train.inputs, first.held_out.inputs])
    labels = np.concatenate([first.train.labels, first.held_out.labels])
    np.testing.assert_array_equal(sorted_rows(both, labels),
                                  sorted_rows(frame[PIXELS].to_numpy(), frame["label"].to_numpy()))
    assert first.schema.labels == tuple(str(c) for c in range(10))


def test_image_formats_give_the_same_arrays(tmp_path: Path) -> None:
    images, labels = digit_images(), DIGITS.target[:RECORDS]
    folder = write_imagefolder(tmp_path / "folder", images, labels)
    image_dataset(images, labels).to_parquet(str(tmp_path / "images.parquet"))
    image_dataset(images, labels).save_to_disk(str(tmp_path / "saved"))
    spec = LocalSpec(eval_fraction=0)
    expected = sorted_rows(np.stack([np.asarray(i) for i in images]), labels)
    for path, fmt in ((folder, "imagefolder"), (tmp_path / "images.parquet", "parquet"),
                      (tmp_path / "saved", "save_to_disk")):
        data = load_silo(path, spec)
        assert data.schema.format == fmt and data.schema.kind == IMAGE
        assert data.schema.input_shape == (1, 8, 8)
        assert data.schema.columns == (("image", "image"), ("label", "class"))
        assert data.train.inputs.dtype == np.uint8 and data.train.inputs.shape == (RECORDS, 8, 8, 1)
        assert data.held_out.inputs.shape == (0, 8, 8, 1)
        np.testing.assert_array_equal(sorted_rows(data.train.inputs, data.train.labels), expected)
    # encoded images written by another tool (no datasets metadata): {'bytes', 'path'} structs
    import pyarrow as pa
    import pyarrow.parquet as pq

    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    pq.write_table(pa.table({"image": encoded, "label": labels}), tmp_path / "plain.parquet")
    plain = load_silo(tmp_path / "plain.parquet", spec)
    assert plain.schema.kind == IMAGE and plain.schema.columns[-1] == ("label", "int")
    np.testing.assert_array_equal(sorted_rows(plain.train.inputs, plain.train.labels), expected)

    resized = load_silo(folder, LocalSpec(image_size=16, image_channels=3, eval_fraction=0.1))
    assert resized.schema.input_shape == (3, 16, 16)
    assert resized.train.inputs.shape[1:] == (16, 16, 3)


def test_image_columns_renamed_and_single_class_folder(tmp_path: Path) -> None:
    """An image folder's columns take the run's names; a silo holding one class keeps its
    label (datasets drops it by default), and a class folder named 'test' stays a class."""
    images = digit_images(20)
    for i, image in enumerate(images):
        (tmp_path / "test").mkdir(exist_ok=True)
        image.save(tmp_path / "test" / f"{i}.png")
    spec = LocalSpec(image_column="img", label_column="y", label_names=("train", "test"),
                     eval_fraction=0)
    data = load_silo(tmp_path, spec)
    assert data.schema.columns == (("img", "image"), ("y", "class"))
    assert data.schema.labels == ("test",)
    assert set(data.train.labels.tolist()) == {1}
    # class folders named by number keep their number whichever classes a silo holds
    keep = np.isin(DIGITS.target, [3, 7])
    some = write_imagefolder(tmp_path / "some", [
        Image.fromarray((i * 15).astype(np.uint8)) for i in DIGITS.images[keep][:40]],
        DIGITS.target[keep][:40])
    subset = load_silo(some, LocalSpec(eval_fraction=0))
    assert subset.schema.labels == ("3", "7")
    np.testing.assert_array_equal(np.sort(subset.train.labels), np.sort(DIGITS.target[keep][:40]))


def test_text_and_string_labels(tmp_path: Path) -> None:
    frame = pd.DataFrame({"question": [f"is {i} even?" for i in range(40)],
                          "answer": [f"{i} is a number" for i in range(40)],
                          "label": ["yes" if i % 2 == 0 else "no" for i in range(40)]})
    spec = LocalSpec(text_column="question", text_pair_column="answer",
                     label_names=("no", "yes"), eval_fraction=0.25)
    data = load_silo(write(frame, tmp_path / "qa.jsonl"), spec)
    assert data.schema.kind == TEXT and data.schema.input_shape == ()
    assert data.schema.columns == (("question", "string"), ("answer", "string"),
                                   ("label", "string"))
    assert data.schema.labels == ("no", "yes")
    assert data.train.inputs.shape == (30, 2) and data.train.inputs.dtype == object
    for (question, _), label in zip(data.train.inputs, data.train.labels, strict=True):
        assert label == (int(question.split()[1]) % 2 == 0)


def test_silo_path_finds_each_layout(tmp_path: Path) -> None:
    frame = digits_frame(50)
    write(frame, tmp_path / "silo-0.parquet")
    write(frame, tmp_path / "silo-1.csv")
    write(frame, tmp_path / "silo-2.jsonl")
    write(frame, tmp_path / "silo-3.json")
    write(frame, tmp_path / "silo-4")
    write_imagefolder(tmp_path / "silo-5", digit_images(20), DIGITS.target[:20])
    (tmp_path / "silo-6").mkdir()
    write(frame, tmp_path / "silo-6" / "records.csv")
    assert silo_path(tmp_path, 0) == tmp_path / "silo-0.parquet"
    assert silo_path(str(tmp_path), 3) == tmp_path / "silo-3.json"
    assert silo_path(tmp_path, 4) == tmp_path / "silo-4"
    assert silo_path(tmp_path, 6) == tmp_path / "silo-6" / "records.csv"
    formats = [detect_format(silo_path(tmp_path, i)) for i in range(7)]
    assert formats == ["parquet", "csv", "jsonl", "jsonl", "save_to_disk", "imagefolder", "csv"]
    assert detect_format(tmp_path / "silo-6") == "csv"
    assert load_silo(tmp_path / "silo-6", NONE).schema.format == "csv"

    with pytest.raises(SiloDataError, match=r"no data for partition 9: looked for silo-9\.parquet"):
        silo_path(tmp_path, 9)
    write(frame, tmp_path / "silo-7.csv")
    write(frame, tmp_path / "silo-7.parquet")
    with pytest.raises(SiloDataError, match="several data sources for partition 7"):
        silo_path(tmp_path, 7)
    write(frame, tmp_path / "silo-6" / "more.parquet")
    with pytest.raises(SiloDataError, match="several data files"):
        silo_path(tmp_path, 6)
    with pytest.raises(SiloDataError, match="is not a folder"):
        silo_path(tmp_path / "nowhere", 0)
    odd = tmp_path / "site [1]"  # glob characters in a path are taken literally
    odd.mkdir()
    write(frame, odd / "silo-0.csv")
    assert load_silo(silo_path(odd, 0), NONE).schema.records == 40


@pytest.mark.slow
def test_eval_split_is_disjoint_deterministic_and_an_eval_file_replaces_it(tmp_path: Path
                                                                         ) -> None:
    frame = digits_frame()
    frame["row"] = np.arange(RECORDS, dtype=float)  # a feature that names each record
    path = write(frame, tmp_path / "silo.parquet")
    spec = LocalSpec(feature_scaling="none", eval_fraction=0.1, seed=3)

    def rows(split: object) -> set[int]:
        return set(split.inputs[:, -1].astype(int).tolist())  # type: ignore[attr-defined]

    data = load_silo(path, spec)
    train, held = rows(data.train), rows(data.held_out)
    assert 15 <= len(held) <= 45 and not train & held and train | held == set(range(RECORDS))
    again = load_silo(path, LocalSpec(feature_scaling="none", eval_fraction=0.1, seed=3))
    assert rows(again.held_out) == held
    other = load_silo(path, LocalSpec(feature_scaling="none", eval_fraction=0.1, seed=4))
    assert rows(other.held_out) != held

    eval_path = write(frame.iloc[:25], tmp_path / "eval.csv")
    with_file = load_silo(path, spec, eval_path=eval_path)
    assert rows(with_file.train) == set(range(RECORDS)) and rows(with_file.held_out) == set(
        range(25))
    assert (with_file.schema.records, with_file.schema.eval_records) == (RECORDS, 25)
    assert with_file.schema.stamp == data_stamp(path, eval_path)
    wrong = write(frame.drop(columns="row"), tmp_path / "wrong.csv")
    with pytest.raises(SiloDataError, match=r"eval file wrong\.csv .* does not match"):
        load_silo(path, spec, eval_path=wrong)

    none = load_silo(path, LocalSpec(feature_scaling="none", eval_fraction=0))
    assert none.held_out.inputs.shape == (0, 65) and none.schema.eval_records == 0


def test_feature_scaling(tmp_path: Path) -> None:
    path = write(digits_frame(), tmp_path / "silo.parquet")
    raw = load_silo(path, NONE)
    silo = load_silo(path, LocalSpec(eval_fraction=0.2))
    train = silo.train.inputs
    varying = raw.train.inputs.std(axis=0) > 0
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train.std(axis=0)[varying], 1, atol=1e-4)
    np.testing.assert_array_equal(train[:, ~varying], 0)  # constant columns: std taken as 1
    raw_train = raw.train.inputs.astype(np.float64)  # whole numbers: exact in float32
    mean, std = raw_train.mean(axis=0), raw_train.std(axis=0)
    expected = (raw.held_out.inputs - mean) / np.where(std > 0, std, 1)
    np.testing.assert_allclose(silo.held_out.inputs, expected, atol=1e-5)  # train statistics

    given = LocalSpec(feature_scaling="given", feature_mean=tuple(range(64)),
                      feature_std=(2.0,) * 64, eval_fraction=0.2)
    scaled = load_silo(path, given)
    np.testing.assert_allclose(scaled.train.inputs, (raw.train.inputs - np.arange(64)) / 2)
    np.testing.assert_allclose(scaled.held_out.inputs, (raw.held_out.inputs - np.arange(64)) / 2)


def test_categories_are_one_hot_with_an_unknown_bucket(tmp_path: Path) -> None:
    frame = pd.DataFrame({
        "age": [30.0, 40.0, 50.0, 60.0] * 10,
        "city": ["paris", "rome", "oslo", "paris"] * 10,
        "smoker": [True, False, True, False] * 10,
        "grade": [1, 2, 3, 2] * 10,
        "label": [0, 1, 1, 0] * 10,
    })
    spec = LocalSpec(categories=parse_categories("city=paris|rome;grade=1|2"), eval_fraction=0)
    for name in ("silo.parquet", "silo.csv"):
        data = load_silo(write(frame, tmp_path / name), spec)
        assert data.schema.columns == (("age", "float"), ("city", "string"), ("smoker", "bool"),
                                       ("grade", "int"), ("label", "int"))
        assert data.schema.input_shape == (1 + 3 + 1 + 3,)
        first = data.train.inputs[:4]
        np.testing.assert_array_equal(first[:, 1:4], [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
        np.testing.assert_array_equal(first[:, 5:8], [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]])
        np.testing.assert_allclose(data.train.inputs[:, [0, 4]].mean(axis=0), 0, atol=1e-6)
    only = load_silo(tmp_path / "silo.csv",
                     LocalSpec(feature_columns=("grade", "age"), eval_fraction=0,
                               categories=parse_categories("grade=1|2|3")))
    assert only.schema.columns == (("grade", "int"), ("age", "float"), ("label", "int"))
    assert only.train.inputs.shape == (40, 5)


BAD = 137  # records of a bad silo: its count must never appear in a reason
SECRET = 4242.125  # a raw value that must never appear in a reason


def bad_frame(**columns: object) -> pd.DataFrame:
    base = {"age": np.linspace(20, 80, BAD), "weight": np.full(BAD, SECRET),
            "label": np.arange(BAD) % 2}
    return pd.DataFrame({**base, **columns})


def _garbage(path: Path) -> Path:
    path.write_bytes(b"PAR1 this is not parquet " + str(SECRET).encode() * 50)
    return path


def _csv_broken(path: Path) -> Path:
    path.write_text("age,label\n1,0\n2,1,7,8\n" + f"{SECRET},1\n" * BAD)
    return path


def _no_format(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("hello")
    return path


def _dataset_dict(path: Path) -> Path:
    import datasets

    split = datasets.Dataset.from_pandas(bad_frame(), preserve_index=False)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(path))
    return path


def _images(path: Path, sizes: list[tuple[int, int]], modes: list[str],
            classes: tuple[str, str] = ("0", "1")) -> Path:
    for i, (size, mode) in enumerate(zip(sizes, modes, strict=True)):
        (path / classes[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.new(mode, size).save(path / classes[i % 2] / f"{i}.png")
    return path


CASES = {
    "missing path": (lambda p: p / "gone.parquet", LocalSpec(), "does not exist"),
    "corrupt parquet": (lambda p: _garbage(p / "x.parquet"), LocalSpec(),
                        r"x\.parquet cannot be read as parquet"),
    "broken csv": (lambda p: _csv_broken(p / "x.csv"), LocalSpec(), r"cannot be read as csv"),
    "unknown folder": (lambda p: _no_format(p / "x"), LocalSpec(), "in no known format"),
    "dataset dict": (lambda p: _dataset_dict(p / "x"), LocalSpec(),
                     r"no known format \(it holds a DatasetDict: name one split's folder\)"),
    "empty parquet": (lambda p: write(bad_frame().iloc[:0], p / "x.parquet"), LocalSpec(),
                      "x.parquet holds no records"),
    "empty csv": (lambda p: write(bad_frame().iloc[:0], p / "x.csv"), LocalSpec(),
                  "x.csv holds no records"),
    "empty jsonl": (lambda p: write(bad_frame().iloc[:0], p / "x.jsonl"), LocalSpec(),
                    "x.jsonl holds no records"),
    "empty json": (lambda p: write(bad_frame().iloc[:0], p / "x.json"), LocalSpec(),
                   "x.json holds no records"),
    "empty save_to_disk": (lambda p: write(bad_frame().iloc[:0], p / "x"), LocalSpec(),
                           "x holds no records"),
    "no training record": (lambda p: write(bad_frame().iloc[:1], p / "x.parquet"),
                           LocalSpec(eval_fraction=0.999), "leaves x.parquet no training record"),
    "no label column": (lambda p: write(bad_frame(), p / "x.csv"), LocalSpec(label_column="y"),
                        r"no label column 'y'; its columns: 'age', 'weight', 'label'"),
    "missing feature": (lambda p: write(bad_frame(), p / "x.csv"),
                        LocalSpec(feature_columns=("age", "height")),
                        r"no feature column 'height'"),
    "labels outside": (lambda p: write(bad_frame(label=np.arange(BAD) % 3), p / "x.parquet"),
                       LocalSpec(num_classes=2), r"labels \{2\} .* outside the declared classes"),
    "labels not named": (lambda p: write(bad_frame(label=["no", "maybe", "yes"] * 45 + ["no"] * 2,
                                                   ), p / "x.jsonl"),
                         LocalSpec(label_names=("no", "yes")),
                         r"labels \{'maybe'\} .* not among the declared label-names 'no', 'yes'"),
    "string labels": (lambda p: write(bad_frame(label=["no", "yes"] * 68 + ["no"]), p / "x.csv"),
                      LocalSpec(), "are strings: declare label-names"),
    "null labels": (lambda p: write(bad_frame(label=[0.0, None] * 68 + [1.0]), p / "x.parquet"),
                    LocalSpec(), "label column 'label' in x.parquet has missing values"),
    "fractional labels": (lambda p: write(bad_frame(label=np.linspace(0, 1, BAD)), p / "x.csv"),
                          LocalSpec(), "not class ids"),
    "undeclared string": (lambda p: write(bad_frame(city=["paris", "rome"] * 68 + ["oslo"]),
                                          p / "x.parquet"), LocalSpec(),
                          r"column 'city' in x.parquet is string: declare its vocabulary, e\.g\. "
                          r"categories='city=a\|b\|c'"),
    "nan feature": (lambda p: write(bad_frame(age=[np.nan] + [SECRET] * (BAD - 1)),
                                    p / "x.parquet"), LocalSpec(),
                    "column 'age' in x.parquet has missing or non-finite values"),
    "inf feature": (lambda p: write(bad_frame(weight=[np.inf] + [SECRET] * (BAD - 1)),
                                    p / "x.jsonl"), LocalSpec(feature_scaling="none"),
                    "column 'weight' in x.jsonl has missing or non-finite values"),
    "empty csv cell": (lambda p: write(bad_frame(age=[None] + [3] * (BAD - 1)), p / "x.csv"),
                       LocalSpec(), "column 'age' in x.csv has missing or non-finite values"),
    "list column": (lambda p: write(bad_frame(tags=[[1.0, SECRET]] * BAD), p / "x.parquet"),
                    LocalSpec(), "column 'tags' in x.parquet has type list"),
    "given length": (lambda p: write(bad_frame(), p / "x.parquet"),
                     LocalSpec(feature_scaling="given", feature_mean=(0.0,), feature_std=(1.0,)),
                     "feature-mean has 1 values, the data has 2 numeric feature columns"),
    "undeclared category column": (lambda p: write(bad_frame(), p / "x.parquet"),
                                   LocalSpec(categories=(("city", ("a", "b")),)),
                                   "categories declares column 'city'"),
    "text not string": (lambda p: write(bad_frame(), p / "x.parquet"),
                        LocalSpec(text_column="age"), "text column 'age' in x.parquet is float"),
    "mixed sizes": (lambda p: _images(p / "x", [(8, 8)] * 3 + [(6, 4)] * 2, ["L"] * 5),
                    LocalSpec(), r"images in x of mixed sizes \(4x6 and 8x8\): set image-size"),
    "named classes": (lambda p: _images(p / "x", [(8, 8)] * 4, ["L"] * 4, ("cat", "dog")),
                      LocalSpec(), r"labels \{'cat', 'dog'\} in x are strings: declare label-"),
    "mixed modes": (lambda p: _images(p / "x", [(8, 8)] * 5, ["L"] * 3 + ["RGB"] * 2),
                    LocalSpec(), r"mixed colour modes \(L and RGB\): set image-channels"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_refused_with_one_line(tmp_path: Path, case: str) -> None:
    make, spec, reason = CASES[case]
    path = make(tmp_path)
    with pytest.raises(SiloDataError, match=reason) as caught:
        load_silo(path, spec)
    message = str(caught.value)
    assert "\n" not in message and str(BAD) not in message and str(SECRET) not in message
    assert str(BAD - 1) not in message and str(BAD - 2) not in message


def test_data_stamp_sees_every_change(tmp_path: Path) -> None:
    path = write(digits_frame(50), tmp_path / "silo.parquet")
    first = data_stamp(path)
    assert len(first) == 16 and data_stamp(path) == first == data_stamp(path, None)
    write(digits_frame(60), path)
    rewritten = data_stamp(path)
    assert rewritten != first
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1000))
    assert data_stamp(path) != rewritten
    folder = write(digits_frame(50), tmp_path / "saved")
    before = data_stamp(folder)
    (folder / "extra.txt").write_text("x")
    assert data_stamp(folder) != before
    assert data_stamp(path, folder) != data_stamp(folder, path)


def test_load_silo_reads_a_rewritten_file_again(tmp_path: Path) -> None:
    path = write(digits_frame(100), tmp_path / "silo.parquet")
    spec = LocalSpec(num_classes=10, eval_fraction=0.1)
    first = load_silo(path, spec)
    assert load_silo(path, spec) is first  # cached in-process
    changed = digits_frame(100)
    changed["label"] = 7
    write(changed, path)
    second = load_silo(path, spec)
    assert second.schema.labels == ("7",) and set(second.train.labels.tolist()) == {7}
    assert second.schema.stamp != first.schema.stamp


def schema(kind: str = TABULAR, columns: tuple[tuple[str, str], ...] | None = None,
           labels: tuple[str, ...] = ("0", "1"), shape: tuple[int, ...] = (2,)) -> Schema:
    columns = columns or (("age", "float"), ("weight", "float"), ("label", "int"))
    return Schema(kind, columns, labels, shape, 100, 10, "parquet", "0" * 16)


def test_disagreement_names_the_silo_and_the_difference() -> None:
    same = {i: schema() for i in range(3)}
    assert disagreement(same, 2) is None
    mixed = {0: schema(labels=("0",)), 1: schema(labels=("1",)),
             2: schema(columns=(("age", "int"), ("weight", "float"), ("label", "class")))}
    assert disagreement(mixed, 2) is None  # class subsets, int vs float features, int vs class

    typed = {**same, 2: schema(columns=(("age", "string"), ("weight", "float"), ("label", "int")))}
    assert disagreement(typed) == "silo 2: column 'age' is string, silos 0, 1: float"
    missing = {**same, 1: schema(columns=(("weight", "float"), ("label", "int")), shape=(1,))}
    assert disagreement(missing) == "silo 1: has no column 'age' (silos 0, 2 have it)"
    extra = {**same, 2: schema(columns=(("age", "float"), ("weight", "float"), ("zip", "int"),
                                        ("label", "int")), shape=(3,))}
    assert disagreement(extra) == "silo 2: has a column 'zip' (silos 0, 1 do not)"
    order = {**same, 0: schema(columns=(("weight", "float"), ("age", "float"), ("label", "int")))}
    assert disagreement(order).startswith("silo 0: columns in another order")  # type: ignore[union-attr]
    labels = {**same, 1: schema(labels=("0", "1", "7"))}
    assert disagreement(labels, 2) == "silo 1 has labels {0, 1, 7}, the run declares 2 classes"
    named = {i: schema(labels=("no", "yes")) for i in range(2)}
    assert disagreement(named, 2, ("no", "yes")) is None
    named[1] = schema(labels=("maybe", "no"))
    assert disagreement(named, 2, ("no", "yes")) == (
        "silo 1 has labels {'maybe', 'no'}, the run declares label-names 'no', 'yes'")

    image = (("image", "image"), ("label", "class"))
    images = {0: schema(IMAGE, image, shape=(3, 32, 32)),
              1: schema(IMAGE, image, shape=(1, 28, 28)),
              2: schema(IMAGE, image, shape=(1, 28, 28))}
    assert disagreement(images) == "silo 0: images are 3x32x32, silos 1, 2: 1x28x28"
    kinds = {0: schema(IMAGE, image, shape=(1, 8, 8)), 1: schema(),
             2: schema(IMAGE, image, shape=(1, 8, 8))}
    assert disagreement(kinds) == "silo 1 is tabular, silos 0, 2: image"
    tie = {3: schema(IMAGE, image, shape=(1, 8, 8)), 5: schema()}
    assert disagreement(tie) == "silo 5 is tabular, silo 3: image"  # the lowest id is right


def test_schema_record_round_trip() -> None:
    original = Schema(IMAGE, (("image", "image"), ("label", "class")), ("0", "3"), (1, 8, 8),
                      250, 25, "imagefolder", "ab" * 8)
    record = original.to_record(with_counts=True)
    # through Flower; the files' stamp never leaves the silo
    assert "stamp" not in record
    assert Schema.from_record(dict(ConfigRecord(record))) == replace(original, stamp="")
    private = original.to_record(with_counts=False)
    assert "records" not in private and private["eval-records"] == 25
    assert Schema.from_record(private).records == -1
    under_dp = original.to_record(with_counts=False, with_labels=False, with_eval_count=False)
    assert under_dp["labels"] == [] and under_dp["eval-records"] == 0
    assert Schema.from_record(under_dp).labels == ()
    text = Schema(TEXT, (("text", "string"), ("label", "int")), ("0", "1"), (), 9, 0, "csv", "")
    assert Schema.from_record(dict(ConfigRecord(text.to_record(with_counts=True)))) == text

    broken = [{k: v for k, v in record.items() if k != "kind"}, {**record, "kind": "audio"},
              {**record, "eval-records": True}, {**record, "eval-records": -1},
              {**record, "column-types": ["image"]}, {**record, "column-types": ["image", "blob"]},
              {**record, "labels": "0,3"}, {**record, "input-shape": [1, 0, 8]},
              {**record, "records": "250"}, {**record, "format": "xlsx"}, {}]
    for bad in broken:
        with pytest.raises(ValueError, match="schema record"):
            Schema.from_record(bad)


def test_resolve_classes() -> None:
    schemas = {0: schema(labels=("0", "4")), 1: schema(labels=("1", "2"))}
    assert resolve_classes(schemas, LocalSpec()) == 5
    assert resolve_classes(schemas, LocalSpec(num_classes=10)) == 10
    assert resolve_classes({0: schema(labels=("a",))}, LocalSpec(label_names=("a", "b"))) == 2
    with pytest.raises(SiloDataError, match=r"labels are strings.*declare label-names"):
        resolve_classes({0: schema(labels=("no", "yes"))}, LocalSpec())
    with pytest.raises(SiloDataError, match="at least 2"):
        resolve_classes({0: schema(labels=("0",)), 1: schema(labels=("0",))}, LocalSpec())
    with pytest.raises(SiloDataError, match="at least 2"):
        resolve_classes(schemas, LocalSpec(label_names=("only",)))


def test_parse_categories_and_local_spec() -> None:
    assert parse_categories("") == ()
    assert parse_categories("color=red|green|blue; smoker=no|yes;") == (
        ("color", ("red", "green", "blue")), ("smoker", ("no", "yes")))
    for bad, reason in (("=a|b", "names no column"), ("color=", "empty vocabulary"),
                        ("color", "empty vocabulary"), ("c=a||b", "empty or repeated"),
                        ("c=a|a", "empty or repeated"), ("c=a;c=b", "declared twice")):
        with pytest.raises(ValueError, match=reason):
            parse_categories(bad)
    config = SimpleNamespace(
        label_column="y", feature_columns="a,b", categories="b=x|z", feature_scaling="given",
        feature_mean="0.5,1", feature_std="2,3", text_column="", text_pair_column="",
        image_column="image", image_size=0, image_channels=0, label_names="no,yes",
        num_classes=0, dp_enabled=False, record_dp="on")
    # the held-out split is the silo's own (node config), not the run's
    assert local_spec(config) == LocalSpec(  # type: ignore[arg-type]
        label_column="y", feature_columns=("a", "b"), categories=(("b", ("x", "z")),),
        feature_scaling="given", feature_mean=(0.5, 1.0), feature_std=(2.0, 3.0),
        label_names=("no", "yes"), drop_unusable=True)
