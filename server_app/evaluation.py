"""Central evaluation of the global model on the held-out split (test, or validation when
``validation-fraction`` > 0)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plateau.config import RunConfig
from plateau.data import held_out_tensors
from plateau.models import input_spec, load_travelling, model_from_config


@dataclass(frozen=True)
class Evaluation:
    """Test accuracy and mean cross-entropy of one model."""

    accuracy: float
    loss: float


class CentralEvaluator:
    """Evaluates state dicts on the test split; model and test tensors are built once."""

    def __init__(self, config: RunConfig, device: torch.device, batch_size: int = 1024) -> None:
        self.model = model_from_config(config).to(device)
        self.data = held_out_tensors(
            config.dataset, test_fraction=config.test_fraction, seed=config.seed,
            max_examples=config.max_test_examples, spec=input_spec(config),
            validation_fraction=config.validation_fraction,
        ).to(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, state: dict[str, torch.Tensor]) -> Evaluation:
        """Accuracy and loss in eval mode (BatchNorm uses running statistics, no dropout)."""
        load_travelling(self.model, state)
        self.model.eval()
        correct, loss_sum = 0, 0.0
        for start in range(0, len(self.data), self.batch_size):
            x = self.data.x[start : start + self.batch_size]
            y = self.data.y[start : start + self.batch_size]
            logits = self.model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        return Evaluation(accuracy=correct / len(self.data), loss=loss_sum / len(self.data))
