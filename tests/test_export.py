"""The model a run releases (``<run>/model``) and ``plateau.predict``.

Whole simulations on silo files written here from real offline data (digits, Rotten Tomatoes):
the export of each kind of model — linear, mlp, cnn, the user's own, a LoRA transformer merged
and as adapters — read back by predict from its folder alone, on the server's own test-data
file, must give the run's own central evaluation of that round exactly (the loss too, to float
rounding where LoRA is merged). Then every kind of bad input to predict, on real files: one line
on stderr and exit status 2. And what model.json says of the release's privacy and selection.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from plateau.config import ConfigError, RunConfig
from plateau.export import DESCRIPTOR_KEYS, FORMAT_VERSION, load_export, write_export
from plateau.models import model_from_config, travelling_state
from plateau.predict import main as predict_main
from plateau.predict import predict
from server_app.callbacks import ModelChoice, RoundOutcome
from server_app.release import release_privacy, selection
from strategies.screening import RoundStats

from .helpers import simulate
from .test_local_data import USER_MODEL, digits_table, write_image_silos, write_silos

ROOT = Path(__file__).resolve().parent.parent


def split_digits(tmp_path: Path, fmt: str = "parquet") -> tuple[Path, Path]:
    """Three silos of digits and the server's own test file (every 7th record, in no silo)."""
    table = digits_table()
    test = table.iloc[::7]
    folder = write_silos(tmp_path / "silos", 3, fmt, table.drop(test.index))
    path = tmp_path / f"test.{fmt}"
    if fmt == "csv":
        test.to_csv(path, index=False)
    else:
        test.to_parquet(path, index=False)
    return folder, path


def round_of(rounds: list[dict], server_round: int) -> dict:
    return next(r for r in rounds if r["round"] == server_round)


def assert_reproduced(tmp_path: Path, summary: dict, rounds: list[dict], test_data: Path,
                      loss_tolerance: float = 0.0) -> None:
    """predict, from the export alone, gives the exported round's central evaluation."""
    model = summary["model"]
    recorded = round_of(rounds, model["round"])
    export = load_export(tmp_path / "sim" / "model")
    result = predict(export, test_data)
    assert result.accuracy == recorded["test_accuracy"] == model["central_accuracy"]
    assert math.isclose(result.loss, recorded["test_loss"], rel_tol=loss_tolerance,
                        abs_tol=0.0 if loss_tolerance == 0 else 1e-7)
    assert export.descriptor["round"] == model["round"]
    assert set(export.descriptor) == set(DESCRIPTOR_KEYS)  # docs/outputs.md lists them
    assert export.descriptor["config_digest"]


@pytest.mark.simulation
def test_an_mlp_on_parquet_silos_under_record_dp_keeps_its_best_central_round(
        tmp_path: Path) -> None:
    folder, test = split_digits(tmp_path)
    summary, rounds = simulate(
        tmp_path, 3, dataset="local", data_dir=str(folder), test_data=str(test), model="mlp",
        mlp_widths="32", sample_rate=1.0, num_classes=10, record_dp="on",
        record_target_epsilon=8.0, num_server_rounds=3, local_steps=5, keep_best="central")
    assert summary["status"] == "completed" and summary["evaluation"] == "both"
    best = max(rounds, key=lambda r: (r["test_accuracy"], -r["round"]))
    assert summary["model"]["round"] == best["round"]
    assert summary["model"]["value"] == best["test_accuracy"]
    assert all(r["federated_accuracy"] is not None for r in rounds)  # both evaluations ran
    assert_reproduced(tmp_path, summary, rounds, test)
    descriptor = json.loads((tmp_path / "sim" / "model" / "model.json").read_text())
    # the release's record-level guarantee is summary.json's, silo by silo
    record_level = descriptor["privacy"]["record_level"]
    assert {p: silo["epsilon"] for p, silo in record_level["silos"].items()} == \
        summary["record_privacy"]["epsilon_per_silo"]
    # one delta bound, above each silo's own: a silo's default delta, min(1e-5, 0.01/n), would
    # tell its count
    assert record_level["delta_at_most"] == 1e-5 >= max(
        report["delta"] for report in summary["record_privacy"]["silos"].values())
    # the silos' counts are the operator's telemetry: they do not travel with the model
    assert "records" not in json.dumps(record_level)
    assert record_level["adjacency"] == summary["record_privacy"]["adjacency"]
    assert descriptor["privacy"]["formally_dp"] is True
    assert descriptor["privacy"]["client_level"] is None
    assert descriptor["selection"]["post_processing"] is True
    assert descriptor["build"]["feature-columns"] == ",".join(f"px{i}" for i in range(64))
    assert descriptor["preprocessing"]["feature_scaling"] == "none"  # record-dp: 'auto'


