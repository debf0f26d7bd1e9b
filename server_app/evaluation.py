"""Central evaluation of the global model on data the server holds: a bundled dataset's
held-out split (test, or validation when ``validation-fraction`` > 0), or with
``dataset='local'`` the server's own ``test-data`` file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from plateau.config import LOCAL_DATASET, ConfigError, RunConfig
from plateau.data import Tensors, dataset_info, held_out_tensors, prepare
from plateau.models import input_spec, load_travelling, model_from_config, score
from plateau.silo_data import (
    LocalSpec,
    Schema,
    SiloDataError,
    layout_difference,
    local_spec,
    read_records,
)


@dataclass(frozen=True)
class Evaluation:
    """Test accuracy and mean cross-entropy of one model, on ``examples`` records."""

    accuracy: float
    loss: float
    examples: int = 0


def agreed_spec(config: RunConfig, agreed: Schema | None) -> LocalSpec:
    """How the run's model reads a file: the run's spec, with the tabular feature columns the
    silos agreed on (by name and in their order, whatever order a file has them in)."""
    spec = local_spec(config)
    if agreed is not None and agreed.kind == "tabular" and not spec.feature_columns:
        spec = dataclasses.replace(spec, feature_columns=tuple(c for c, _ in
                                                               agreed.columns[:-1]))
    return spec


def server_test_tensors(config: RunConfig, agreed: Schema | None) -> Tensors:
    """The server's test-data file, read as the silos read theirs (every record, in file
    order): it must have the silos' agreed columns and give the input they agreed on."""
    try:
        records = read_records(config.test_data, agreed_spec(config, agreed))
    except SiloDataError as err:
        raise ConfigError(f"test-data={config.test_data!r}: {err}") from None
    if agreed is not None and (difference := layout_difference(
            agreed, records.columns, records.kind, "test-data")) is not None:
        raise ConfigError(f"test-data={config.test_data!r}: {difference}")
    shape = "x".join(str(d) for d in records.input_shape)
    if config.input_shape and records.input_shape and shape != config.input_shape:
        raise ConfigError(f"test-data={config.test_data!r} gives inputs of shape {shape}, the "
                          f"silos agreed on {config.input_shape}")
    return prepare(records.split, dataset_info(config), input_spec(config))


class CentralEvaluator:
    """Evaluates state dicts on the server's held-out data; model and tensors are built once."""

    def __init__(self, config: RunConfig, device: torch.device, batch_size: int = 1024, *,
                 agreed: Schema | None = None) -> None:
        self.model = model_from_config(config).to(device)
        if config.dataset == LOCAL_DATASET:
            self.data = server_test_tensors(config, agreed).to(device)
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
