#!/usr/bin/env python3
"""Example silos for the deployment walkthrough (deploy/README.md, section 4), from a real dataset
that ships with scikit-learn: the 1,797 handwritten digits (8x8 grey images, 10 classes).

    deploy/make-silos.py --out DIR --silos 3 [--format parquet|imagefolder] [--server-test]

writes, for silo i:
    parquet:      DIR/silo-<i>/train.parquet   columns px0..px63 (0..1) and label (0..9)
    imagefolder:  DIR/silo-<i>/train/<label>/<n>.png   8x8 grey PNGs, one folder per class
and with --server-test a fifth of the records, held back from every silo, for the server's
central evaluation (run config test-data): DIR/server/test.parquet, or DIR/server/test/<label>/.

Deterministic: the same arguments write the same records to the same silo (seed 0 shuffles once;
silo i takes every silos-th record from i on). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits

TEST_FRACTION = 0.2


def write(records: pd.DataFrame, folder: Path, fmt: str, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        records.to_parquet(folder / f"{name}.parquet", index=False)
        return
    pixels = records.drop(columns="label").to_numpy().reshape(-1, 8, 8)
    for n, (image, label) in enumerate(zip(pixels, records["label"], strict=True)):
        (folder / name / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(
            folder / name / str(label) / f"{n:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the silos to")
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--format", choices=("parquet", "imagefolder"), default="parquet")
    parser.add_argument("--server-test", action="store_true",
                        help=f"hold back {TEST_FRACTION:.0%} of the records for the server")
    args = parser.parse_args()
    if args.silos < 1:
        parser.error("--silos must be at least 1")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty")
    digits = load_digits()
    table = pd.DataFrame((digits.data / 16).astype("float32"),
                         columns=[f"px{i}" for i in range(64)])
    table["label"] = digits.target.astype("int64")
    table = table.iloc[np.random.default_rng(0).permutation(len(table))].reset_index(drop=True)
    held = round(len(table) * TEST_FRACTION) if args.server_test else 0
    if held:
        write(table.iloc[:held], args.out / "server", args.format, "test")
        print(f"{args.out / 'server'}: {held} records (the server's test data)")
    for i in range(args.silos):
        silo = table.iloc[held + i::args.silos]
        write(silo, args.out / f"silo-{i}", args.format, "train")
        print(f"{args.out / f'silo-{i}'}: {len(silo)} records")


if __name__ == "__main__":
    main()
