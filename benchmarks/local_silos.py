"""Local silos under record-level DP: Fashion-MNIST written as 5 Parquet silos, federated accuracy.

The 60,000 Fashion-MNIST training images are split among 5 silos by label (Dirichlet 0.5,
seed 0) and written as the files a user would hold: one Parquet file per silo,
``silo-<i>.parquet``, with an ``image`` column of ``datasets``' Image feature (PNG bytes embedded
in the file) and an int64 ``label`` column. Each silo holds out 10 % of its own records as its
test data (its node config's ``eval-fraction``/``eval-seed`` defaults: a keyed hash per
record); the server aggregates the silos' evaluation sums into the federated accuracy.
Cells, each a full in-process simulation with ``dataset='local'``:

* record-level DP at each ``--epsilons`` target (each silo calibrates its own noise, delta 1e-6),
* the same model and steps without DP,
* the pooled ceiling: the same model trained without DP by a plain torch loop on the union of
  the silos' training records (the same number of example-gradients as the federated run) and
  evaluated on the union of their held-out records (the silos' own split, from
  ``plateau.silo_data.load_silo``).

Every finished cell is stored in ``--out`` (JSON, keyed by its configuration) and never rerun,
so an interrupted benchmark resumes. Prints a Markdown table.

    python benchmarks/local_silos.py [--data DIR] [--out results/local-silos.json] [--rounds R]
        [--local-steps K] [--batch-size B] [--lr LR] [--dp-lr LR] [--model mlp] ...

Why Parquet of images rather than a 784-column table: it is what ``datasets`` writes for an
image dataset (``to_parquet``), it keeps the images images (the same files serve ``linear``,
``mlp`` and ``cnn``: every model reads the normalised 1x28x28 tensor, the flat ones flatten it),
and one file per silo loads in a few seconds (PNG decode); a 784-column table would standardise
every pixel per silo (``feature-scaling='silo'``), which differs between silos.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from record_study import simulated_run  # benchmarks/ is the script's folder, first on sys.path

SILOS = 5
DEFAULT_DATA = Path(tempfile.gettempdir()) / "plateau-fmnist-silos"
MANIFEST = "manifest.json"


# ----- the silos' files -------------------------------------------------------------------

def write_silos(folder: Path, silos: int = SILOS, alpha: float = 0.5, seed: int = 0) -> dict:
    """Fashion-MNIST's training images as ``silos`` Parquet files (Dirichlet by label); reused
    when ``folder`` already holds them (its manifest matches). Returns the manifest."""
    import numpy as np

    from plateau.data import _load_fashion_mnist_files, fashion_mnist_dir, partition_indices

    wanted = {"source": "fashion-mnist train", "silos": silos, "partitioner": "dirichlet",
              "alpha": alpha, "seed": seed, "format": "parquet (datasets Image + int64 label)"}
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if ({k: manifest.get(k) for k in wanted} == wanted
                and all((folder / f"silo-{i}.parquet").is_file() for i in range(silos))):
            return manifest
    import datasets
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    datasets.disable_progress_bars()

    source = fashion_mnist_dir()
    if source is None:
        raise SystemExit("Fashion-MNIST is not installed (plateau.data.fashion_mnist_dir())")
    train, _ = _load_fashion_mnist_files(source)
    parts = partition_indices(train.labels, silos, "dirichlet", alpha=alpha,
                              classes_per_client=2, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    features = Features({"image": Image(), "label": Value("int64")})
    started = time.monotonic()
    counts = []
    for i, rows in enumerate(parts):
        rows = np.sort(rows)
        images = [PILImage.fromarray(train.inputs[r, :, :, 0], mode="L") for r in rows]
        dataset = Dataset.from_dict({"image": images, "label": train.labels[rows].tolist()},
                                    features=features)
        dataset.to_parquet(str(folder / f"silo-{i}.parquet"))
        counts.append(len(rows))
    check_embedded(folder / "silo-0.parquet")
    manifest = {**wanted, "records": counts,
                "labels": [np.bincount(train.labels[p], minlength=10).tolist() for p in parts],
                "write_s": round(time.monotonic() - started, 1)}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def check_embedded(path: Path) -> None:
    """The Parquet file holds the PNG bytes themselves, not paths to files elsewhere."""
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=["image"]).column("image").combine_chunks()
    data = column.field("bytes")
    if data.null_count or not all(len(b) > 8 for b in data.to_pylist()[:100]):
        raise SystemExit(f"{path}: the image column does not embed the image bytes")
    if not data[0].as_py().startswith(b"\x89PNG"):
        raise SystemExit(f"{path}: the embedded images are not PNG")


# ----- cells ------------------------------------------------------------------------------

def base_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {
        "dataset": "local", "data-dir": str(args.data), "model": args.model,
        "sample-rate": 1.0, "num-server-rounds": args.rounds, "local-steps": args.local_steps,
        "batch-size": args.batch_size, "record-delta": 1e-6, "num-classes": 10,
        "weight-decay": args.weight_decay, "lr-decay": args.lr_decay, "seed": 0,
        "image-mean": args.image_mean, "image-std": args.image_std}
    if args.model == "mlp":
        config |= {"mlp-widths": args.mlp_widths, "norm": args.norm}
    if args.model == "cnn":
        config |= {"model-width": args.model_width}
    return config


def cell_config(args: argparse.Namespace, algorithm: str, epsilon: float) -> dict[str, Any]:
    config = {**base_config(args), "algorithm": algorithm}
    if epsilon > 0:
        config |= {"record-dp": "on", "record-target-epsilon": epsilon, "lr": args.dp_lr,
                   "record-clip-norm": args.clip, "record-per-sample": args.per_sample}
    else:
        config["lr"] = args.lr
    return config


def run_cell(config: dict[str, Any], silos: int) -> dict[str, Any]:
    summary, rounds, wall = simulated_run(config, silos)
    record = summary.get("record_privacy") or {}
    per_silo = record.get("epsilon_per_silo") or {}
    times = [r.get("wall_s") for r in rounds]
    return {"status": summary.get("status"),
            "final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
            "accuracy_by_round": [r.get("federated_accuracy") for r in rounds],
            "epsilon_per_silo": per_silo,
            "epsilon_max": max(per_silo.values()) if per_silo else None,
            "silo_reports": record.get("silos"), "round_wall_s": times, "wall_s": wall}


def pooled_config(args: argparse.Namespace) -> dict[str, Any]:
    return {**base_config(args), "cell": "pooled", "lr": args.lr, "silos": SILOS,
            "pooled-steps": args.rounds * args.local_steps * SILOS}


def run_pooled(config: dict[str, Any]) -> dict[str, Any]:
    """The ceiling: the same model, no DP, plain SGD (the clients' update rule: lr, weight decay,
    stability clip) on the union of the silos' training records, the same number of
    example-gradients as the federated run; accuracy on the union of their held-out records."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from client_app.compute import silo_spec
    from plateau.config import RunConfig
    from plateau.data import InputSpec, Split, dataset_info
    from plateau.data import prepare as prepare_tensors
    from plateau.models import model_from_config
    from plateau.silo_data import load_silo, silo_path

    started = time.monotonic()
    run = {k: v for k, v in config.items() if k not in ("cell", "silos", "pooled-steps")}
    run |= {"input-shape": "1x28x28", "num-classes": 10}
    cfg = RunConfig.from_mapping(run)
    # the silos' own held-out split: node config eval-seed 0 and eval-fraction 0.1 (defaults)
    silos = [load_silo(silo_path(cfg.data_dir, i), silo_spec(cfg, {}))
             for i in range(config["silos"])]
    loaded = time.monotonic() - started

    def union(parts: list[Split]) -> Split:
        return Split(np.concatenate([p.inputs for p in parts]),
                     np.concatenate([p.labels for p in parts]))

    info = dataset_info(cfg)
    train = prepare_tensors(union([s.train for s in silos]), info, InputSpec())
    test = prepare_tensors(union([s.held_out for s in silos]), info, InputSpec())
    torch.manual_seed(0)
    model = model_from_config(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    steps, batch, n = config["pooled-steps"], cfg.batch_size, len(train.y)
    steps_per_round = cfg.local_steps * config["silos"]
    order, position = torch.randperm(n, generator=generator), 0
    accuracy_by_round = []

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(test.x[i:i + 2048]).argmax(1) == test.y[i:i + 2048]).sum())
                          for i in range(0, len(test.y), 2048))
        model.train()
        return correct / len(test.y)

    for step in range(steps):
        if position + batch > n:
            order, position = torch.randperm(n, generator=generator), 0
        index = order[position:position + batch]
        position += batch
        lr = cfg.lr * cfg.lr_decay ** (step // steps_per_round)
        loss = F.cross_entropy(model(train.x[index]), train.y[index])
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        scale = min(1.0, cfg.grad_clip / (norm + 1e-12)) if cfg.grad_clip > 0 else 1.0
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * (scale * g + cfg.weight_decay * p))
        if (step + 1) % steps_per_round == 0:
            accuracy_by_round.append(accuracy())
    return {"status": "completed", "final_accuracy": accuracy_by_round[-1],
            "best_accuracy": max(accuracy_by_round), "accuracy_by_round": accuracy_by_round,
            "epsilon_per_silo": {}, "epsilon_max": None, "train_records": n,
            "held_out_records": len(test.y), "load_s": loaded,
            "wall_s": time.monotonic() - started}


