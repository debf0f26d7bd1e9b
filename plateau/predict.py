"""Use a run's exported model: ``python -m plateau.predict --model <results>/<run>/model --data
<file or folder> [--output predictions.parquet]``.

Reads the file as the run's silos read theirs (the same formats, columns and preprocessing, from
model.json alone), prints the accuracy when the file has labels, and writes one prediction per
record (in file order) to ``--output`` (without labels ``--output`` is required). The accuracy
is computed exactly as the run's central evaluation computes it: on the server's own test-data
file it is the run's own figure for the exported round. Bad input is one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import prepare
from .errors import DataError
from .export import Export, load_export
from .models import score
from .silo_data import read_records

BATCH = 1024  # as the central evaluation's


@dataclass(frozen=True)
class Prediction:
    """Class ids and their softmax probabilities per record, and the accuracy when the file
    has labels."""

    classes: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray | None
    accuracy: float | None
    loss: float | None


def check_schema(export: Export, columns: tuple[tuple[str, str], ...], kind: str,
                 shape: tuple[int, ...], name: str) -> None:
    """A file must give the input the model reads: its kind and shape."""
    expected = export.descriptor["input"]
    if kind != expected["kind"]:
        raise DataError(f"{name} holds {kind} data ({', '.join(c for c, _ in columns)}); the "
                        f"model reads {expected['kind']} data")
    if kind != "text" and list(shape) != list(expected["shape"]):
        shown = "x".join(map(str, shape))
        raise DataError(f"{name} gives inputs of shape {shown}, the model reads "
                        f"{'x'.join(map(str, expected['shape']))} (another schema: check its "
                        "columns and the model's input in model.json)")


def per_file_scaling(export: Export) -> bool:
    """Whether the model standardises each file with that file's own statistics (as each silo
    did its own): a record's input then depends on the other records of its file."""
    return export.descriptor["preprocessing"].get("feature_scaling") == "silo"


@torch.no_grad()
def predict(export: Export, data: str | Path) -> Prediction:
    """The model's predictions for every record of a file or folder."""
    records = read_records(data, export.spec, labelled=False)
    check_schema(export, records.columns, records.kind, records.input_shape, Path(data).name)
    if per_file_scaling(export) and len(records.split.labels) < 2:
        raise DataError(f"{Path(data).name} holds one record, and this model standardises "
                        "each file with its own mean and std (feature-scaling='silo'): a single "
                        "record cannot be; serve single records with a model trained with "
                        "feature-scaling='given' or 'none'")
    tensors = prepare(records.split, export.info, export.inputs)
    probabilities, classes = [], []
    for start in range(0, len(tensors), BATCH):
        logits = export.model(tensors.x[start:start + BATCH])
        best = torch.softmax(logits.double(), 1).max(1)
        probabilities.append(best.values.numpy())
        classes.append(best.indices.numpy())
    labels, accuracy, loss = None, None, None
    if records.labelled:
        labels = records.split.labels
        correct, loss_sum = score(export.model, tensors.x, tensors.y, BATCH)
        accuracy, loss = correct / len(tensors), loss_sum / len(tensors)
    return Prediction(np.concatenate(classes), np.concatenate(probabilities), labels, accuracy,
                      loss)


def write_predictions(prediction: Prediction, export: Export, output: Path) -> None:
    """One row per record: its position in the file, the predicted class (and its name), the
    probability the model gives it, and the true label where the file has one."""
    import pandas as pd

    table = pd.DataFrame({"record": np.arange(len(prediction.classes)),
                          "prediction": prediction.classes.astype(np.int64),
                          "probability": prediction.probabilities})
    names = export.descriptor.get("label_names")
    if names:
        table.insert(2, "prediction_name", [names[c] for c in prediction.classes])
    if prediction.labels is not None:
        table["label"] = prediction.labels
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".csv":
        table.to_csv(output, index=False)
    else:
        table.to_parquet(output, index=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plateau.predict", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path,
                        help="the export: <results-dir>/<run-name>/model")
    parser.add_argument("--data", required=True, type=Path,
                        help="a Parquet, CSV, JSON lines file, save_to_disk or image folder")
    parser.add_argument("--output", type=Path,
                        help="write the predictions here (.parquet, or .csv)")
    args = parser.parse_args(argv)
    import datasets

    datasets.logging.set_verbosity_error()  # a file it cannot read: our one line, not its log
    try:
        if args.output is not None and args.output.suffix not in (".parquet", ".csv"):
            raise DataError(f"--output {args.output.name}: write .parquet or .csv")
        started = time.perf_counter()
        export = load_export(args.model)
        loaded = time.perf_counter() - started
        prediction = predict(export, args.data)
        if prediction.accuracy is None and args.output is None:
            raise DataError(f"{args.data.name} has no label column "
                            f"{export.spec.label_column!r}: give --output to write the "
                            "predictions")
        if args.output is not None:
            write_predictions(prediction, export, args.output)
        if per_file_scaling(export):
            print("plateau.predict: note: this model standardises each file with the file's "
                  "own mean and std (feature-scaling='silo'), so a record's prediction depends "
                  "on the other records of its file", file=sys.stderr)
    except (DataError, OSError) as err:
        print(f"plateau.predict: {err}", file=sys.stderr)
        return 2
    count = len(prediction.classes)
    if prediction.accuracy is not None:
        correct = round(prediction.accuracy * count)
        print(f"accuracy {prediction.accuracy:.6f} ({correct} of {count} records; loss "
              f"{prediction.loss:.6f}; the model of round {export.descriptor['round']}, loaded "
              f"in {loaded:.2f} s)")
    if args.output is not None:
        print(f"{count} predictions written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
