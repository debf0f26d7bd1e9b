"""Building a run from its config: validation the server alone can do, and the strategy."""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING

from flwr.common import log
from torch import nn

from plateau.config import LOCAL_DATASET, ConfigError, ConfigValue, RunConfig
from plateau.data import DATASETS, DataError, PartitionSpec, ensure_partitions, partition_sizes
from plateau.device import resolve_device
from plateau.models import float_buffer_names, frozen_digest, model_from_config, travelling_state
from plateau.privacy.mechanism import mechanism_from_config
from strategies import LOCAL_RULES, STRATEGIES, PlateauStrategy
from strategies.population import ClientPopulation
from strategies.shared import GlobalDirection


def holds_direction(algorithm: str, config: RunConfig) -> bool:
    """Whether the algorithm's server keeps a global direction (what the shrinkage acts on)."""
    strategy = STRATEGIES[algorithm](config, parameter_names=[], buffer_names=[])
    return any(isinstance(piece, GlobalDirection) for piece in strategy.state_pieces().values())


def load_config(raw: Mapping[str, ConfigValue]) -> RunConfig:
    """Validate the run config, including the keys only the server can check."""
    config = RunConfig.from_mapping(raw)
    if config.algorithm not in STRATEGIES:
        raise ConfigError(
            f"algorithm={config.algorithm!r} is not allowed; expected one of "
            + ", ".join(repr(name) for name in STRATEGIES)
        )
    if config.direction_shrinkage != "off" and not holds_direction(config.algorithm, config):
        raise ConfigError(
            f"direction-shrinkage={config.direction_shrinkage!r} needs an algorithm with a "
            "global direction; allowed: " + ", ".join(
                repr(n) for n in STRATEGIES if holds_direction(n, config))
            + ", or direction-shrinkage='off'")
    classes = DATASETS[config.dataset].num_classes if config.dataset in DATASETS else 0
    if (config.partitioner == "pathological" and classes
            and config.classes_per_client > classes):
        raise ConfigError(
            f"classes-per-client={config.classes_per_client} is not allowed for "
            f"dataset={config.dataset!r}; expected <= {classes}"
        )
    return config


def prepare_partitions(config: RunConfig, num_partitions: int) -> None:
    """Split the training data among ``num_partitions`` clients once, before any of them asks
    for it (stored on disk; every later process reads it): a split that cannot be made, or a
    dataset that cannot be loaded, is a one-line config error here, not a failure per client."""
    if config.dataset == LOCAL_DATASET:
        from .silos import check_data_dir

        check_data_dir(config, num_partitions)
        return
    spec = PartitionSpec(config.dataset, config.test_fraction, config.seed, num_partitions,
                         config.partitioner, config.dirichlet_alpha, config.classes_per_client,
                         config.validation_fraction, config.min_partition_size)
    try:
        ensure_partitions(spec)
    except DataError as err:
        raise ConfigError(f"dataset={config.dataset!r}, partitioner={config.partitioner!r}, "
                          f"{num_partitions} clients: {err}") from None
    if config.record_dp == "on":
        sizes = [int(n) for n in partition_sizes(spec) if n > 0]  # an empty silo declines
        if sizes and config.batch_size >= min(sizes):
            # the bundled splits are public, so the server may say so; a silo with fewer
            # records than a batch samples them all (q = 1: no amplification by sampling)
            log(WARNING, "record-dp='on' with batch-size=%d: the smallest of the %d silos has "
                "%d records, so it samples every record each step (q = 1, no amplification "
                "by sampling): its epsilon grows much faster", config.batch_size,
                num_partitions, min(sizes))
        if sizes:
            warn_large_record_epsilon(config, min(sizes))


def warn_large_record_epsilon(config: RunConfig, smallest: int) -> None:
    """Warn before round 1 when a silo's record-level epsilon after the planned rounds would
    exceed 10 (the bundled splits are public, so the server knows the silos' sizes in
    simulation): the target itself, or the smallest silo's epsilon at the given sigma
    (substitution, its default delta; a silo's own public size or delta can change it)."""
    from plateau.privacy.record_dp import SUBSTITUTION, SiloLedger, plan_for

    from .privacy_plan import LARGE_EPSILON

    strategy = STRATEGIES[config.algorithm](config, parameter_names=[], buffer_names=[])
    rule = LOCAL_RULES[strategy.local_rule]
    plan = plan_for(config, smallest, rule.backprops_per_step)
    steps = config.num_server_rounds * config.local_steps
    planned = SiloLedger([plan.entry(steps)]).epsilon(plan.delta, plan.accountant)
    if planned > LARGE_EPSILON:
        log(WARNING, "record-level epsilon of the smallest silo (%d records) after the planned "
            "%d rounds would be %.1f (%s, delta %g), above %g: a weak guarantee; raise "
            "record-noise-multiplier or set record-target-epsilon", smallest,
            config.num_server_rounds, planned, SUBSTITUTION, plan.delta, LARGE_EPSILON)


def check_per_sample(config: RunConfig, model: nn.Module) -> None:
    """Record-level DP needs per-record gradients: the first layer that mixes records
    (BatchNorm), that Opacus cannot handle, or that keeps record statistics, refused before
    anything trains (each silo checks again before it trains)."""
    from plateau.privacy.record_dp import per_record_refusal

    if (reason := per_record_refusal(model)) is not None:
        raise ConfigError(f"record-dp='on' with model={config.model!r}: {reason}")


def build_strategy(config: RunConfig, clients: ClientPopulation | None = None
                   ) -> PlateauStrategy:
    """The configured algorithm, wired to the privacy mechanism and the device (and to the
    population, when the loop has already identified the nodes)."""
    device = resolve_device(config.device)
    model = model_from_config(config)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(INFO, "model %s: %d of %d parameters trained and released per client (trainable=%r)",
        config.model, trained, total, config.trainable)
    if config.record_dp == "on":
        check_per_sample(config, model)
    buffers = float_buffer_names(model)
    if config.dp_enabled and buffers:
        log(WARNING, "dp-allow-batchnorm=true: %d BatchNorm buffers are averaged WITHOUT clipping "
            "or noise; no privacy guarantee covers them", len(buffers))
    privacy = mechanism_from_config(config)
    if privacy is not None and config.noise_multiplier == 0:
        log(WARNING, "dp=%r with noise-multiplier=0: updates are clipped but not noised, so "
            "there is no privacy guarantee (epsilon is infinite)", config.dp)
    if privacy is not None and not privacy.formally_dp:
        log(WARNING, "dp-clip-mode=%r is the authors' privatiser (per-tensor clip at each "
            "client's median norm): it is NOT differentially private and no epsilon is "
            "reported", config.dp_clip_mode)
    strategy = STRATEGIES[config.algorithm](
        config,
        parameter_names=[n for n, p in model.named_parameters() if p.requires_grad],
        buffer_names=buffers,
        privacy=privacy,
        device=device,
        clients=clients,
    )
    strategy.current = {k: v.to(device) for k, v in travelling_state(model).items()}
    strategy.frozen_digest = frozen_digest(model)
    return strategy
