"""A silo's own data: read from standard files on its own disk, checked, and fingerprinted.

In cross-silo FL each organisation trains on files only it holds. This module reads them with
Hugging Face ``datasets``' local loaders (Parquet, CSV, JSON lines, a ``save_to_disk`` folder, an
image folder), preprocesses them the same way on every silo (the run config's ``LocalSpec``),
and refuses data it cannot use with a one-line ``SiloDataError``. What the server learns is the
``Schema``: column names and types, label values, input shape and record counts, never a
record; it compares every silo's schema before round 1 (``disagreement``).

Each load converts into a fresh temporary cache that is deleted afterwards: ``datasets``
fingerprints local files by path and mtime only, so a persistent cache would serve a file that
was rewritten with its old mtime (``cp -p``, ``rsync -t``, ``tar``) from its old contents.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import Split, _texts
from .errors import DataError

LOG = logging.getLogger("plateau.silo_data")

if TYPE_CHECKING:
    from datasets import Dataset

    from .config import RunConfig

TABULAR, IMAGE, TEXT = "tabular", "image", "text"
FORMATS = ("save_to_disk", "parquet", "csv", "jsonl", "imagefolder")
FILE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SCALINGS = ("silo", "given", "none")  # LocalSpec's; the run config's 'auto' resolves
COLUMN_TYPES = ("float", "int", "bool", "number", "string", "image", "class")
NUMERIC = ("float", "int", "bool", "number")  # 'number': the type class a silo publishes
# PIL modes read as they are (channels), and those converted to one of them when image-channels=0
MODE_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
MODE_AS = {"1": "L", "P": "RGB", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB",
           "HSV": "RGB", "La": "LA", "RGBa": "RGBA"}
SHOWN = 10  # columns or label values a message lists before '...'


class SiloDataError(DataError):
    """Data a silo cannot use. The message is sent to the server as the reason of a decline:
    it may name columns, types, label values and file names, but never a record count or any
    raw feature value."""


@dataclass(frozen=True)
class LocalSpec:
    """How every silo reads its data: from the run config, hence the same everywhere."""

    label_column: str = "label"
    feature_columns: tuple[str, ...] = ()  # () = every column but the label (tabular)
    categories: tuple[tuple[str, tuple[str, ...]], ...] = ()  # vocabularies of string columns
    feature_scaling: str = "silo"  # 'silo' | 'given' | 'none'
    feature_mean: tuple[float, ...] = ()  # 'given': one per NUMERIC feature column
    feature_std: tuple[float, ...] = ()
    text_column: str = ""  # set => text data
    text_pair_column: str = ""  # optional second text column (sentence pairs)
    image_column: str = "image"
    image_size: int = 0  # > 0: resized to size x size; 0: kept, and all must have one size
    image_channels: int = 0  # 1 -> 'L', 3 -> 'RGB', 0 -> as stored (all must agree)
    label_names: tuple[str, ...] = ()  # string labels: position = class id; () = integers
    num_classes: int = 0  # > 0: labels must lie in 0..num_classes-1
    eval_fraction: float = 0.1  # share of the records held out (when no eval file)
    # under DP: a record with an unusable label or feature is left out on the silo instead of
    # refusing the whole silo (a refusal would tell the server that such a record exists)
    drop_unusable: bool = False
    seed: int = 0


def parse_categories(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """'color=red|green|blue;smoker=no|yes' -> (('color', ('red', 'green', 'blue')),
    ('smoker', ('no', 'yes'))); '' -> (). A bad declaration is a one-line ValueError."""
    parsed: list[tuple[str, tuple[str, ...]]] = []
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        name, sep, vocabulary = (s.strip() for s in item.partition("="))
        values = tuple(v.strip() for v in vocabulary.split("|"))
        if not name:
            raise ValueError(f"categories: {item!r} names no column; expected 'column=a|b|c'")
        if not sep or not vocabulary:
            raise ValueError(f"categories: column {name!r} has an empty vocabulary; expected "
                             f"'{name}=a|b|c'")
        if "" in values or len(set(values)) != len(values):
            raise ValueError(f"categories: column {name!r} has an empty or repeated value in "
                             f"{vocabulary!r}")
        if name in dict(parsed):
            raise ValueError(f"categories: column {name!r} is declared twice")
        parsed.append((name, values))
    return tuple(parsed)


def local_spec(config: RunConfig) -> LocalSpec:
    """The LocalSpec of a run config (dataset='local'); its lists are comma-separated. The
    held-out split is the silo's own (its node config: ``client_app.compute.silo_spec``), and
    under DP a record with an unusable label or feature is left out rather than refused."""

    def names(text: str) -> tuple[str, ...]:
        return tuple(n for n in text.split(",") if n)

    def floats(text: str) -> tuple[float, ...]:
        return tuple(float(v) for v in text.split(",")) if text.strip() else ()

    scaling = config.feature_scaling
    if scaling == "auto":  # per-silo statistics couple every record to the others
        scaling = "none" if config.record_dp == "on" else "silo"
    return LocalSpec(
        label_column=config.label_column, feature_columns=names(config.feature_columns),
        categories=parse_categories(config.categories), feature_scaling=scaling,
        feature_mean=floats(config.feature_mean), feature_std=floats(config.feature_std),
        text_column=config.text_column, text_pair_column=config.text_pair_column,
        image_column=config.image_column, image_size=config.image_size,
        image_channels=config.image_channels, label_names=names(config.label_names),
        num_classes=config.num_classes,
        drop_unusable=config.dp_enabled or config.record_dp == "on",
    )


def _listed(items: list[str] | tuple[str, ...]) -> str:
    """'a', 'b', ... for a message: at most SHOWN items."""
    shown = ", ".join(repr(i) for i in items[:SHOWN])
    return shown + (", ..." if len(items) > SHOWN else "")


def _folder_format(folder: Path) -> str | None:
    """save_to_disk or imagefolder for a folder that is one, else None."""
    if (folder / "dataset_info.json").is_file() or (folder / "state.json").is_file():
        return "save_to_disk"
    for sub in folder.iterdir():
        if sub.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in sub.iterdir()):
            return "imagefolder"
    return None


def _resolve(path: Path) -> Path:
    """A folder that holds exactly one data file (and is no dataset or image folder) stands for
    that file (a DatasetDict's folder holds dataset_dict.json: it stays, and is refused)."""
    if (not path.is_dir() or _folder_format(path) is not None
            or (path / "dataset_dict.json").is_file()):
        return path
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_FORMATS)
    if len(files) > 1:
        raise SiloDataError(f"{path} holds several data files ({_listed([f.name for f in files])})"
                            ": keep one, or name one")
    return files[0] if files else path


