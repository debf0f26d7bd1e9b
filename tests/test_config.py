"""The run config: one schema, pyproject and README agree with it, bad values stop the run."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from plateau.config import ConfigError, RunConfig, describe_keys, readme_table
from server_app.algorithms import algorithms_table
from server_app.app import load_config, run
from server_app.launcher import launch, parse_overrides
from strategies import STRATEGIES
from tests.helpers import FakeGrid

ROOT = Path(__file__).resolve().parent.parent


def pyproject_config() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_the_schema_defaults() -> None:
    table = pyproject_config()
    defaults = RunConfig.from_mapping({}).to_dict()
    assert table == defaults
    assert {k: type(v) for k, v in table.items()} == {k: type(v) for k, v in defaults.items()}


@pytest.mark.parametrize("name", ["config.md", "outputs.md", "metrics.md"])
def test_the_reference_docs_are_the_code(name: str) -> None:
    """docs/ carries exactly what `make docs` (python -m server_app.docs) generates."""
    from server_app.docs import DOCS

    assert (ROOT / "docs" / name).read_text() == DOCS[name](), f"docs/{name} is stale: make docs"
    assert readme_table() in (ROOT / "docs" / "config.md").read_text()
    assert [row[0] for row in describe_keys()] == list(pyproject_config())


def test_the_run_configs_copy_of_the_algorithm_keys_is_the_registry() -> None:
    """plateau/algorithm_keys.py (what the run config validates against, without importing the
    algorithms) is exactly what `make docs` makes from the registered Params groups."""
    from plateau.config import algorithm_key_table
    from strategies.registry import param_keys

    fields = {name: spec for name, (_, spec) in param_keys().items()}
    assert (ROOT / "plateau" / "algorithm_keys.py").read_text() == algorithm_key_table(fields), (
        "plateau/algorithm_keys.py is stale: make docs")


def test_readme_algorithms_table_is_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    assert algorithms_table() in readme
    assert all(f"| `{name}` |" in algorithms_table() for name in STRATEGIES)


def test_defaults_validate_and_round_trip() -> None:
    config = RunConfig.from_mapping(pyproject_config())
    assert config == RunConfig.from_mapping({})
    assert RunConfig.from_mapping(config.to_dict()) == config
    assert load_config({}).algorithm == "fedavg"


def test_ints_are_accepted_for_floats() -> None:
    config = RunConfig.from_mapping({"lr": 1, "sample-rate": 1})
    assert isinstance(config.lr, float) and config.lr == 1.0


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"no-such-key": 1}, "unknown run-config key 'no-such-key'"),
        ({"num-server-rounds": "10"}, "num-server-rounds='10' has type str; expected int"),
        ({"num-server-rounds": 2.5}, "num-server-rounds=2.5 has type float; expected int"),
        ({"local-steps": True}, "local-steps=True has type bool; expected int"),
        ({"dp-allow-batchnorm": 1}, "dp-allow-batchnorm=1 has type int; expected bool"),
        ({"sample-rate": 0.0}, "sample-rate=0.0 is not allowed; expected > 0 and <= 1"),
        ({"sample-rate": 1.5}, "sample-rate=1.5 is not allowed; expected > 0 and <= 1"),
        ({"num-server-rounds": 0}, "num-server-rounds=0 is not allowed; expected >= 1"),
        ({"noise-multiplier": -1.0}, "noise-multiplier=-1.0 is not allowed; expected >= 0"),
        ({"lr": float("nan")}, "lr=nan is not allowed"),
        ({"dp": "centrall"}, "dp='centrall' is not allowed; expected one of 'off', 'central'"),
        ({"dataset": "mnist"}, "dataset='mnist' is not allowed; expected one of 'digits'"),
        ({"partitioner": "Dirichlet"}, "partitioner='Dirichlet' is not allowed"),
        ({"run-name": "../escape"}, "run-name='../escape' is not allowed"),
        ({"run-name": ".."}, "run-name='..' is not allowed"),
        ({"seed": 2**32}, "seed=4294967296 is not allowed; expected >= 0 and <= 4.29497e+09"),
        ({"model-width": 7}, "model-width=7 is not allowed; expected an even number"),
        ({"test-fraction": 0.001}, "test-fraction=0.001 is not allowed; expected >= 0.05"),
        ({"dp-clip-mode": "code", "dp": "central"}, "dp-clip-mode='code' with dp='central'"),
        ({"dp": "central", "weighting": "num-examples"}, "weighting='num-examples' with dp"),
        ({"dp": "local", "model": "resnet10", "norm": "batch"}, "norm='batch' with dp='local'"),
    ],
)
def test_bad_values_give_one_line_naming_key_value_and_allowed(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(raw)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_server_only_checks() -> None:
    with pytest.raises(ConfigError, match="algorithm='fedsgd' is not allowed; expected one of"):
        load_config({"algorithm": "fedsgd"})
    with pytest.raises(ConfigError, match=r"classes-per-client=11 .* expected <= 10"):
        load_config({"partitioner": "pathological", "classes-per-client": 11})


def test_batchnorm_with_dp_only_when_opted_in_and_then_without_a_claim() -> None:
    from server_app.loop import privacy_statement
    from server_app.privacy_plan import plan_privacy

    with pytest.raises(ConfigError, match="dp-allow-batchnorm=true"):
        RunConfig.from_mapping({"dp": "central", "model": "resnet10", "norm": "batch"})
    config = RunConfig.from_mapping(
        {"dp": "central", "model": "resnet10", "norm": "batch", "dp-allow-batchnorm": True})
    _, ledger = plan_privacy(config, 20)
    statement = privacy_statement(config, ledger)
    assert ledger is None and statement["formally_dp"] is False and statement["units"] == []
    assert "BatchNorm statistics were released without protection" in statement["note"]


def test_bad_config_stops_the_server_before_any_message(tmp_path: Path) -> None:
    grid = FakeGrid(range(1, 5))
    with pytest.raises(ConfigError):
        run(grid, {"lr": -0.1, "results-dir": str(tmp_path)})
    assert grid.sent == []
    assert list(tmp_path.iterdir()) == []


def test_launcher_rejects_bad_config_before_starting_flower(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert launch(ROOT, clients=2, config="dp='everywhere'", timeout_s=60) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: dp='everywhere' is not allowed")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "home").exists()


def test_launcher_rejects_fewer_clients_than_the_first_round_needs(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert launch(ROOT, clients=1, config="", timeout_s=60) == 2
    assert "CLIENTS=1 is below min-available-clients=2" in capsys.readouterr().err


def test_overrides_parse_like_flwr_run() -> None:
    assert parse_overrides("dp='central' noise-multiplier=0.5 local-steps=3 run-name=\"x\"") == {
        "dp": "central", "noise-multiplier": 0.5, "local-steps": 3, "run-name": "x"}
    assert parse_overrides("  ") == {}
    with pytest.raises(ConfigError, match="strings are quoted: dp='central'"):
        parse_overrides("dp=central")
    with pytest.raises(ConfigError, match="the string is not closed; write dp='central'"):
        parse_overrides("local-steps=3 dp='central")
    with pytest.raises(ConfigError, match="the string is not closed; write dp='central'"):
        parse_overrides("dp='central run-name='x'")
    with pytest.raises(ConfigError, match="cannot read 'oops'"):
        parse_overrides("dp='central' oops")


def test_every_key_has_a_description() -> None:
    assert len(describe_keys()) == len(RunConfig.keys())
    for name, _, _, doc in describe_keys():
        assert doc.strip(), name


def test_a_misspelled_key_gets_a_suggestion_not_the_whole_key_list() -> None:
    """Issue 32: a misspelled key dumped all 90 keys with no "did you mean"."""
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_mapping({"num-server-round": 3})
    assert str(caught.value) == ("unknown run-config key 'num-server-round'; did you mean "
                                 "'num-server-rounds'?")
    with pytest.raises(ConfigError, match=r"docs/config\.md") as caught:
        RunConfig.from_mapping({"zzz": 1})
    assert "accountant" not in str(caught.value)


def test_client_noise_shares_need_noise() -> None:
    """Issue 32: dp='distributed' or 'local' with noise-multiplier=0 crashed 50 s in with a
    ZeroDivisionError; it is a config error, and central DP without noise is still allowed
    (a clipped baseline that claims no epsilon)."""
    for placement in ("distributed", "local"):
        with pytest.raises(ConfigError, match=f"noise-multiplier=0 with dp='{placement}'"):
            RunConfig.from_mapping({"dp": placement, "noise-multiplier": 0.0})
        RunConfig.from_mapping({"dp": placement, "noise-multiplier": 0.0,
                                "target-epsilon": 4.0})
    RunConfig.from_mapping({"dp": "central", "noise-multiplier": 0.0})
