"""Prometheus metrics: the exporter's scrape, promtool, the dashboard's and rules' metric names,
the Pushgateway, and a real Prometheus scraping a simulation."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from flwr.simulation import run_simulation

from client_app.app import app as client_app
from server_app.app import build_server_app
from server_app.launcher import free_port
from server_app.metrics import RunMetrics
from tests.helpers import make_config

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
needs = {tool: pytest.mark.skipif(shutil.which(tool) is None,
                                  reason=f"{tool} is not installed (.ci/run installs Debian's "
                                  "prometheus and prometheus-pushgateway)")
         for tool in ("promtool", "prometheus", "prometheus-pushgateway")}
RECORD = {"round": 3, "test_accuracy": 0.8, "test_loss": 0.5, "train_loss": 0.4,
          "clip_fraction": 0.25, "global_update_norm": 1.5, "sharpness": 0.01,
          "hessian_top_eigenvalue": 12.0, "epsilon": 2.5, "num_sampled": 10, "num_clients": 8,
          "wall_s": 1.2, "epsilon_against_server": 3.0, "audit_epsilon_lower_bound": 0.4,
          "audit_epsilon_estimate": 1.1, "record_epsilon": {"0": 1.5, "1": 2.0},
          "record_budget": {"0": "within budget", "1": "out of budget"},
          "federated_accuracy": 0.75,
          "federated_silos": {"0": {"accuracy": 0.7, "loss": 0.9, "examples": 40}}}


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def wait_for(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            get(url)
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


@pytest.fixture
def scrape() -> str:
    """A real HTTP scrape of a run's exporter after one observed round."""
    port = free_port()
    metrics = RunMetrics(make_config(metrics_port=port, dp="central", max_epsilon=5.0), "unit")
    metrics.serve()
    try:
        metrics.observe_round(RECORD, norms=[0.5, 2.0], rejected={"non-finite": 1},
                              failed={"error": 1, "no-reply": 1}, traffic=(1000, 800))
        return get(f"http://127.0.0.1:{port}/metrics")
    finally:
        metrics.close()


def test_exporter_serves_the_round_with_run_and_algorithm_labels(scrape: str) -> None:
    labels = '{algorithm="fedavg",run="unit"}'
    for line in (f"plateau_round{labels} 3.0", f"plateau_test_accuracy{labels} 0.8",
                 f"plateau_epsilon_spent{labels} 2.5", f"plateau_epsilon_budget{labels} 5.0",
                 f"plateau_clients_sampled_total{labels} 10.0",
                 f"plateau_bytes_sent_total{labels} 1000.0",
                 f"plateau_update_norm_count{labels} 2.0"):
        assert line in scrape, line
    assert 'plateau_clients_rejected_total{algorithm="fedavg",reason="non-finite",run="unit"} 1.0' \
        in scrape
    assert 'plateau_clients_failed_total{algorithm="fedavg",reason="no-reply",run="unit"} 1.0' \
        in scrape
    for partition, within in (("0", 1.0), ("1", 0.0)):
        assert (f'plateau_record_budget_within{{algorithm="fedavg",partition="{partition}",'
                f'run="unit"}} {within}') in scrape
    help_text = re.search(r"# HELP plateau_record_epsilon (.*)", scrape)
    assert help_text is not None and "not covered by epsilon" in help_text.group(1)


@needs["promtool"]
def test_promtool_accepts_the_scrape(scrape: str) -> None:
    result = subprocess.run(["promtool", "check", "metrics"], input=scrape, text=True,
                            capture_output=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@needs["promtool"]
def test_alert_rules_and_prometheus_config_pass_promtool() -> None:
    for args in (["check", "rules", str(MONITORING / "alerts.yml")],
                 ["check", "config", str(MONITORING / "prometheus.yml")]):
        result = subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def queried_metrics() -> set[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["query"]["query"])
    exprs += re.findall(r"expr: (.*)", (MONITORING / "alerts.yml").read_text())
    return {name for expr in exprs for name in re.findall(r"\bplateau_[a-z_]+", expr)}


def test_every_metric_the_dashboard_and_alerts_query_exists_in_a_scrape(scrape: str) -> None:
    names = queried_metrics()
    assert len(names) >= 15
    exported = set(re.findall(r"^(plateau_[a-z_]+)[{ ]", scrape, flags=re.MULTILINE))
    assert names <= exported, names - exported


@needs["prometheus-pushgateway"]
def test_the_pushgateway_receives_every_round(tmp_path: Path) -> None:
    port = free_port()
    gateway = subprocess.Popen(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/metrics")
        metrics = RunMetrics(make_config(metrics_pushgateway=f"127.0.0.1:{port}"), "pushed")
        metrics.observe_round(RECORD, norms=[], rejected={}, failed={}, traffic=(0, 0))
        pushed = get(f"http://127.0.0.1:{port}/metrics")
        assert re.search(r'plateau_round\{.*run="pushed".*\} 3', pushed)
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=10)


@needs["prometheus"]
@pytest.mark.simulation
def test_a_real_prometheus_scrapes_a_simulation_to_its_last_round(tmp_path: Path) -> None:
    metrics_port, prometheus_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n  - job_name: plateau\n    honor_labels: true\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{prometheus_port}/api/v1/query?query="
    try:
        wait_for(f"http://127.0.0.1:{prometheus_port}/-/ready")
        config = {"results-dir": str(tmp_path), "run-name": "scraped", "num-server-rounds": 3,
                  "metrics-port": metrics_port, "metrics-linger": 6.0, "dp": "central"}
        run_simulation(server_app=build_server_app(config), client_app=client_app,
                       num_supernodes=4,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 2}})
        deadline, last = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            # the endpoint is gone after the run: the series are stale, so look back over them
            query = 'max_over_time(plateau_round{run="scraped"}[5m])'
            result = json.loads(get(api + urllib.parse.quote(query)))
            values = result["data"]["result"]
            last = float(values[0]["value"][1]) if values else None
            if last == 3:
                break
            time.sleep(0.5)
        assert last == 3
        epsilon = json.loads(get(api + urllib.parse.quote(
            "max_over_time(plateau_epsilon_spent[5m])")))["data"]["result"]
        assert float(epsilon[0]["value"][1]) > 0
    finally:
        prometheus.send_signal(signal.SIGTERM)
        prometheus.wait(timeout=20)
