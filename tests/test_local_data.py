"""dataset='local': silos train and evaluate on their own files.

The silo files are written by the tests from real offline data (scikit-learn's digits); the
loader's formats and bad-data cases are in test_silo_data.py, this file covers the run: the
config keys, the schema every silo must share (refused before round 1), federated evaluation
against a direct computation and against a lying silo, the user's own model, and whole
simulations on Parquet and CSV silos with record-level DP (image folders and the user's model:
test_export.py, which runs them with the server's test file).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.app import RecordDict as Records

from client_app import compute
from plateau import messages
from plateau.config import ConfigError, RunConfig
from plateau.models import load_travelling, model_from_config, travelling_state
from plateau.silo_data import load_silo, local_spec
from server_app.silos import (
    FederatedEvaluator,
    agree_on_schema,
    check_data_dir,
    screen_evaluation,
)
from strategies.population import ClientPopulation

from .helpers import FakeGrid, make_config, simulate


def digits_table() -> pd.DataFrame:
    """Digits as a table: 64 pixel columns and the label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    table = pd.DataFrame(digits.data, columns=[f"px{i}" for i in range(64)])
    table["label"] = digits.target.astype(np.int64)
    return table


def write_silos(folder: Path, count: int, fmt: str = "parquet",
                table: pd.DataFrame | None = None) -> Path:
    """Digits split by label skew into ``count`` silo files of one format."""
    table = digits_table() if table is None else table
    folder.mkdir(parents=True, exist_ok=True)
    order = np.argsort(table["label"].to_numpy() + np.random.default_rng(0).random(len(table)),
                       kind="stable")
    for i, rows in enumerate(np.array_split(order, count)):
        # mostly some labels, with a shared tenth so every silo sees every class
        part = pd.concat([table.iloc[rows], table.iloc[i::10 * count]])
        path = folder / f"silo-{i}.{fmt}"
        if fmt == "parquet":
            part.to_parquet(path, index=False)
        elif fmt == "csv":
            part.to_csv(path, index=False)
        else:
            part.to_json(path, orient="records", lines=True)
    return folder