@pytest.mark.simulation
def test_a_linear_model_on_csv_silos_and_predict_on_the_command_line(tmp_path: Path) -> None:
    folder, test = split_digits(tmp_path, "csv")
    summary, rounds = simulate(tmp_path, 3, dataset="local", data_dir=str(folder),
                               test_data=str(test), model="linear", sample_rate=1.0,
                               num_server_rounds=2, local_steps=5)
    assert summary["model"]["round"] == 2 and summary["model"]["keep_best"] == "last"
    assert_reproduced(tmp_path, summary, rounds, test)
    assert rounds[-1]["test_accuracy"] > 0.5  # no DP: seeded
    output = tmp_path / "predictions.parquet"
    done = subprocess.run(
        [sys.executable, "-m", "plateau.predict", "--model", str(tmp_path / "sim" / "model"),
         "--data", str(test), "--output", str(output)],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    records = len(pd.read_csv(test))
    correct = round(rounds[-1]["test_accuracy"] * records)
    assert f"accuracy {rounds[-1]['test_accuracy']:.6f} ({correct} of {records} records" \
        in done.stdout
    written = pd.read_parquet(output)
    assert len(written) == records and list(written["record"]) == list(range(records))
    assert (written["prediction"] == written["label"]).mean() == rounds[-1]["test_accuracy"]


@pytest.mark.simulation
def test_a_cnn_on_image_folder_silos(tmp_path: Path) -> None:
    folder = write_image_silos(tmp_path / "silos", 3)
    test = tmp_path / "test"
    (folder / "silo-2").rename(test)  # the third silo's images are the server's test set
    summary, rounds = simulate(tmp_path, 2, dataset="local", data_dir=str(folder),
                               test_data=str(test), model="cnn", model_width=8,
                               sample_rate=1.0, num_server_rounds=2, local_steps=5)
    assert summary["config"]["input-shape"] == "1x8x8"
    assert rounds[-1]["federated_accuracy"] is not None and len(rounds[-1]["federated_silos"]) == 2
    assert_reproduced(tmp_path, summary, rounds, test)
    descriptor = load_export(tmp_path / "sim" / "model").descriptor
    assert descriptor["input"]["kind"] == "image" and descriptor["input"]["shape"] == [1, 8, 8]


@pytest.mark.simulation
def test_the_users_model_from_its_import_path(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "export_usermodel.py").write_text(USER_MODEL)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.syspath_prepend(str(tmp_path))
    folder, test = split_digits(tmp_path)
    summary, rounds = simulate(tmp_path, 3, dataset="local", data_dir=str(folder),
                               test_data=str(test), model="export_usermodel:build",
                               sample_rate=1.0, num_server_rounds=2, local_steps=5)
    # the workers import the user's module as a deployment's would: from the environment
    assert summary["status"] == "completed" and rounds[-1]["num_clients"] == 3
    assert_reproduced(tmp_path, summary, rounds, test)
    descriptor = load_export(tmp_path / "sim" / "model").descriptor
    assert descriptor["architecture"]["import_path"] == "export_usermodel:build"


def write_text_silos(tmp_path: Path) -> tuple[Path, Path]:
    """Rotten Tomatoes snippets: two JSON lines silos and the server's Parquet test file."""
    from plateau.data import load_splits

    train, held = load_splits("rotten-tomatoes", 0.2, 0)
    folder = tmp_path / "silos"
    folder.mkdir()
    for i in range(2):
        pd.DataFrame({"text": train.inputs[i:800:2], "label": train.labels[i:800:2]}).to_json(
            folder / f"silo-{i}.jsonl", orient="records", lines=True)
    test = tmp_path / "test.parquet"
    pd.DataFrame({"text": held.inputs[:200], "label": held.labels[:200]}).to_parquet(test)
    return folder, test


@pytest.mark.simulation
@pytest.mark.parametrize("export_lora", ["merged", "adapters"])
def test_a_lora_transformer_merged_or_as_adapters(tmp_path: Path, export_lora: str) -> None:
    folder, test = write_text_silos(tmp_path)
    summary, rounds = simulate(tmp_path, 2, dataset="local", data_dir=str(folder),
                               test_data=str(test), text_column="text", model="tiny-bert",
                               trainable="lora", export_lora=export_lora, max_length=32,
                               sample_rate=1.0, num_server_rounds=2, local_steps=5, lr=0.5)
    files = {p.name for p in (tmp_path / "sim" / "model").iterdir()}
    assert {"model.json", "model.safetensors", "tokenizer.json"} <= files
    if export_lora == "merged":  # a plain transformers model: no adapter left in it
        assert "config.json" in files
        from transformers import AutoModelForSequenceClassification

        net = AutoModelForSequenceClassification.from_pretrained(tmp_path / "sim" / "model")
        assert not any("lora" in name for name, _ in net.named_parameters())
        # merging W + (alpha/r) B A changes the float rounding of the logits, not the classes
        assert_reproduced(tmp_path, summary, rounds, test, loss_tolerance=1e-5)
    else:  # the adapters and the head, on the base rebuilt from its source
        from safetensors.torch import load_file

        names = set(load_file(str(tmp_path / "sim" / "model" / "model.safetensors")))
        assert names and all("lora_" in n or "classifier" in n for n in names)
        assert_reproduced(tmp_path, summary, rounds, test)


# ----- bad input to predict -----------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mlp's export for digits' 64 pixel columns, written as a run writes it."""
    folder = tmp_path_factory.mktemp("export")
    config = RunConfig.from_mapping({"dataset": "local", "model": "mlp", "mlp-widths": "16",
                                     "input-shape": "64", "num-classes": 10,
                                     "feature-scaling": "none"})
    state = travelling_state(model_from_config(config))
    columns = tuple(f"px{i}" for i in range(64))
    write_export(folder / "model", config, state, server_round=3, run_name="r",
                 selection=selection(config, 3, None), privacy={"formally_dp": False},
                 feature_columns=columns)
    digits_table().to_parquet(folder / "digits.parquet", index=False)
    return folder


def copy_of(exported: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "model"
    shutil.copytree(exported / "model", target)
    return target


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """predict's exit status 2 and its one line on stderr."""
    assert predict_main(list(argv)) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("plateau.predict: "), error
    return error


def test_predict_reads_the_file_and_writes_every_prediction(exported: Path,
                                                            tmp_path: Path) -> None:
    table = digits_table()
    unlabelled = tmp_path / "unlabelled.csv"
    table.drop(columns="label").assign(extra="x").to_csv(unlabelled, index=False)
    output = tmp_path / "out.csv"
    assert predict_main(["--model", str(exported / "model"), "--data", str(unlabelled),
                         "--output", str(output)]) == 0
    written = pd.read_csv(output)
    export = load_export(exported / "model")
    x = torch.tensor(table.drop(columns="label").to_numpy(), dtype=torch.float32)
    with torch.no_grad():
        expected = export.model(x).argmax(1).numpy()
    assert len(written) == len(table) and "label" not in written
    np.testing.assert_array_equal(written["prediction"].to_numpy(), expected)


def test_a_file_of_another_schema_is_refused(exported: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.parquet"
    pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "label": [0, 1]}).to_parquet(other)
    error = refused(capsys, "--model", str(exported / "model"), "--data", str(other))
    assert "no feature column 'px0'" in error


@pytest.mark.parametrize(("dropped", "message"), [
    ("px7", "'px7'"),  # a missing feature column
    ("label", "give --output"),  # unlabelled data, and nowhere to write the predictions
])
def test_a_file_without_a_column_it_needs_is_refused(
        exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], dropped: str,
        message: str) -> None:
    data = tmp_path / "data.parquet"
    digits_table().drop(columns=dropped).to_parquet(data)
    assert message in refused(capsys, "--model", str(exported / "model"), "--data", str(data))