def silo_path(data_dir: str | Path, partition_id: int) -> Path:
    """Partition i's file or folder in a simulation's data-dir: silo-<i>.parquet, .csv, .jsonl
    or .json, or a folder silo-<i>/ (save_to_disk, an image folder, or one data file)."""
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise SiloDataError(f"data-dir {folder} is not a folder")
    names = [f"silo-{partition_id}{suffix}" for suffix in FILE_FORMATS] + [f"silo-{partition_id}"]
    found = [folder / n for n in names if (folder / n).exists()]
    if not found:
        raise SiloDataError(f"{folder} holds no data for partition {partition_id}: looked for "
                            f"{', '.join(names[:-1])} and a folder {names[-1]}/")
    if len(found) > 1:
        raise SiloDataError(f"{folder} holds several data sources for partition {partition_id} "
                            f"({', '.join(p.name for p in found)}): keep one")
    return _resolve(found[0])


def detect_format(path: Path) -> str:
    """One of FORMATS: by suffix for a file; by its contents for a folder (dataset_info.json or
    state.json: save_to_disk; sub-folders of images: imagefolder; exactly one data file: that
    file's format)."""
    path = Path(path)
    if not path.exists():
        raise SiloDataError(f"{path} does not exist")
    target = _resolve(path)
    fmt = FILE_FORMATS.get(target.suffix.lower()) if target.is_file() else _folder_format(target)
    if fmt is None:
        hint = (" (it holds a DatasetDict: name one split's folder)"
                if (target / "dataset_dict.json").is_file() else "")
        raise SiloDataError(f"{path} is in no known format{hint}; allowed: a .parquet, .csv, "
                            ".jsonl or .json file, a folder saved with save_to_disk, or an image "
                            "folder (one sub-folder of images per class)")
    return fmt


