"""Step time and peak memory of record-level DP-SGD against the non-private step.

One local step of each kind on the same batch of a real partition, in a fresh process per
(model, mode) so that each peak RSS is its own: ``plain`` (one backward pass of the mean loss),
``hooks`` (Opacus per-sample gradients, clipped and summed, plus plateau.privacy.noise
Gaussians) and
``ghost`` (Opacus ghost clipping: per-sample norms, then a second backward pass of the
reweighted loss, plus the noise). Prints medians over the timed steps and the ratios to plain.

    python benchmarks/record_dp.py [--steps 20] [--batch 64] [--models cnn,minilm-lora]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODELS = {
    "cnn": {"model": "cnn", "dataset": "fashion-mnist"},
    "minilm-lora": {"model": "minilm", "dataset": "rotten-tomatoes", "trainable": "lora"},
    "minilm-head": {"model": "minilm", "dataset": "rotten-tomatoes", "trainable": "head"},
}
MODES = ("plain", "hooks", "ghost")


def one(model_name: str, mode: str, steps: int, batch: int) -> dict[str, float]:
    """Time ``steps`` steps of one kind (after two warm-up steps) in this process."""
    import torch
    import torch.nn.functional as F

    from plateau.config import RunConfig
    from plateau.data import client_partition
    from plateau.models import input_spec, model_from_config
    from plateau.privacy.noise import ChaChaSource
    from plateau.privacy.record_dp import RecordPlan, RecordPrivatiser, per_sample_module

    torch.set_num_threads(1)
    cfg = RunConfig.from_mapping({**MODELS[model_name], "batch-size": batch})
    data = client_partition(cfg.dataset, test_fraction=cfg.test_fraction, seed=0,
                            num_partitions=1, partition_id=0, partitioner="iid", alpha=0.5,
                            classes_per_client=2, spec=input_spec(cfg))
    x, y = data.x[:batch], data.y[:batch]
    model = model_from_config(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if mode == "plain":
        def step() -> None:
            torch.autograd.grad(F.cross_entropy(model(x), y), params)
    else:
        plan = RecordPlan(clip_norm=1.0, noise_multiplier=1.0, queries_per_step=1,
                          sample_rate=batch / len(data), records=len(data), delta=1e-6,
                          accountant="rdp")
        private = RecordPrivatiser(per_sample_module(model, mode, 1.0), plan, mode,
                                   ChaChaSource.from_os())

        def step() -> None:
            private.queries_this_step = 0
            private.gradients(params, x, y)
    times = []
    for i in range(steps + 2):
        started = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - started)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(times), "peak_mib": peak_mib,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--models", default="cnn,minilm-lora")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.steps, args.batch)))
        return
    print(f"record-level DP step on CPU, 1 torch thread, batch {args.batch}, "
          f"median of {args.steps} steps")
    print("| model | trainable | mode | step (ms) | x plain | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        plain = None
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--one", model_name, mode,
                                  "--steps", str(args.steps), "--batch", str(args.batch)],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            plain = plain or result["step_s"]
            print(f"| {model_name} | {result['trainable']:,} | {mode} | "
                  f"{1000 * result['step_s']:.1f} | {result['step_s'] / plain:.2f} | "
                  f"{result['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