def test_an_export_of_a_newer_format_is_refused(exported: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    model = copy_of(exported, tmp_path)
    descriptor = json.loads((model / "model.json").read_text())
    descriptor["format_version"] = FORMAT_VERSION + 1
    (model / "model.json").write_text(json.dumps(descriptor))
    error = refused(capsys, "--model", str(model), "--data", str(exported / "digits.parquet"))
    assert f"export format {FORMAT_VERSION + 1}, newer" in error and "upgrade Plateau" in error


def test_a_truncated_weights_file_is_refused(exported: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    model = copy_of(exported, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    error = refused(capsys, "--model", str(model), "--data", str(exported / "digits.parquet"))
    assert "truncated or altered" in error
    # and when model.json was rewritten to match, safetensors itself refuses it: one line too
    import hashlib

    descriptor = json.loads((model / "model.json").read_text())
    descriptor["files"]["model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (model / "model.json").write_text(json.dumps(descriptor))
    error = refused(capsys, "--model", str(model), "--data", str(exported / "digits.parquet"))
    assert "cannot be loaded" in error


def test_a_folder_that_is_no_export_is_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert "no model.json" in refused(capsys, "--model", str(tmp_path), "--data",
                                      str(tmp_path / "x.parquet"))


# ----- what model.json says -----------------------------------------------------------------

CENTRAL_DP = {"dp": "central", "formally_dp": True, "epsilon": 2.5, "delta": 1e-5,
              "adjacency": "zero-out", "accountant": "rdp", "outside_epsilon": {}}


def test_the_release_states_the_runs_guarantee_or_why_none_holds() -> None:
    config = RunConfig.from_mapping({"dp": "central"})
    chosen = selection(config, 5, None)
    released = release_privacy(CENTRAL_DP, None, chosen)
    assert released["formally_dp"] is True
    assert released["client_level"]["epsilon"] == 2.5
    assert released["client_level"]["delta"] == 1e-5
    void = release_privacy({**CENTRAL_DP, "epsilon": None,
                            "epsilon_void_reason": "PLATEAU_TEST_SEED is set"}, None, chosen)
    assert void["formally_dp"] is False and void["client_level"] is None
    assert void["why_not"]["client_level"] == "PLATEAU_TEST_SEED is set"


def test_choosing_the_round_by_federated_accuracy_under_dp_is_not_post_processing() -> None:
    config = RunConfig.from_mapping({"dataset": "local", "dp": "central",
                                     "keep-best": "federated"})
    chosen = selection(config, 4, 0.8)
    assert chosen["post_processing"] is False
    released = release_privacy(CENTRAL_DP, None, chosen)
    assert released["formally_dp"] is False and "selection" in released["why_not"]
    assert released["client_level"]["epsilon"] == 2.5  # the training's guarantee, still shown
    central = RunConfig.from_mapping({"dp": "central", "keep-best": "central"})
    assert selection(central, 4, 0.8)["post_processing"] is True
    # chosen on the split it is scored on: said to be optimistic, unless a validation split
    assert "optimistic" in selection(central, 4, 0.8)["note"]
    validated = RunConfig.from_mapping({"keep-best": "central", "validation-fraction": 0.1})
    assert "optimistic" not in selection(validated, 4, 0.8)["note"]


def test_the_best_round_and_its_model_survive_a_resume() -> None:
    from types import SimpleNamespace

    config = RunConfig.from_mapping({"keep-best": "central"})
    strategy = SimpleNamespace(current={})
    choice = ModelChoice(config, strategy)  # type: ignore[arg-type]
    for server_round, accuracy in ((1, 0.5), (2, 0.7), (3, 0.6)):
        strategy.current = {"w": torch.full((2,), float(server_round))}
        choice.after_round(RoundOutcome(server_round, 0.0, RoundStats(),
                                        [], {"test_accuracy": accuracy}))
    assert choice.round == 2 and torch.equal(choice.state["w"], torch.full((2,), 2.0))
    resumed = ModelChoice(config, strategy)  # type: ignore[arg-type]
    resumed.load_state_dict(choice.state_dict())
    assert resumed.round == 2 and resumed.value == 0.7
    assert torch.equal(resumed.state["w"], choice.state["w"])


@pytest.mark.parametrize(("overrides", "message"), [
    ({"test-data": "t.parquet"}, "test-data with dataset='digits'"),
    ({"dataset": "local", "evaluate": "central"}, "needs test-data"),
    ({"dataset": "local", "keep-best": "central"}, "keep-best='central' without central"),
    ({"keep-best": "federated"}, "keep-best='federated'"),
    ({"evaluate": "both"}, "evaluate='both' with dataset='digits'"),
])
def test_evaluation_and_export_mistakes_are_one_line_errors(overrides: dict,
                                                            message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(overrides)


@pytest.mark.slow
def test_a_bundled_datasets_model_predicts_files_with_its_columns(tmp_path: Path) -> None:
    """digits' export reads an image folder of 8x8 digits as the run's held-out split is read
    (pixels / 255, digits' mean and std)."""
    from plateau.data import DATASETS, Split, to_tensors
    from plateau.models import score

    from .test_local_data import write_image_silos

    config = RunConfig.from_mapping({"dataset": "digits", "model": "linear"})
    model = model_from_config(config)
    with torch.no_grad():
        model.fc.weight.normal_()
    write_export(tmp_path / "model", config, travelling_state(model), server_round=1,
                 run_name="r", selection=selection(config, 1, None),
                 privacy={"formally_dp": False})
    folder = write_image_silos(tmp_path / "images", 1) / "silo-0"
    export = load_export(tmp_path / "model")
    result = predict(export, folder)
    from plateau.silo_data import read_records

    records = read_records(folder, export.spec)
    tensors = to_tensors(Split(records.split.inputs, records.split.labels), DATASETS["digits"])
    correct, _ = score(model, tensors.x, tensors.y)
    assert result.accuracy == correct / len(tensors) and len(tensors) == 1797


@pytest.mark.slow
@pytest.mark.parametrize(("build", "data"), [
    ({"dataset": "digits", "model": "tiny-vit", "lora-targets": "q_proj,v_proj"}, "image"),
    ({"dataset": "rotten-tomatoes", "model": "minilm"}, "text"),  # a mean-pooled encoder
])
def test_merged_lora_exports_compute_what_the_trained_model_computes(
        tmp_path: Path, build: dict, data: str) -> None:
    """LoRA merged into a ViT, and into MiniLM under its own mean-pooling head (saved beside the
    encoder): the loaded export's logits are the adapted model's, to float rounding."""
    config = RunConfig.from_mapping({**build, "trainable": "lora"})
    model = model_from_config(config)
    state = travelling_state(model)
    with torch.no_grad():  # trained adapters: B is zero at initialisation
        state = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}
    from plateau.models import load_travelling

    load_travelling(model, state)
    write_export(tmp_path / "model", config, state, server_round=1, run_name="r",
                 selection=selection(config, 1, None), privacy={"formally_dp": False})
    export = load_export(tmp_path / "model")
    if data == "image":
        x = torch.rand(4, 1, 8, 8)
    else:
        from plateau.data import Split, tokenise

        x = tokenise(Split(np.array(["a fine film", "dull and long"], dtype=object),
                           np.zeros(2)), export.inputs.tokenizer, config.max_length).x
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(export.model(x), model(x), rtol=1e-4, atol=1e-5)
    assert not any("lora" in name for name in export.model.state_dict())


# ----- a second reviewer's findings -----------------------------------------------------------

@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("input"), "'input' is missing"),
    (lambda d: d.__setitem__("architecture", "x"), "'architecture' is missing or not an object"),
    (lambda d: d.pop("round"), "'round' is missing"),
    (lambda d: d.__setitem__("label_names", ["a", "b"]), "one name per class"),
    (lambda d: d.__setitem__("build", "x"), "'build' is missing or not an object"),
])
def test_a_malformed_model_json_is_one_line(exported: Path, tmp_path: Path, edit, message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    model = copy_of(exported, tmp_path)
    descriptor = json.loads((model / "model.json").read_text())
    edit(descriptor)
    (model / "model.json").write_text(json.dumps(descriptor))
    output = tmp_path / "out.parquet"
    assert message in refused(capsys, "--model", str(model), "--data",
                              str(exported / "digits.parquet"), "--output", str(output))
    assert not output.exists()


def test_predictions_go_to_parquet_or_csv_only(exported: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert "write .parquet or .csv" in refused(
        capsys, "--model", str(exported / "model"), "--data", str(exported / "digits.parquet"),
        "--output", str(tmp_path / "out.json"))


def test_a_model_that_scales_per_file_refuses_a_single_record(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = RunConfig.from_mapping({"dataset": "local", "model": "linear", "input-shape": "64",
                                     "num-classes": 10, "feature-scaling": "silo"})
    write_export(tmp_path / "model", config, travelling_state(model_from_config(config)),
                 server_round=1, run_name="r", selection=selection(config, 1, None),
                 privacy={"formally_dp": False})
    one = tmp_path / "one.csv"
    digits_table().iloc[:1].to_csv(one, index=False)
    assert "holds one record" in refused(capsys, "--model", str(tmp_path / "model"), "--data",
                                         str(one))
    many = tmp_path / "many.csv"
    digits_table().iloc[:50].to_csv(many, index=False)
    assert predict_main(["--model", str(tmp_path / "model"), "--data", str(many)]) == 0
    assert "depends on the other records of its file" in capsys.readouterr().err


def test_the_servers_test_file_is_read_by_the_silos_column_names(tmp_path: Path) -> None:
    """Columns in another order are read by name (as predict reads them); other columns are
    refused naming the difference, not evaluated on scrambled features."""
    from plateau.silo_data import load_silo, local_spec
    from server_app.evaluation import server_test_tensors

    table = digits_table()
    table.to_parquet(tmp_path / "silo.parquet", index=False)
    config = RunConfig.from_mapping({"dataset": "local", "model": "linear", "input-shape": "64",
                                     "num-classes": 10, "feature-scaling": "none"})
    agreed = load_silo(tmp_path / "silo.parquet", local_spec(config)).schema
    ordered = tmp_path / "ordered.parquet"
    table.iloc[:100].to_parquet(ordered, index=False)
    shuffled = tmp_path / "shuffled.parquet"
    columns = list(table.columns)
    table.iloc[:100][columns[::-1]].to_parquet(shuffled, index=False)
    expected = server_test_tensors(dataclasses.replace(config, test_data=str(ordered)), agreed)
    got = server_test_tensors(dataclasses.replace(config, test_data=str(shuffled)), agreed)
    assert torch.equal(expected.x, got.x) and torch.equal(expected.y, got.y)
    other = tmp_path / "other.parquet"
    renamed = table.iloc[:100].rename(columns={f"px{i}": f"f{i}" for i in range(64)})
    renamed.to_parquet(other, index=False)
    with pytest.raises(ConfigError, match="test-data="):
        server_test_tensors(dataclasses.replace(config, test_data=str(other)), agreed)


def test_a_local_run_with_central_evaluation_alone_still_lists_the_silos_schemas() -> None:
    from server_app.loop import outside_epsilon

    config = RunConfig.from_mapping({"dataset": "local", "evaluate": "central",
                                     "test-data": "t.csv", "dp": "central"})
    listed = outside_epsilon(config)
    assert any(item.startswith("silo_schemas") for item in listed["summary.json"])
    assert "federated_accuracy" not in listed.get("rounds.jsonl", [])