def data_stamp(*paths: Path | None) -> str:
    """A cheap digest of every file under the paths (relative name, size, mtime, ctime, inode):
    it changes when a file is added, removed, rewritten or touched. None entries are skipped."""
    digest = hashlib.sha256()
    for index, path in enumerate(paths):
        if path is None:
            continue
        root = Path(path)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            name = file.relative_to(root) if root.is_dir() else file.name
            try:
                stat = file.stat()
                # ctime and inode too: a copy that keeps the size and the mtime (cp -p,
                # rsync -t) still changes them
                entry = (f"{index}\0{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0"
                         f"{stat.st_ctime_ns}\0{stat.st_ino}\n")
            except FileNotFoundError:
                entry = f"{index}\0{name}\0absent\n"
            digest.update(entry.encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Schema:
    """A silo's schema fingerprint: what the server compares before round 1. No raw values.

    ``columns`` are the columns the run reads, with their stored types, in the order the model
    reads them, the label last.
    ``labels`` are the label values of the training records: class ids as decimal strings
    (sorted as numbers), or, when label-names are declared, the names (sorted).
    """

    kind: str
    columns: tuple[tuple[str, str], ...]
    labels: tuple[str, ...]
    input_shape: tuple[int, ...]
    records: int
    eval_records: int
    format: str
    stamp: str

    def to_record(self, *, with_counts: bool, with_labels: bool = True,
                  with_eval_count: bool = True,
                  exact_types: bool = True) -> dict[str, str | int | list[str] | list[int]]:
        """Values a Flower ConfigRecord accepts: what the silo publishes of its schema. Each
        ``with_*`` False leaves a function of the records out: the training count (private
        under client-level DP or with a public size), the label set (under any DP: a rare
        label reveals its record), the held-out count (0: the silo declines evaluation). The
        files' stamp never leaves: the silo itself checks it every round. ``exact_types``
        False publishes int, float and bool columns as 'number': CSV infers which from the
        values (one 7.5 among integers makes a float column)."""
        return {
            "kind": self.kind, "columns": [c for c, _ in self.columns],
            "column-types": [t if exact_types or t not in NUMERIC else "number"
                             for _, t in self.columns],
            "labels": list(self.labels) if with_labels else [],
            "input-shape": list(self.input_shape),
            "eval-records": self.eval_records if with_eval_count else 0,
            "format": self.format, **({"records": self.records} if with_counts else {}),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Schema:
        """Inverse of to_record (records=-1 when absent); ValueError on a malformed record (a
        silo may lie or be broken)."""

        def scalar(key: str, kind: type, default: Any = None) -> Any:
            value = record.get(key, default)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"schema record: {key!r} is missing or not {kind.__name__}")
            return value

        def values(key: str, kind: type) -> tuple[Any, ...]:
            value = record.get(key)
            if not isinstance(value, list | tuple) or any(
                    isinstance(v, bool) or not isinstance(v, kind) for v in value):
                raise ValueError(f"schema record: {key!r} is missing or not a list of "
                                 f"{kind.__name__}")
            return tuple(value)

        kind, fmt = scalar("kind", str), scalar("format", str)
        names, types = values("columns", str), values("column-types", str)
        shape = values("input-shape", int)
        records, eval_records = scalar("records", int, -1), scalar("eval-records", int)
        if kind not in (TABULAR, IMAGE, TEXT) or fmt not in FORMATS:
            raise ValueError(f"schema record: unknown kind {kind!r} or format {fmt!r}")
        if not names or len(names) != len(types) or len(set(names)) != len(names):
            raise ValueError("schema record: columns and column-types do not pair up")
        if not set(types) <= set(COLUMN_TYPES):
            raise ValueError(f"schema record: column types {sorted(set(types))} are not all "
                             f"among {', '.join(COLUMN_TYPES)}")
        if any(d < 1 for d in shape) or records < -1 or eval_records < 0:
            raise ValueError("schema record: a negative count or an empty input dimension")
        return cls(kind, tuple(zip(names, types, strict=True)), values("labels", str), shape,
                   records, eval_records, fmt, scalar("stamp", str, ""))


def _who(silos: list[int]) -> str:
    return f"silo {silos[0]}" if len(silos) == 1 else "silos " + ", ".join(map(str, silos))


def _vote(values: Mapping[int, Hashable]) -> tuple[list[int], list[int]] | None:
    """(the first dissenting silos, the majority's silos), or None when all agree; a tie goes
    to the value of the lowest silo id."""
    groups: dict[Hashable, list[int]] = {}
    for silo in sorted(values):
        groups.setdefault(values[silo], []).append(silo)
    if len(groups) == 1:
        return None
    majority = max(groups.values(), key=lambda silos: (len(silos), -silos[0]))
    return min((g for g in groups.values() if g is not majority), key=lambda g: g[0]), majority


def _type_key(column_type: str, label: bool) -> str:
    """What must agree: the feature types int, float and bool are all numbers; the label's
    stored type does not matter (its values are checked against the classes)."""
    if label:
        return "label" if column_type in (*NUMERIC, "class", "string") else column_type
    return "number" if column_type in NUMERIC else column_type


def layout_difference(agreed: Schema, columns: tuple[tuple[str, str], ...], kind: str,
                      name: str) -> str | None:
    """Why a file's columns differ from the agreed schema's (names, order, type classes,
    kind), or None: a file read for the run's model must be read as the silos' were."""
    expected = [c for c, _ in agreed.columns]
    if kind != agreed.kind or [c for c, _ in columns] != expected:
        return (f"{name} ({kind}: {_listed([c for c, _ in columns])}) does not match the "
                f"silos' schema ({agreed.kind}: {_listed(expected)})")
    for position, ((column, mine), (_, theirs)) in enumerate(zip(columns, agreed.columns,
                                                                 strict=True)):
        label = position == len(expected) - 1
        if _type_key(mine, label) != _type_key(theirs, label):
            return f"column {column!r} is {mine} in {name}, {theirs} in the silos' data"
    return None


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _label_set(labels: list[str] | tuple[str, ...]) -> str:
    shown = ", ".join(v if v.isdecimal() else repr(v) for v in labels[:SHOWN])
    return "{" + shown + (", ..." if len(labels) > SHOWN else "") + "}"


def _outside(labels: tuple[str, ...], num_classes: int,
             label_names: tuple[str, ...]) -> str | None:
    """What the run declares, when some labels lie outside it."""
    if label_names:
        if not set(labels) <= set(label_names):
            return f"the run declares label-names {_listed(label_names)}"
    elif num_classes > 0 and not all(v.isdecimal() and int(v) < num_classes for v in labels):
        return f"the run declares {num_classes} classes"
    return None


def disagreement(schemas: Mapping[int, Schema], num_classes: int = 0,
                 label_names: tuple[str, ...] = ()) -> str | None:
    """None when every silo's schema agrees; else one line naming the silo(s) and the first
    difference (kind, column names and order, column types, input shape, then labels outside
    the declared classes). The majority is right. Formats, and which classes a silo holds, may
    differ."""
    silos = sorted(schemas)
    if (split := _vote({s: schemas[s].kind for s in silos})) is not None:
        odd, major = split
        verb = "is" if len(odd) == 1 else "are"
        return (f"{_who(odd)} {verb} {schemas[odd[0]].kind}, {_who(major)}: "
                f"{schemas[major[0]].kind}")
    names = {s: tuple(c for c, _ in schemas[s].columns) for s in silos}
    if (split := _vote(names)) is not None:
        odd, major = split
        mine, theirs = names[odd[0]], names[major[0]]
        has = "has" if len(odd) == 1 else "have"
        if missing := [c for c in theirs if c not in mine]:
            holds = "has" if len(major) == 1 else "have"
            return f"{_who(odd)}: {has} no column {missing[0]!r} ({_who(major)} {holds} it)"
        if extra := [c for c in mine if c not in theirs]:
            lack = "does not" if len(major) == 1 else "do not"
            return f"{_who(odd)}: {has} a column {extra[0]!r} ({_who(major)} {lack})"
        return (f"{_who(odd)}: columns in another order ({_listed(mine)}; {_who(major)}: "
                f"{_listed(theirs)}): set feature-columns")
    columns = schemas[silos[0]].columns
    for position, (column, _) in enumerate(columns):
        label = position == len(columns) - 1
        types = {s: schemas[s].columns[position][1] for s in silos}
        if (split := _vote({s: _type_key(t, label) for s, t in types.items()})) is not None:
            odd, major = split
            return (f"{_who(odd)}: column {column!r} is {types[odd[0]]}, {_who(major)}: "
                    f"{types[major[0]]}")
    if (split := _vote({s: schemas[s].input_shape for s in silos})) is not None:
        odd, major = split
        mine, theirs = schemas[odd[0]].input_shape, schemas[major[0]].input_shape
        if schemas[odd[0]].kind == IMAGE:
            return f"{_who(odd)}: images are {_shape(mine)}, {_who(major)}: {_shape(theirs)}"
        return f"{_who(odd)}: input shape {_shape(mine)}, {_who(major)}: {_shape(theirs)}"
    for silo in silos:
        if (declared := _outside(schemas[silo].labels, num_classes, label_names)) is not None:
            return f"silo {silo} has labels {_label_set(schemas[silo].labels)}, {declared}"
    return None


def resolve_classes(schemas: Mapping[int, Schema], spec: LocalSpec) -> int:
    """The number of classes: declared (num-classes, or the label-names), else one more than
    the largest integer label any silo holds. A classifier needs at least 2."""
    if spec.num_classes > 0 or spec.label_names:
        classes = spec.num_classes or len(spec.label_names)
    else:
        labels = sorted({v for s in schemas.values() for v in s.labels})
        if named := [v for v in labels if not v.isdecimal()]:
            raise SiloDataError(f"labels are strings ({_label_set(named)}): declare "
                                "label-names (position = class id)")
        if not labels:
            raise SiloDataError("no silo reports a label: the number of classes is unknown")
        classes = 1 + max(int(v) for v in labels)
    if classes < 2:
        raise SiloDataError(f"the run has {classes} class; a classifier needs at least 2 "
                            "(set num-classes or label-names)")
    return classes


@dataclass(frozen=True)
class SiloData:
    """A silo's training records and its own held-out records (never trained on), with its
    schema. Tabular inputs are float32 (N, F), standardised and one-hot encoded; images uint8
    NHWC; texts an object array (N,) or (N, 2); labels int64 class ids."""

    train: Split
    held_out: Split
    schema: Schema


def _column_type(feature: Any) -> str:
    """'float', 'int', 'bool', 'string', 'image', 'class', or what else it is ('list', ...)."""
    from datasets import ClassLabel, Image, Value

    if isinstance(feature, ClassLabel):
        return "class"
    if isinstance(feature, Image):
        return "image"
    if isinstance(feature, Value):
        dtype = feature.dtype
        if dtype == "bool":
            return "bool"
        if dtype.startswith(("int", "uint")):
            return "int"
        if dtype.startswith("float") or dtype == "double":
            return "float"
        return "string" if dtype in ("string", "large_string") else dtype
    return "struct" if isinstance(feature, dict) else type(feature).__name__.lower()


def _encoded_images(feature: Any) -> bool:
    """Whether a column that is no Image feature holds encoded images: the {'bytes', 'path'}
    structs (or plain bytes) of an Image feature written by another tool."""
    from datasets import Value

    if isinstance(feature, dict):
        return isinstance(feature.get("bytes"), Value) and "binary" in feature["bytes"].dtype
    return isinstance(feature, Value) and "binary" in feature.dtype


def _holds_nothing(path: Path, fmt: str) -> bool:
    """Whether a file datasets could not read holds no records: its loaders fail on those with
    unrelated errors (a header-only CSV: 'Instruction "train" corresponds to no data!', an empty
    JSON lines file: StopIteration, a 0-row Parquet file or save_to_disk folder: ArrowInvalid,
    IndexError)."""
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return pq.read_metadata(path).num_rows == 0
        if fmt == "save_to_disk":
            return not json.loads((path / "state.json").read_text()).get("_data_files", True)
        with path.open("rb") as handle:
            head = handle.read(1 << 16)
    except Exception:  # noqa: BLE001 - unreadable is not empty: the caller says why
        return False
    if fmt == "csv":
        return len([line for line in head.splitlines() if line.strip()]) <= 1
    return head.strip() in (b"", b"[]")


def _read(path: Path, fmt: str, cache: str) -> Dataset:
    """The records of a file or folder; any failure to read it is one line without its
    contents (a parser's message may quote a record)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if fmt == "save_to_disk":  # a Dataset: a DatasetDict's folder is no known format
            return datasets.load_from_disk(str(path))
        if fmt == "imagefolder":
            # explicit files, not data_dir: datasets would take a class folder named 'test' or
            # 'valid' for a split, drop the labels of a single-class silo, and globbing its
            # split-name patterns over thousands of files is 3-6x slower
            return datasets.load_dataset("imagefolder", data_files=glob.escape(str(path)) + "/*/*",
                                         split="train", cache_dir=cache, drop_labels=False)
        return datasets.load_dataset("json" if fmt == "jsonl" else fmt,
                                     data_files=glob.escape(str(path)), split="train",
                                     cache_dir=cache)
    except Exception as err:  # noqa: BLE001 - every reader's failure gets the same line
        if _holds_nothing(path, fmt):
            raise SiloDataError(f"{path.name} holds no records") from None
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
        raise SiloDataError(f"{path.name} cannot be read as {fmt} ({type(cause).__name__})"
                            ) from None


def _check_spec(spec: LocalSpec) -> None:
    """What one spec field alone cannot say (the run config checks most of it already)."""
    if spec.feature_scaling not in SCALINGS:
        raise SiloDataError(f"feature-scaling={spec.feature_scaling!r}; allowed: "
                            f"{', '.join(SCALINGS)}")
    if spec.image_channels not in (0, 1, 3) or spec.image_size < 0:
        raise SiloDataError("image-channels must be 0, 1 or 3, and image-size >= 0")
    if not 0 <= spec.eval_fraction < 1:
        raise SiloDataError(f"eval-fraction={spec.eval_fraction:g} is outside [0, 1)")
    if len(set(spec.label_names)) != len(spec.label_names):
        raise SiloDataError("label-names repeats a name")
    if spec.label_names and spec.num_classes and spec.num_classes != len(spec.label_names):
        raise SiloDataError(f"num-classes={spec.num_classes} with {len(spec.label_names)} "
                            "label-names")
    if spec.text_pair_column and not spec.text_column:
        raise SiloDataError("text-pair-column needs text-column")
    if spec.feature_scaling == "given" and (
            len(spec.feature_mean) != len(spec.feature_std)
            or not all(math.isfinite(s) and s > 0 for s in spec.feature_std)):
        raise SiloDataError("feature-mean and feature-std need one value each per numeric "
                            "feature column, and every std > 0")


def _data_kind(dataset: Dataset, fmt: str, spec: LocalSpec) -> str:
    if spec.text_column:
        return TEXT
    feature = dataset.features.get(spec.image_column)
    if fmt == "imagefolder" or _column_type(feature) == "image" or (
            feature is not None and _encoded_images(feature)):
        return IMAGE
    return TABULAR


def _labels(dataset: Dataset, spec: LocalSpec,
            name: str) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
    """Class ids (int64), the label values the schema lists (one per record), the label
    column's type, and which records have a usable label (all, unless ``drop_unusable``:
    otherwise an unusable label refuses the silo)."""
    column = spec.label_column
    if column not in dataset.column_names:
        raise SiloDataError(f"{name} has no label column {column!r}; its columns: "
                            f"{_listed(dataset.column_names)}")
    feature = dataset.features[column]
    kind = _column_type(feature)
    values = dataset.with_format("arrow")[column]
    valid = ~np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)

    def refuse_unless_dropped(bad: np.ndarray, reason: str) -> None:
        nonlocal valid
        if bad.any() and not spec.drop_unusable:
            raise SiloDataError(reason)
        valid &= ~bad

    if not valid.all() and not spec.drop_unusable:
        raise SiloDataError(f"label column {column!r} in {name} has missing values")
    if kind in ("class", "string"):
        raw = values.to_pylist() if kind == "string" else [
            None if v is None else feature.names[v] for v in values.to_pylist()]
        texts = np.asarray(["" if v is None else str(v) for v in raw], dtype=object)
        present = sorted(set(texts[valid]))
        if spec.label_names:
            known = np.asarray([v in spec.label_names for v in texts], dtype=bool)
            unknown = [v for v in present if v not in spec.label_names]
            refuse_unless_dropped(valid & ~known, f"labels {_label_set(unknown)} in {name} are "
                                  "not among the declared label-names "
                                  f"{_listed(spec.label_names)}")
            index = {n: i for i, n in enumerate(spec.label_names)}
            ids = np.asarray([index.get(v, -1) for v in texts], dtype=np.int64)
        else:
            decimal = np.asarray([v.isdecimal() for v in texts], dtype=bool)
            if not spec.drop_unusable and not decimal[valid].all():
                raise SiloDataError(f"labels {_label_set(present)} in {name} are strings: "
                                    "declare label-names (position = class id)")
            valid &= decimal
            ids = np.asarray([int(v) if d else -1 for v, d in zip(texts, decimal, strict=True)],
                             dtype=np.int64)
    elif kind in NUMERIC:
        numbers = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(numbers) & (numbers == np.round(numbers)) & (numbers >= 0)
        refuse_unless_dropped(valid & ~ok, f"label column {column!r} in {name} holds numbers "
                              "that are not class ids 0, 1, 2, ...")
        ids = np.where(ok, np.nan_to_num(numbers), -1).astype(np.int64)
    else:
        raise SiloDataError(f"label column {column!r} in {name} has type {kind}; expected "
                            "integer class ids or strings")
    classes = spec.num_classes or len(spec.label_names)
    if classes:
        beyond = valid & (ids >= classes)
        outside = [str(i) for i in np.unique(ids[beyond])]
        refuse_unless_dropped(beyond, f"labels {_label_set(outside)} in {name} are outside the "
                              f"declared classes 0..{classes - 1}")
    safe = np.where(valid, ids, 0)
    listed = (np.asarray(spec.label_names, dtype=object)[safe] if spec.label_names
              else safe.astype(str).astype(object))
    return safe, listed, kind, valid


def _category_text(value: Any) -> str:
    """A categorical value as the string the vocabulary is declared in (1.0 -> '1': a CSV
    column of small integers turns float when a cell is empty)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _tabular(dataset: Dataset, spec: LocalSpec, name: str
             ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]], np.ndarray]:
    """Raw features (float64, one-hot blocks included), which of them are numeric (scaled),
    the feature columns with their types, and which records have only finite numbers (all,
    unless ``drop_unusable``: otherwise a missing or non-finite number refuses the silo)."""
    existing = dataset.column_names
    columns = list(spec.feature_columns) or [c for c in existing if c != spec.label_column]
    if missing := [c for c in columns if c not in existing]:
        raise SiloDataError(f"{name} has no feature column {_listed(missing)}; its columns: "
                            f"{_listed(existing)}")
    if spec.label_column in spec.feature_columns or not columns:
        raise SiloDataError(f"{name} has no feature column besides the label "
                            f"{spec.label_column!r}")
    vocabularies = dict(spec.categories)
    if undeclared := [c for c in vocabularies if c not in existing]:
        raise SiloDataError(f"categories declares column {undeclared[0]!r}, which {name} does "
                            f"not have; its columns: {_listed(existing)}")
    table = dataset.with_format("arrow")[:]
    blocks, numeric, described = [], [], []
    finite = np.ones(len(dataset), dtype=bool)
    for column in columns:
        kind = _column_type(dataset.features[column])
        values = table.column(column)
        if kind not in (*NUMERIC, "string", "class"):
            raise SiloDataError(f"column {column!r} in {name} has type {kind}: tabular features "
                                "must be numbers, booleans or declared categories")
        if column in vocabularies:
            vocabulary = {v: i for i, v in enumerate(vocabularies[column])}
            index = [len(vocabulary) if v is None else vocabulary.get(_category_text(v),
                                                                      len(vocabulary))
                     for v in values.to_pylist()]
            blocks.append(np.eye(len(vocabulary) + 1)[index])
            numeric += [False] * (len(vocabulary) + 1)
            described.append((column, kind))
            continue
        if kind == "string":
            raise SiloDataError(f"column {column!r} in {name} is string: declare its vocabulary, "
                                f"e.g. categories='{column}=a|b|c'")
        numbers = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
        usable = np.isfinite(numbers)
        if not usable.all() and not spec.drop_unusable:
            raise SiloDataError(f"column {column!r} in {name} has missing or non-finite values")
        finite &= usable
        blocks.append(np.where(usable, numbers, 0.0)[:, None])
        numeric.append(True)
        described.append((column, kind))
    return np.concatenate(blocks, axis=1), np.asarray(numeric), described, finite


