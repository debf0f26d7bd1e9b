"""Central evaluation of the global model on data the server holds: a bundled dataset's
held-out split (test, or validation when ``validation-fraction`` > 0), or with
``dataset='local'`` the server's own ``test-data`` file."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plateau.config import LOCAL_DATASET, ConfigError, RunConfig
from plateau.data import Tensors, dataset_info, held_out_tensors, prepare
from plateau.models import input_spec, load_travelling, model_from_config, score
from plateau.silo_data import SiloDataError, local_spec, read_records


@dataclass(frozen=True)
class Evaluation:
    """Test accuracy and mean cross-entropy of one model, on ``examples`` records."""

    accuracy: float
    loss: float
    examples: int = 0


def server_test_tensors(config: RunConfig) -> Tensors:
    """The server's test-data file, read as the silos read theirs (every record, in file
    order): it must give the input the silos agreed on."""
    try:
        records = read_records(config.test_data, local_spec(config))
    except SiloDataError as err:
        raise ConfigError(f"test-data={config.test_data!r}: {err}") from None
    shape = "x".join(str(d) for d in records.input_shape)
    if config.input_shape and records.input_shape and shape != config.input_shape:
        raise ConfigError(f"test-data={config.test_data!r} gives inputs of shape {shape}, the "
                          f"silos agreed on {config.input_shape}")
    return prepare(records.split, dataset_info(config), input_spec(config))


class CentralEvaluator:
    """Evaluates state dicts on the server's held-out data; model and tensors are built once."""

    def __init__(self, config: RunConfig, device: torch.device, batch_size: int = 1024) -> None:
        self.model = model_from_config(config).to(device)
        if config.dataset == LOCAL_DATASET:
            self.data = server_test_tensors(config).to(device)
        else:
            self.data = held_out_tensors(
                config.dataset, test_fraction=config.test_fraction, seed=config.seed,
                max_examples=config.max_test_examples, spec=input_spec(config),
                validation_fraction=config.validation_fraction,
            ).to(device)
        self.batch_size = batch_size

    def __call__(self, state: dict[str, torch.Tensor]) -> Evaluation:
        """Accuracy and loss in eval mode (BatchNorm uses running statistics, no dropout)."""
        load_travelling(self.model, state)
        correct, loss_sum = score(self.model, self.data.x, self.data.y, self.batch_size)
        examples = len(self.data)
        return Evaluation(correct / examples, loss_sum / examples, examples)