# ----- the table --------------------------------------------------------------------------

def model_text(config: dict[str, Any]) -> str:
    if config["model"] == "mlp":
        return f"mlp {config['mlp-widths']} ({config['norm']} norm)"
    if config["model"] == "cnn":
        return f"cnn width {config['model-width']}"
    return config["model"]


def cell_name(config: dict[str, Any]) -> str:
    if config.get("cell") == "pooled":
        return "pooled, no DP (ceiling)"
    if config.get("record-dp") == "on":
        return (f"{config['algorithm']}, record ε={config['record-target-epsilon']:g} "
                f"(C={config['record-clip-norm']:g}, {config['record-per-sample']})")
    return f"{config['algorithm']}, no DP"


def table(cells: dict[str, Any], keys: list[str]) -> str:
    lines = ["| cell | model | rounds x steps x batch | lr | federated acc final | best "
             "| silo ε max (per silo) | wall (s) |", "|---|---|---|---|---|---|---|---|"]
    for key in keys:
        cell = cells[key]
        config = cell["config"]
        if config.get("cell") == "pooled":
            shape = (f"{config['pooled-steps']} x {config['batch-size']} "
                     f"(= {config['num-server-rounds']}x{config['local-steps']}x"
                     f"{config['silos']} silos)")
        else:
            shape = (f"{config['num-server-rounds']} x {config['local-steps']} x "
                     f"{config['batch-size']}")
        per_silo = cell.get("epsilon_per_silo") or {}
        spent = ("-" if not per_silo else f"{cell['epsilon_max']:.2f} ("
                 + ", ".join(f"{per_silo[k]:.2f}" for k in sorted(per_silo, key=int)) + ")")
        lines.append(f"| {cell_name(config)} | {model_text(config)} | {shape} | {config['lr']:g} "
                     f"| {cell['final_accuracy']:.4f} | {cell['best_accuracy']:.4f} | {spent} "
                     f"| {cell['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder of the silo files (written if absent, else reused)")
    parser.add_argument("--out", type=Path, default=Path("results/local-silos.json"))
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate without DP")
    parser.add_argument("--dp-lr", type=float, default=0.5,
                        help="learning rate of the clipped, noised record-DP gradients")
    parser.add_argument("--lr-decay", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--model", default="mlp", choices=("linear", "mlp", "cnn"))
    parser.add_argument("--mlp-widths", default="256")
    parser.add_argument("--norm", default="group", choices=("group", "none"))
    parser.add_argument("--model-width", type=int, default=16)
    parser.add_argument("--clip", type=float, default=5.0, help="record-clip-norm")
    parser.add_argument("--per-sample", default="ghost", choices=("hooks", "ghost"))
    parser.add_argument("--image-mean", default="0.286",
                        help="image-mean (Fashion-MNIST's pixel mean; Plateau's default is 0.5)")
    parser.add_argument("--image-std", default="0.353", help="image-std (Plateau's: 0.5)")
    parser.add_argument("--epsilons", default="8,2", help="record-level targets; 0 = no DP")
    parser.add_argument("--algorithms", default="fedavg")
    parser.add_argument("--no-dp", action=argparse.BooleanOptionalAction, default=True,
                        help="run the no-DP cell of each algorithm")
    parser.add_argument("--pooled", action=argparse.BooleanOptionalAction, default=True,
                        help="run the pooled ceiling")
    args = parser.parse_args()
    args.data = args.data.expanduser().resolve()

    started = time.monotonic()
    manifest = write_silos(args.data)
    print(f"silos in {args.data}: records {manifest['records']} "
          f"(written in {manifest.get('write_s', '?')} s)", flush=True)
    cells = json.loads(args.out.read_text()) if args.out.exists() else {}
    wanted: list[tuple[str, dict[str, Any]]] = []
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    for algorithm in args.algorithms.split(","):
        targets = [e for e in epsilons if e > 0] + ([0.0] if args.no_dp else [])
        wanted += [("sim", cell_config(args, algorithm, e)) for e in targets]
    if args.pooled:
        wanted.append(("pooled", pooled_config(args)))
    keys = []
    for kind, config in wanted:
        # the data folder's path is no part of a cell's identity (its manifest is)
        key = json.dumps({k: v for k, v in config.items() if k != "data-dir"}, sort_keys=True)
        keys.append(key)
        if key in cells:
            continue
        print(f"running {cell_name(config)} ...", flush=True)
        result = run_pooled(config) if kind == "pooled" else run_cell(config, SILOS)
        cells[key] = {"config": config, **result}
        print(f"  -> final {result['final_accuracy']:.4f}, best {result['best_accuracy']:.4f}, "
              f"eps max {result['epsilon_max']}, {result['wall_s']:.0f} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(cells, indent=1))
    print(f"\nFashion-MNIST as {SILOS} Parquet silos (Dirichlet 0.5 by label, seed 0), each "
          f"holding out 10 % as its test data; record delta 1e-6; sample-rate 1.0; federated "
          f"accuracy on the union of the silos' held-out records; this invocation took "
          f"{time.monotonic() - started:.0f} s\n")
    print(table(cells, keys))


if __name__ == "__main__":
    main()