def _images(dataset: Dataset, spec: LocalSpec, name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images, converted to the declared channels and size; without them, every
    image must share one mode and one size. With ``drop_unusable`` (DP) an image that is
    missing, cannot be decoded or differs from the most common size and mode is left out
    instead (the second value says which records are kept)."""
    from datasets import Image as ImageFeature
    from PIL import Image

    column = spec.image_column
    if column not in dataset.column_names:
        raise SiloDataError(f"{name} has no image column {column!r}; its columns: "
                            f"{_listed(dataset.column_names)}")
    if _column_type(dataset.features[column]) != "image":
        dataset = dataset.cast_column(column, ImageFeature())
    target = {1: "L", 3: "RGB"}.get(spec.image_channels)
    arrays: list[np.ndarray | None] = []
    try:
        for image in dataset.with_format(None)[column]:
            if image is None:
                if not spec.drop_unusable:
                    raise SiloDataError(f"image column {column!r} in {name} has missing images")
                arrays.append(None)
                continue
            mode = target or MODE_AS.get(image.mode, image.mode)
            if mode not in MODE_CHANNELS:
                raise SiloDataError(f"images in {name} have mode {image.mode!r}, not 8-bit: set "
                                    "image-channels to 1 or 3 to convert them")
            image = image.convert(mode) if image.mode != mode else image
            if spec.image_size and image.size != (spec.image_size, spec.image_size):
                image = image.resize((spec.image_size, spec.image_size),
                                     Image.Resampling.BILINEAR)
            arrays.append(np.asarray(image, dtype=np.uint8).reshape(
                image.height, image.width, MODE_CHANNELS[mode]))
    except SiloDataError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder's failure gets the same line
        raise SiloDataError(f"an image in {name} cannot be decoded ({type(err).__name__})"
                            ) from None
    shapes = [a.shape for a in arrays if a is not None]
    if not shapes:
        raise SiloDataError(f"{name} holds no usable image")
    if len(set(shapes)) > 1 and not spec.drop_unusable:
        if len(channels := {s[2] for s in shapes}) > 1:
            names = {count: mode for mode, count in MODE_CHANNELS.items()}
            shown = " and ".join(sorted(names[c] for c in channels))
            raise SiloDataError(f"images in {name} of mixed colour modes ({shown}): set "
                                "image-channels to 1 or 3 to convert them")
        shown = " and ".join(f"{h}x{w}" for h, w, _ in sorted(set(shapes))[:2])
        raise SiloDataError(f"images in {name} of mixed sizes ({shown}): set image-size to "
                            "resize them")
    common = max(set(shapes), key=lambda shape: (shapes.count(shape), shape))
    kept = np.asarray([a is not None and a.shape == common for a in arrays], dtype=bool)
    return np.stack([a for a, keep in zip(arrays, kept, strict=True) if keep]), kept


def _texts_of(dataset: Dataset, spec: LocalSpec, name: str) -> np.ndarray:
    columns = [c for c in (spec.text_column, spec.text_pair_column) if c]
    texts = []
    for column in columns:
        if column not in dataset.column_names:
            raise SiloDataError(f"{name} has no text column {column!r}; its columns: "
                                f"{_listed(dataset.column_names)}")
        if (kind := _column_type(dataset.features[column])) != "string":
            raise SiloDataError(f"text column {column!r} in {name} is {kind}, not string")
        values = dataset.with_format("arrow")[column]
        if values.null_count:
            raise SiloDataError(f"text column {column!r} in {name} has missing values")
        texts.append(values.to_pylist())
    return _texts(texts)


@dataclass(frozen=True)
class _Records:
    """One file's records, preprocessed up to scaling."""

    kind: str
    inputs: np.ndarray
    ids: np.ndarray
    listed: np.ndarray  # the label values the schema lists
    columns: tuple[tuple[str, str], ...]
    numeric: np.ndarray  # tabular: which input columns are scaled
    fmt: str


def _records(path: Path, spec: LocalSpec, cache: str, *, labelled: bool = True) -> _Records:
    """One file's records; with ``labelled`` False a file without the label column is read
    too (its ids are -1 and its columns end without a label)."""
    fmt = detect_format(path)
    dataset = _read(path, fmt, cache)
    name = path.name
    if fmt == "imagefolder":  # its columns are always 'image' and 'label'
        dataset = dataset.rename_columns({c: new for c, new in (
            ("image", spec.image_column), ("label", spec.label_column)) if c != new})
    if len(dataset) == 0:
        raise SiloDataError(f"{name} holds no records")
    kind = _data_kind(dataset, fmt, spec)
    if labelled or spec.label_column in dataset.column_names:
        ids, listed, label_type, valid = _labels(dataset, spec, name)
    else:
        ids = np.full(len(dataset), -1, dtype=np.int64)
        listed, label_type = ids.astype(str).astype(object), ""
        valid = np.ones(len(dataset), dtype=bool)
    numeric = np.zeros(0, dtype=bool)
    if kind == TEXT:
        inputs = _texts_of(dataset, spec, name)
        described = [(c, "string") for c in (spec.text_column, spec.text_pair_column) if c]
    elif kind == IMAGE:
        inputs, usable = _images(dataset, spec, name)
        ids, listed, valid = ids[usable], listed[usable], valid[usable]
        described = [(spec.image_column, "image")]
    else:
        inputs, numeric, described, finite = _tabular(dataset, spec, name)
        valid &= finite
    if not valid.all():  # drop_unusable: left out here, counted only in the silo's own log
        LOG.warning("%s: %d records with an unusable label or feature left out", name,
                    int((~valid).sum()))
        if not valid.any():
            raise SiloDataError(f"{name} holds no usable record")
        inputs, ids, listed = inputs[valid], ids[valid], listed[valid]
    label = ((spec.label_column, label_type),) if label_type else ()
    return _Records(kind, inputs, ids, listed, (*described, *label), numeric, fmt)


def _input_shape(records: _Records) -> tuple[int, ...]:
    if records.kind == TABULAR:
        return (records.inputs.shape[1],)
    if records.kind == IMAGE:
        height, width, channels = records.inputs.shape[1:]
        return (channels, height, width)
    return ()


def _same_layout(train: _Records, held: _Records, train_name: str, held_name: str) -> None:
    """An eval file must be read exactly like the training data."""
    names = [c for c, _ in train.columns]
    if held.kind != train.kind or [c for c, _ in held.columns] != names:
        raise SiloDataError(f"eval file {held_name} ({held.kind}: "
                            f"{_listed([c for c, _ in held.columns])}) does not match "
                            f"{train_name} ({train.kind}: {_listed(names)})")
    for position, ((column, mine), (_, theirs)) in enumerate(zip(train.columns, held.columns,
                                                                 strict=True)):
        label = position == len(names) - 1
        if _type_key(mine, label) != _type_key(theirs, label):
            raise SiloDataError(f"column {column!r} is {theirs} in eval file {held_name}, "
                                f"{mine} in {train_name}")
    if _input_shape(held) != _input_shape(train):
        raise SiloDataError(f"eval file {held_name} gives inputs of shape "
                            f"{_shape(_input_shape(held))}, {train_name} "
                            f"{_shape(_input_shape(train))}")


def _sorted_labels(values: np.ndarray) -> tuple[str, ...]:
    present = {str(v) for v in values}
    return tuple(sorted(present, key=lambda v: (int(v), v) if v.isdecimal() else (-1, v)))


def _scaled(train: np.ndarray, held: np.ndarray, numeric: np.ndarray,
            spec: LocalSpec) -> tuple[np.ndarray, np.ndarray]:
    """Numeric features standardised (one-hot blocks untouched), as float32."""
    mean, std = np.zeros(train.shape[1]), np.ones(train.shape[1])
    if spec.feature_scaling == "silo":
        mean[numeric] = train[:, numeric].mean(axis=0)
        spread = train[:, numeric].std(axis=0)
        std[numeric] = np.where(spread > 0, spread, 1.0)
    elif spec.feature_scaling == "given":
        if len(spec.feature_mean) != int(numeric.sum()):
            raise SiloDataError(f"feature-mean has {len(spec.feature_mean)} values, the data "
                                f"has {int(numeric.sum())} numeric feature columns")
        mean[numeric], std[numeric] = spec.feature_mean, spec.feature_std
    return (((train - mean) / std).astype(np.float32), ((held - mean) / std).astype(np.float32))


def load_silo(path: str | Path, spec: LocalSpec, *, eval_path: str | Path | None = None
              ) -> SiloData:
    """Load and check one silo's data. With eval_path, that file (any format, the same schema)
    is the held-out set and all of `path` is trained on; else eval_fraction of the records are
    held out, drawn from the 'silo-eval-split' stream. Cached in-process by (path, eval path,
    spec, data_stamp): a changed file is read again. The arrays are shared: do not modify."""
    source = Path(path).expanduser().resolve()
    held = None if eval_path is None else Path(eval_path).expanduser().resolve()
    for file in (source, held):
        if file is not None and not file.exists():
            raise SiloDataError(f"{file} does not exist")
    source = _resolve(source)
    held = None if held is None else _resolve(held)
    return _load(source, held, spec, data_stamp(source, held))


def held_out_mask(inputs: np.ndarray, ids: np.ndarray, fraction: float,
                  seed: int) -> np.ndarray:
    """Which records a silo holds out: each by a keyed hash of its own content (and label)
    below ``fraction``. A record's side depends on nothing else, so adding or removing another
    record moves no record between the held-out and the training set (a permutation of the
    count would: under add/remove accounting the training set must change by one record), and
    identical records fall on one side."""
    if fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    key = f"plateau-silo-eval-split\0{seed}\0".encode()
    threshold = int(fraction * 2**64)
    held = np.empty(len(ids), dtype=bool)
    for i, (row, label) in enumerate(zip(inputs, ids, strict=True)):
        content = (np.ascontiguousarray(row).tobytes() if inputs.dtype != object
                   else "\0".join(map(str, np.atleast_1d(row))).encode())
        digest = hashlib.blake2b(content + b"\0" + str(int(label)).encode(), key=key[:64],
                                 digest_size=8).digest()
        held[i] = int.from_bytes(digest, "big") < threshold
    return held


@functools.lru_cache(maxsize=8)
def _load(path: Path, eval_path: Path | None, spec: LocalSpec, stamp: str) -> SiloData:
    _check_spec(spec)
    with tempfile.TemporaryDirectory(prefix="plateau-silo-") as cache:
        records = _records(path, spec, cache)
        count = len(records.ids)
        if eval_path is not None:
            held = _records(eval_path, spec, cache)
            _same_layout(records, held, path.name, eval_path.name)
            kept = np.arange(count)
            held_inputs, held_ids = held.inputs, held.ids
        else:
            held_mask = held_out_mask(records.inputs, records.ids, spec.eval_fraction, spec.seed)
            if held_mask.all():
                raise SiloDataError(f"eval-fraction={spec.eval_fraction:g} leaves {path.name} no "
                                    "training record; add records or an eval file")
            kept, chosen = np.flatnonzero(~held_mask), np.flatnonzero(held_mask)
            held_inputs, held_ids = records.inputs[chosen], records.ids[chosen]
    train_inputs = records.inputs[kept]
    if records.kind == TABULAR:
        train_inputs, held_inputs = _scaled(train_inputs, held_inputs, records.numeric, spec)
    schema = Schema(records.kind, records.columns, _sorted_labels(records.listed[kept]),
                    _input_shape(records), len(kept), len(held_ids), records.fmt, stamp)
    return SiloData(Split(train_inputs, records.ids[kept]), Split(held_inputs, held_ids), schema)


@dataclass(frozen=True)
class FileRecords:
    """Every record of one file, in file order, preprocessed as a silo preprocesses its own
    (``feature-scaling='silo'``: with the file's own statistics): the server's test-data and
    the files ``plateau.predict`` reads. ``labelled`` False: the file has no label column and
    the labels are -1."""

    split: Split
    kind: str
    columns: tuple[tuple[str, str], ...]
    input_shape: tuple[int, ...]
    labelled: bool


def read_records(path: str | Path, spec: LocalSpec, *, labelled: bool = True) -> FileRecords:
    """All of a file's records (none held out, none left out: a record that cannot be read
    refuses the file with one line). ``labelled`` False also reads a file without labels."""
    source = Path(path).expanduser().resolve()
    if not source.exists():
        raise SiloDataError(f"{source} does not exist")
    source = _resolve(source)
    spec = dataclasses.replace(spec, eval_fraction=0.0, drop_unusable=False)
    _check_spec(spec)
    with tempfile.TemporaryDirectory(prefix="plateau-file-") as cache:
        records = _records(source, spec, cache, labelled=labelled)
    inputs = records.inputs
    if records.kind == TABULAR:
        inputs, _ = _scaled(inputs, inputs[:0], records.numeric, spec)
    return FileRecords(Split(inputs, records.ids), records.kind, records.columns,
                       _input_shape(records), bool(records.columns[-1][0] == spec.label_column
                                                   and (records.ids >= 0).all()))