def write_image_silos(folder: Path, count: int) -> Path:
    """Digits as PNG files, one image folder (a sub-folder per class) per silo."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        for j in range(i, len(digits.target), count):
            target = folder / f"silo-{i}" / str(digits.target[j])
            target.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[j] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(target / f"{j}.png")
    return folder


def local_config(data_dir: Path, **overrides: object) -> RunConfig:
    return make_config(dataset="local", data_dir=str(data_dir), model="mlp", mlp_widths="32",
                       **overrides)


# ----- the run config ---------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"evaluate": "central"}, "the server holds no data"),
    ({"feature-scaling": "given"}, "'given' needs both lists"),
    ({"feature-mean": "1,x", "feature-std": "1,1", "feature-scaling": "given"},
     "comma-separated numbers"),
    ({"label-names": "a,b,a"}, "repeats a name"),
    ({"label-names": "a,b", "num-classes": 3}, "must agree"),
    ({"model": "cnn", "norm": "none"}, "only the mlp"),
    ({"sharpness-every": 1}, "flatness probes"),
    ({"text-column": "review", "model": "mypackage.models:build"}, "bundled text models"),
    ({"dataset": "digits", "evaluate": "federated"}, "hold no held-out records"),
])
def test_local_config_mistakes_are_one_line_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({"dataset": "local", "model": "mlp", **overrides})


def test_a_user_model_is_a_package_path_and_other_names_are_refused() -> None:
    assert make_config(model="mypackage.models:build").user_model
    with pytest.raises(ConfigError, match=r"your own as 'package\.module:function'"):
        make_config(model="mlp2")


def test_evaluation_defaults_to_central_for_bundled_and_federated_for_local() -> None:
    bundled, local = make_config(), make_config(dataset="local", model="mlp")
    assert (bundled.central_evaluation, bundled.federated_evaluation) == (True, False)
    assert (local.central_evaluation, local.federated_evaluation) == (False, True)
    # the server's own test file: both, unless told one
    served = make_config(dataset="local", model="mlp", test_data="test.parquet")
    assert (served.central_evaluation, served.federated_evaluation) == (True, True)
    central = make_config(dataset="local", model="mlp", test_data="t.csv", evaluate="central")
    assert (central.central_evaluation, central.federated_evaluation) == (True, False)


# ----- the schema every silo shares -------------------------------------------------------

def schema_answers(tmp_path: Path, tables: list[pd.DataFrame], **overrides: object
                   ) -> tuple[RunConfig, dict[int, dict]]:
    config = local_config(tmp_path, **overrides)
    answers = {}
    for i, table in enumerate(tables):
        path = tmp_path / f"silo-{i}.parquet"
        table.to_parquet(path, index=False)
        answers[i] = load_silo(path, local_spec(config)).schema.to_record(with_counts=False)
    return config, answers


@pytest.mark.slow
def test_agreeing_silos_resolve_the_models_input_and_classes(tmp_path: Path) -> None:
    table = digits_table()
    config, answers = schema_answers(tmp_path, [table.iloc[:900], table.iloc[900:]])
    resolved, schemas = agree_on_schema(config, answers)
    assert resolved.input_shape == "64" and resolved.num_classes == 10
    assert sorted(schemas) == [0, 1]
    model = model_from_config(resolved)
    assert model(torch.zeros(2, 64)).shape == (2, 10)


def test_a_column_of_another_type_is_refused_before_round_1_naming_the_silo(
        tmp_path: Path) -> None:
    table = digits_table()
    other = table.iloc[1200:].copy()
    other["px3"] = other["px3"].map(lambda v: f"v{v}")
    config, answers = schema_answers(tmp_path, [table.iloc[:600], table.iloc[600:1200], other],
                                     categories="px3=v0|v1")
    with pytest.raises(ConfigError, match=r"silo.*px3"):
        agree_on_schema(config, answers)


@pytest.mark.slow
def test_a_missing_column_is_refused_naming_the_silo(tmp_path: Path) -> None:
    table = digits_table()
    config, answers = schema_answers(tmp_path, [table.iloc[:600], table.iloc[600:1200],
                                                table.iloc[1200:].drop(columns=["px5"])])
    with pytest.raises(ConfigError, match=r"silo 2.*px5"):
        agree_on_schema(config, answers)


def test_labels_outside_the_declared_classes_are_refused_before_round_1(tmp_path: Path) -> None:
    table = digits_table()
    config, answers = schema_answers(tmp_path, [table.iloc[:900], table.iloc[900:]])
    with pytest.raises(ConfigError, match=r"silo \d.*labels.*declares 2 classes"):
        agree_on_schema(RunConfig.from_mapping({**config.to_dict(), "num-classes": 2}), answers)


def test_a_run_without_any_usable_silo_stops_with_each_reason(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    with pytest.raises(ConfigError, match=r"silo 0: missing.*silo 1: empty"):
        agree_on_schema(config, {0: {"error": "missing"}, 1: {"error": "empty"}})


def test_a_broken_silo_is_left_out_and_the_others_agree(tmp_path: Path) -> None:
    table = digits_table()
    config, answers = schema_answers(tmp_path, [table.iloc[:900], table.iloc[900:]])
    answers[2] = {"error": "its file cannot be read"}
    answers[3] = {"kind": "tabular", "columns": 7}  # a malformed schema from a broken node
    resolved, schemas = agree_on_schema(config, answers)
    assert sorted(schemas) == [0, 1] and resolved.input_shape == "64"


def test_the_launcher_reads_every_simulated_silo_up_front(tmp_path: Path) -> None:
    folder = write_silos(tmp_path / "silos", 2)
    config = local_config(folder)
    assert check_data_dir(config, 2).input_shape == "64"
    with pytest.raises(ConfigError, match="no silo has usable data"):
        check_data_dir(local_config(tmp_path / "nowhere"), 2)
    with pytest.raises(ConfigError, match="needs data-dir"):
        check_data_dir(make_config(dataset="local", model="mlp"), 2)


def test_image_silos_of_different_sizes_are_refused(tmp_path: Path) -> None:
    from PIL import Image

    for i, size in enumerate((8, 8, 12)):
        for label in (0, 1):
            folder = tmp_path / f"silo-{i}" / str(label)
            folder.mkdir(parents=True)
            for j in range(6):
                Image.fromarray(np.full((size, size), 40 * j, np.uint8), mode="L").save(
                    folder / f"{j}.png")
    config = make_config(dataset="local", data_dir=str(tmp_path), model="cnn")
    with pytest.raises(ConfigError, match=r"silo 2.*12"):
        check_data_dir(config, 3)


# ----- federated evaluation ---------------------------------------------------------------

def silo_context(node_id: int, partition: int, count: int, **node_config: object) -> Context:
    return Context(run_id=7, node_id=node_id, node_config={
        "partition-id": partition, "num-partitions": count, **node_config},
        state=Records(), run_config={})


class SiloGrid(FakeGrid):
    """A grid whose nodes run the real ClientApp's evaluation on their own silo files; one
    node may lie about its sums."""

    def __init__(self, contexts: dict[int, Context], liar: int | None = None) -> None:
        super().__init__(contexts)
        self.contexts, self.liar = contexts, liar

    def send_and_receive(self, msgs, *, timeout=None):  # type: ignore[no-untyped-def]
        answers = []
        for msg in msgs:
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == MessageType.QUERY:
                context = self.contexts[node]
                schema = compute.prepare(RunConfig.from_record(msg.content["config"]), context)
                answers.append(Message(messages.identity(
                    int(context.node_config["partition-id"]),
                    int(context.node_config["num-partitions"]), schema), reply_to=msg))
                continue
            content = compute.evaluate(msg.content, self.contexts[node])
            if node == self.liar:
                sums = content[messages.EVALUATION_KEY]
                content = RecordDict({messages.EVALUATION_KEY: MetricRecord(
                    {**sums, "correct": int(sums["examples"]) + 5})})
            answers.append(Message(content=content, reply_to=msg))
        return answers


@pytest.mark.slow
def test_federated_evaluation_equals_the_sums_computed_directly(tmp_path: Path) -> None:
    folder = write_silos(tmp_path / "silos", 3)
    config = local_config(folder, num_server_rounds=2)
    contexts = {10 + i: silo_context(10 + i, i, 3, **{"eval-fraction": 0.2}) for i in range(3)}
    grid = SiloGrid(contexts, liar=12)
    clients = ClientPopulation(config, secret=False)
    clients.determine(grid)
    clients.identified_partition_counts(grid)
    resolved, schemas = agree_on_schema(config, clients.schemas)
    model = model_from_config(resolved)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in travelling_state(model).items()}
    result = FederatedEvaluator(resolved, clients, grid, schemas)(state, 2)

    load_travelling(model, state)
    model.eval()
    examples, correct, loss = 0, 0, 0.0
    for i in (0, 1):  # silo 2 lies: it claims more correct answers than examples
        held_out = compute._local_tensors(resolved, contexts[10 + i], torch.device("cpu"),
                                          held_out=True)
        with torch.no_grad():
            logits = model(held_out.x)
        examples += len(held_out)
        correct += int((logits.argmax(1) == held_out.y).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, held_out.y, reduction="sum"))
    assert result.examples == examples and result.correct == correct
    assert result.loss == pytest.approx(loss / examples, rel=1e-6)
    assert result.accuracy == pytest.approx(correct / examples)
    assert sorted(result.per_silo) == ["0", "1"]
    assert "accuracy outside [0, 1]" in result.rejected["2"]


def make_evaluation(examples: object, correct: object, loss: object) -> Message:
    sent = Message(content=RecordDict(), message_type=MessageType.EVALUATE, dst_node_id=1)
    return Message(content=RecordDict({messages.EVALUATION_KEY: MetricRecord(
        {"examples": examples, "correct": correct, "loss-sum": loss})}), reply_to=sent)


@pytest.mark.parametrize(("sums", "declared", "reason"), [
    ((120, 100, 30.0), 100, "more than the 100 held-out records it declared"),
    ((50, 51, 30.0), 100, "accuracy outside"),
    ((50, -1, 30.0), 100, "accuracy outside"),
    ((50, 20, -1.0), 100, "negative or not finite"),
    ((50, 20, math.inf), 100, "negative or not finite"),
    ((0, 0, 0.0), 100, "examples=0"),
])
def test_a_lying_silos_evaluation_is_refused(sums: tuple, declared: int, reason: str) -> None:
    assert reason in screen_evaluation(make_evaluation(*sums), declared)


def test_an_honest_silos_evaluation_passes() -> None:
    assert screen_evaluation(make_evaluation(50, 20, 30.0), 50) == (50, 20, 30.0)


def test_a_silo_that_does_not_allow_evaluation_declines(tmp_path: Path) -> None:
    from client_app.app import evaluate

    folder = write_silos(tmp_path / "silos", 1)
    config = RunConfig.from_mapping({**local_config(folder).to_dict(), "input-shape": "64",
                                     "num-classes": 10})
    context = silo_context(1, 0, 1, **{"allow-evaluation": "false"})
    sent = Message(content=RecordDict({"config": ConfigRecord(config.to_dict())}),
                   message_type=MessageType.EVALUATE, dst_node_id=1)
    answer = evaluate(sent, context)
    assert answer.content[messages.DECLINE_KEY]["reason"] == "evaluation-not-allowed"


# ----- what a silo publishes of itself under DP ----------------------------------------

def fingerprint(folder: Path, **node_config: object) -> dict:
    config = local_config(folder, dp="central", num_classes=10)
    return compute.prepare(config, silo_context(1, 0, 1, **node_config))


@pytest.mark.slow
def test_under_dp_a_silo_keeps_its_count_and_label_set(tmp_path: Path) -> None:
    folder = write_silos(tmp_path / "silos", 1)
    plain = compute.prepare(local_config(folder), silo_context(1, 0, 1))
    assert plain["records"] > 0 and plain["labels"] and plain["eval-records"] > 0
    private = fingerprint(folder)
    # the held-out count is a tenth of the record count: withheld, and evaluation declined
    assert "records" not in private and private["labels"] == [] and private["eval-records"] == 0
    assert "stamp" not in private and "stamp" not in plain
    held_out = folder / "silo-0.parquet"
    assert fingerprint(folder, **{"eval-data": str(held_out)})["eval-records"] > 0
    assert fingerprint(folder, **{"allow-evaluation": "true"})["eval-records"] > 0


def test_under_dp_why_a_silos_data_is_unusable_stays_on_the_silo(tmp_path: Path) -> None:
    folder = write_silos(tmp_path / "silos", 1)
    table = pd.read_parquet(folder / "silo-0.parquet")
    table["category"] = "c7"  # a string column without a declared vocabulary
    table.to_parquet(folder / "silo-0.parquet", index=False)
    answer = fingerprint(folder)
    assert "category" not in answer["error"] and "SuperNode's log" in answer["error"]
    assert "category" in compute.prepare(local_config(folder, num_classes=10),
                                         silo_context(1, 0, 1))["error"]


def test_under_dp_the_run_must_declare_its_classes(tmp_path: Path) -> None:
    table = digits_table()
    config, answers = schema_answers(tmp_path, [table.iloc[:900], table.iloc[900:]])
    private = RunConfig.from_mapping({**config.to_dict(), "record-dp": "on"})
    with pytest.raises(ConfigError, match="declare num-classes"):
        agree_on_schema(private, answers)
    declared = RunConfig.from_mapping({**private.to_dict(), "num-classes": 10})
    assert agree_on_schema(declared, answers)[0].num_classes == 10


def test_under_client_dp_evaluation_is_declined_unless_it_cannot_tell_the_count(
        tmp_path: Path) -> None:
    from client_app.app import evaluate

    folder = write_silos(tmp_path / "silos", 1)
    config = RunConfig.from_mapping({**local_config(folder).to_dict(), "input-shape": "64",
                                     "num-classes": 10, "dp": "central"})
    sent = Message(content=RecordDict({"config": ConfigRecord(config.to_dict())}),
                   message_type=MessageType.EVALUATE, dst_node_id=1)
    answer = evaluate(sent, silo_context(1, 0, 1))
    assert answer.content[messages.DECLINE_KEY]["reason"] == "count-private"


# ----- the silo's own data in a round -----------------------------------------------------

def test_a_file_changed_mid_run_is_declined(tmp_path: Path) -> None:
    folder = write_silos(tmp_path / "silos", 1)
    config = RunConfig.from_mapping({**local_config(folder).to_dict(), "input-shape": "64",
                                     "num-classes": 10})
    context = silo_context(1, 0, 1)
    compute.silo(config, context)
    table = pd.read_parquet(folder / "silo-0.parquet")
    table.iloc[:-5].to_parquet(folder / "silo-0.parquet", index=False)
    with pytest.raises(Exception, match="changed since the run first read them"):
        compute.silo(config, context)


def test_the_held_out_split_is_the_silos_not_the_servers(tmp_path: Path) -> None:
    """A server that changed the run's seed between runs would move records between the
    held-out set (evaluated, no epsilon) and the training set; the silo's eval-seed and
    eval-fraction choose it."""
    folder = write_silos(tmp_path / "silos", 1)
    device = torch.device("cpu")

    def held_out(seed: int, **node_config: object) -> torch.Tensor:
        config = RunConfig.from_mapping({**local_config(folder).to_dict(), "seed": seed,
                                         "input-shape": "64", "num-classes": 10})
        return compute._local_tensors(config, silo_context(1, 0, 1, **node_config), device,
                                      held_out=True).x

    assert torch.equal(held_out(0), held_out(5))
    assert not torch.equal(held_out(0), held_out(0, **{"eval-seed": 3}))
    assert len(held_out(5, **{"eval-fraction": 0.2})) > 1.5 * len(held_out(5))
    with pytest.raises(Exception, match="eval-fraction"):
        held_out(0, **{"eval-fraction": "most"})


def test_a_silo_evaluates_once_a_round_in_increasing_rounds(tmp_path: Path) -> None:
    folder = write_silos(tmp_path / "silos", 1)
    config = RunConfig.from_mapping({**local_config(folder).to_dict(), "input-shape": "64",
                                     "num-classes": 10, "num-server-rounds": 3})
    model = model_from_config(config)
    context = silo_context(1, 0, 1)

    def ask(server_round: int) -> RecordDict:
        return compute.evaluate(RecordDict({
            "arrays": messages.tensors_record(travelling_state(model)),
            "config": ConfigRecord({**config.to_dict(), "server-round": server_round})}),
            context)

    assert messages.EVALUATION_KEY in ask(1)
    for replayed in (1, 0, 4):  # again, earlier, or beyond the run's last round
        assert ask(replayed)[messages.DECLINE_KEY]["reason"] == "evaluation-replayed"
    assert messages.EVALUATION_KEY in ask(2)


def test_a_run_cannot_change_how_a_silo_reads_its_data_mid_run(tmp_path: Path) -> None:
    folder = write_silos(tmp_path / "silos", 1)
    context = silo_context(1, 0, 1)
    compute.silo(local_config(folder, num_classes=10), context)
    with pytest.raises(Exception, match="differently from its first message"):
        compute.silo(local_config(folder, num_classes=10, feature_columns="px1,px2"), context)


def test_under_dp_unusable_records_are_left_out_not_refused(tmp_path: Path) -> None:
    """A refusal would tell the server that a record with an undeclared label exists (and
    the server picks the declared classes)."""
    folder = write_silos(tmp_path / "silos", 1)
    table = pd.read_parquet(folder / "silo-0.parquet")
    table.loc[0, "label"] = 12
    table.loc[1, "px3"] = np.nan
    table.to_parquet(folder / "silo-0.parquet", index=False)
    private = local_config(folder, num_classes=10, record_dp="on")
    data = compute.silo(private, silo_context(1, 0, 1))
    assert data.schema.records + data.schema.eval_records == len(table) - 2
    with pytest.raises(Exception, match="outside the declared classes"):
        compute.silo(local_config(folder, num_classes=10), silo_context(2, 0, 1))


def test_adding_a_record_moves_no_other_record_between_held_out_and_training(
        tmp_path: Path) -> None:
    """Under add/remove accounting the training set may change by the one record only."""
    table = digits_table()
    table.iloc[:500].to_parquet(tmp_path / "a.parquet", index=False)
    table.iloc[:501].to_parquet(tmp_path / "b.parquet", index=False)
    spec = local_spec(local_config(tmp_path, feature_scaling="none"))
    before = load_silo(tmp_path / "a.parquet", spec)
    after = load_silo(tmp_path / "b.parquet", spec)
    rows = {r.tobytes() for r in before.held_out.inputs}
    assert rows <= {r.tobytes() for r in after.held_out.inputs}
    assert len(after.train.labels) + len(after.held_out.labels) == 501
    assert abs(len(after.train.labels) - len(before.train.labels)) <= 1


def test_feature_scaling_by_the_silo_is_refused_under_record_dp() -> None:
    with pytest.raises(ConfigError, match="feature-scaling='silo' with record-dp"):
        make_config(dataset="local", model="mlp", record_dp="on", feature_scaling="silo")
    assert local_spec(make_config(dataset="local", model="mlp", record_dp="on")
                      ).feature_scaling == "none"
    assert local_spec(make_config(dataset="local", model="mlp")).feature_scaling == "silo"


def test_under_dp_column_types_are_published_as_their_class(tmp_path: Path) -> None:
    folder = write_silos(tmp_path / "silos", 1)
    private = fingerprint(folder)
    assert set(private["column-types"]) == {"number"}
    plain = compute.prepare(local_config(folder), silo_context(1, 0, 1))
    assert "number" not in plain["column-types"]


def test_a_silo_refuses_a_model_record_dp_cannot_train(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "silo_usermodel_bn2.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = write_silos(tmp_path / "silos", 1)
    config = RunConfig.from_mapping({**local_config(folder).to_dict(), "input-shape": "64",
                                     "num-classes": 10, "record-dp": "on",
                                     "model": "silo_usermodel_bn2:batchnorm"})
    model = model_from_config(config)
    content = RecordDict({"arrays": messages.tensors_record(travelling_state(model)),
                          "config": ConfigRecord({**config.to_dict(), "server-round": 1,
                                                  "local-rule": "sgd", "round-lr": 0.1,
                                                  "expected-cohort": 1.0})})
    with pytest.raises(Exception, match=r"cannot train .*BatchNorm1d"):
        compute.train(content, silo_context(1, 0, 1))


def test_a_node_without_data_says_how_to_name_it(tmp_path: Path) -> None:
    config = make_config(dataset="local", model="mlp")
    with pytest.raises(Exception, match='--node-config "data=<file or folder>"'):
        compute.silo(config, silo_context(1, 0, 1))


def test_the_node_configs_data_takes_precedence_over_data_dir(tmp_path: Path) -> None:
    folder = write_silos(tmp_path / "silos", 2)
    config = local_config(tmp_path / "elsewhere")
    data = compute.silo(config, silo_context(1, 0, 2, data=str(folder / "silo-1.parquet")))
    assert data.schema.input_shape == (64,)


USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    CALLS = []

    def build(spec, num_classes):
        CALLS.append((spec.kind, tuple(spec.shape), num_classes))
        width = 1
        for d in spec.shape:
            width *= d
        return nn.Sequential(nn.Flatten(), nn.Linear(width, 16), nn.Tanh(),
                             nn.Linear(16, num_classes))

    def batchnorm(spec, num_classes):
        return nn.Sequential(nn.Linear(spec.shape[0], 8), nn.BatchNorm1d(8),
                             nn.Linear(8, num_classes))
''')


def test_the_users_model_is_built_from_its_import_path(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "silo_usermodel.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = RunConfig.from_mapping({"dataset": "local", "model": "silo_usermodel:build",
                                     "input-shape": "64", "num-classes": 10})
    model = model_from_config(config)
    import silo_usermodel

    assert silo_usermodel.CALLS[-1] == ("tabular", (64,), 10)
    assert model(torch.zeros(3, 64)).shape == (3, 10)
    again = model_from_config(config)  # the same seed: the same weights everywhere
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values(), strict=True))


@pytest.mark.slow
def test_a_user_model_opacus_cannot_train_is_refused_naming_the_layer(
        tmp_path: Path, monkeypatch) -> None:
    from server_app.build import build_strategy

    (tmp_path / "silo_usermodel_bn.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = RunConfig.from_mapping({"dataset": "local", "model": "silo_usermodel_bn:batchnorm",
                                     "input-shape": "64", "num-classes": 10,
                                     "record-dp": "on"})
    with pytest.raises(ConfigError, match=r"Opacus refuses layer '1' \(BatchNorm1d\)"):
        build_strategy(config)


def test_a_missing_user_model_says_where_to_install_it() -> None:
    config = RunConfig.from_mapping({"dataset": "local", "model": "not_installed_pkg:build",
                                     "input-shape": "64", "num-classes": 10})
    with pytest.raises(Exception, match="install it where the ServerApp and every ClientApp"):
        model_from_config(config)


# ----- whole runs -------------------------------------------------------------------------

@pytest.mark.simulation
def test_parquet_silos_train_with_record_dp_and_federated_evaluation(tmp_path: Path) -> None:
    folder = write_silos(tmp_path / "silos", 3)
    summary, rounds = simulate(
        tmp_path, 3, dataset="local", data_dir=str(folder), model="mlp", sample_rate=1.0,
        num_classes=10, record_dp="on", record_target_epsilon=8.0, num_server_rounds=3,
        local_steps=10,
        batch_size=32, lr=0.5)
    assert summary["status"] == "completed" and summary["evaluation"] == "federated"
    assert rounds[-1]["federated_examples"] > 0 and len(rounds[-1]["federated_silos"]) == 3
    # the DP noise is the OS's: how much it learns is the benchmark's business; that it
    # learns is the CSV test's (no noise, seeded)
    assert rounds[-1]["test_accuracy"] == rounds[-1]["federated_accuracy"]
    assert 0.0 <= rounds[-1]["federated_accuracy"] <= 1.0
    assert summary["config"]["input-shape"] == "64" and summary["config"]["num-classes"] == 10
    # a record-only run publishes each silo's count and epsilon (substitution accounting)
    assert set(summary["record_privacy"]["epsilon_per_silo"]) == {"0", "1", "2"}
    assert max(summary["record_privacy"]["epsilon_per_silo"].values()) <= 8.0 + 1e-6
    assert "federated_accuracy" in summary["privacy"]["outside_epsilon"]["rounds.jsonl"]
    assert set(summary["silo_schemas"]) == {"0", "1", "2"}
    from server_app.results import ROUND_KEYS, SUMMARY_KEYS

    assert set().union(*rounds) <= set(ROUND_KEYS) and set(summary) <= set(SUMMARY_KEYS)
    assert summary["federated"]["federated_silos"] == rounds[-1]["federated_silos"]


@pytest.mark.simulation
def test_csv_silos_with_one_bad_silo_go_on_without_it(tmp_path: Path) -> None:
    table = digits_table()
    folder = write_silos(tmp_path / "silos", 3, "csv", table)
    broken = pd.read_csv(folder / "silo-2.csv")
    broken.loc[3, "px10"] = np.nan
    broken.to_csv(folder / "silo-2.csv", index=False)
    summary, rounds = simulate(tmp_path, 3, dataset="local", data_dir=str(folder), model="mlp",
                               sample_rate=1.0, num_server_rounds=2, local_steps=5)
    assert summary["status"] == "completed"
    # the reason (naming the column) is the silo's, and the server's log of its schema answer
    assert rounds[-1]["declined"] == {"silo-data": 1}
    assert rounds[-1]["federated_accuracy"] > 0.5  # no DP: seeded, the same every run
    assert sorted(rounds[-1]["federated_silos"]) == ["0", "1"]


@pytest.mark.slow
def test_the_readme_walkthrough_writes_the_silos_its_make_run_reads(tmp_path: Path) -> None:
    """README 'Your own data', step 1 as written (step 2 is the e2e test's command)."""
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"# 1\. one file or folder per silo.*?\n(.*?)\n# 2\.", readme, re.S)
    assert block is not None, "README 'Your own data' lost its walkthrough"
    script = block[1].replace(".venv/bin/python", sys.executable, 1)
    subprocess.run(["bash", "-c", script], cwd=tmp_path, check=True)
    step2 = re.search(r'make run CLIENTS=3 CONFIG="(.*?)"', readme[block.end():])
    assert step2 is not None and "data-dir='silos'" in step2[1]
    from server_app.launcher import parse_overrides

    config = {**parse_overrides(step2[1]), "data-dir": str(tmp_path / "silos")}
    assert check_data_dir(RunConfig.from_mapping(config), 3).input_shape == "64"


def test_under_dp_images_of_another_size_are_left_out_not_refused(tmp_path: Path) -> None:
    from PIL import Image

    for label in (0, 1):
        folder = tmp_path / "silo-0" / str(label)
        folder.mkdir(parents=True)
        for j in range(8):
            size = 12 if (label, j) == (1, 7) else 8  # one record of another size
            Image.fromarray(np.full((size, size), 30 * j, np.uint8), mode="L").save(
                folder / f"{j}.png")
    private = make_config(dataset="local", data_dir=str(tmp_path), model="cnn", num_classes=2,
                          record_dp="on")
    data = compute.silo(private, silo_context(1, 0, 1))
    assert data.schema.input_shape == (1, 8, 8)
    assert data.schema.records + data.schema.eval_records == 15
    with pytest.raises(Exception, match="mixed sizes"):
        compute.silo(make_config(dataset="local", data_dir=str(tmp_path), model="cnn"),
                     silo_context(2, 0, 1))
