"""Cost of the DP noise source against torch.normal, on an update of ResNet-18's size.

The old noise was ``t + torch.normal(0, std, ...)`` per tensor, in the tensor's dtype, from
torch's generator. The new one is a ChaCha20 keystream under a fresh OS key, float64 Box-Muller
with an untruncated tail, added in float64 and rounded once
(``plateau.privacy.noise.add_noise``). Both noise the same float32 tensors (ResNet-18's
parameter shapes, 11.2M values); rounds alternate between the two so machine noise hits both
alike, and the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from plateau.config import RunConfig
from plateau.models import model_from_config
from plateau.privacy.noise import ChaChaSource, add_noise


def resnet18_tensors(device: str) -> dict[str, torch.Tensor]:
    """Zero float32 tensors shaped like ResNet-18's parameters on CIFAR-10 (11,173,962)."""
    model = model_from_config(RunConfig.from_mapping({"dataset": "cifar10",
                                                      "model": "resnet18"}))
    return {k: torch.zeros_like(p, device=device) for k, p in model.named_parameters()}


def noise_torch(tensors: dict[str, torch.Tensor], std: float) -> None:
    for t in tensors.values():
        t + torch.normal(0.0, std, t.shape, dtype=t.dtype, device=t.device)


def noise_plateau(tensors: dict[str, torch.Tensor], std: float) -> None:
    source = ChaChaSource.from_os()
    for t in tensors.values():
        add_noise(t, std, source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tensors = resnet18_tensors(args.device)
    count = sum(t.numel() for t in tensors.values())
    times: dict[str, list[float]] = {"torch.normal": [], "plateau": []}
    for _ in range(args.repeats):
        for name, run in (("torch.normal", noise_torch), ("plateau", noise_plateau)):
            if args.device != "cpu":
                torch.cuda.synchronize()
            started = time.perf_counter()
            run(tensors, 1.0)
            if args.device != "cpu":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"noising {count:,} float32 values on {args.device} ({torch.get_num_threads()} torch "
          f"threads), median of {args.repeats}:")
    for name, median in medians.items():
        print(f"  {name:13s} {median * 1000:8.1f} ms  (min {min(times[name]) * 1000:.1f}, "
              f"max {max(times[name]) * 1000:.1f})")
    print(f"ratio plateau / torch.normal: {medians['plateau'] / medians['torch.normal']:.2f}x "
          "(target <= 2x)")


if __name__ == "__main__":
    main()
