"""Container images, Compose files and Kubernetes manifests, checked offline: hadolint, the
manifests rendered with kustomize and validated against the Kubernetes schemas, Compose files
parsed and cross-checked, Prometheus configs through promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
DOCKERFILES = sorted([*(p for p in DOCKER.glob("Dockerfile*") if p.suffix != ".dockerignore"),
                      DOCKER / "prometheus" / "Dockerfile"])
COMPOSE_FILES = sorted(DOCKER.glob("compose*.yml"))


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is missing: `make install` installs it with the test extras")
    return str(path)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes_with_no_ignored_rule(dockerfile: Path) -> None:
    assert "hadolint ignore" not in dockerfile.read_text()
    result = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout == "", result.stdout


def test_app_image_builds_from_any_base_pins_torch_and_runs_unprivileged() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text and "FROM ${BASE_IMAGE}" in text
    assert "ARG TORCH_VERSION=2.13.0" in text and "ARG TORCH_VARIANT=cpu" in text
    assert "whl/${TORCH_VARIANT}" in text and "PIP_CONSTRAINT" in text
    assert "USER root" not in text and "USER 49999:49999" in text
    # Flower comes from the app's own pin, without the simulation extra (Ray)
    assert '"flwr[simulation]==1.42.0"' in (ROOT / "pyproject.toml").read_text()
    assert 'd.replace("flwr[simulation]", "flwr")' in text
    # the CUDA variant is the same Dockerfile with a build argument (compose.gpu.yml)
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yml").read_text())["services"]
    assert {s["build"]["args"]["TORCH_VARIANT"] for s in gpu.values()} == {"cu126"}
    assert {s["image"] for s in gpu.values()} == {"${PLATEAU_CUDA_IMAGE:-plateau-app:0.1.0-cuda}"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Every overlay rendered with freshly generated certificates and keys."""
    workdir = tmp_path_factory.mktemp("k8s")
    shutil.copytree(ROOT / "deploy" / "k8s", workdir / "k8s")
    subprocess.run(["bash", str(DOCKER / "generate-certs.sh"), str(workdir / "k8s/base/certs")],
                   env={**os.environ, "NODES": "3"}, check=True, capture_output=True)
    out = {}
    for overlay in ("cpu", "gpu", "local"):
        target = workdir / "k8s" / "overlays" / overlay
        result = subprocess.run([tool("kubectl"), "kustomize", str(target)],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        (workdir / f"{overlay}.yaml").write_text(result.stdout)
        validated = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet",
                                    str(workdir / f"{overlay}.yaml")],
                                   capture_output=True, text=True, check=False)
        assert validated.returncode == 0, validated.stdout + validated.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def by_kind(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.slow
def test_manifests_render_and_validate_against_the_kubernetes_schemas(rendered: dict) -> None:
    for docs in rendered.values():
        kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
        assert {"StatefulSet/superlink", "StatefulSet/supernode", "Service/superlink",
                "Deployment/superexec-serverapp", "Service/plateau-metrics",
                "Secret/plateau-tls", "Secret/plateau-supernode-keys"} <= set(kinds)


def test_superlink_keeps_its_state_on_a_volume_and_has_probes(rendered: dict) -> None:
    link = by_kind(rendered["cpu"], "StatefulSet", "superlink")
    assert link["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    container = link["spec"]["template"]["spec"]["containers"][0]
    assert "--database=/var/lib/flwr/state.db" in container["args"]
    assert "--enable-supernode-auth" in container["args"]
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert container["resources"]["requests"]


def test_gpu_overlay_requests_gpus_and_the_cuda_image(rendered: dict) -> None:
    nodes = by_kind(rendered["gpu"], "StatefulSet", "supernode")["spec"]["template"]["spec"]
    trainer = nodes["containers"][2]  # the warm trainer does the training
    assert trainer["name"] == "trainer"
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert trainer["image"].endswith(":0.1.0-cuda")
    assert trainer["env"][0] == {"name": "CUDA_VISIBLE_DEVICES", "value": "0"}
    assert nodes["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu = by_kind(rendered["cpu"], "StatefulSet", "supernode")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][2]["resources"].get("limits", {})
    assert cpu["containers"][2]["image"].endswith(":0.1.0")


def test_each_silo_mounts_only_its_own_data_read_only_and_keeps_its_ledger(
        rendered: dict) -> None:
    for overlay, docs in rendered.items():
        nodes = by_kind(docs, "StatefulSet", "supernode")
        spec = nodes["spec"]["template"]["spec"]
        supernode, _, trainer = spec["containers"]
        policy = supernode["args"][0]
        for key in ("data='$SILO_DATA'", "require-record-dp=true", "max-record-epsilon=",
                    "allow-evaluation=true", "publish-record-epsilon=true",
                    "record-ledger='/var/lib/flwr/record-ledger.json'"):
            assert key in policy, (overlay, key)
        mounts = {m["name"]: m for m in trainer["volumeMounts"]}
        assert mounts["silos"] == {"name": "silos", "mountPath": "/srv/silo", "readOnly": True,
                                   "subPathExpr": "silo-$(SILO)"}
        assert mounts["ledger"]["mountPath"] == "/var/lib/flwr"
        assert {"name": "SILO", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}} in trainer["env"]
        assert [c["metadata"]["name"] for c in nodes["spec"]["volumeClaimTemplates"]] == ["ledger"]
        assert all("silos" not in str(c.get("volumeMounts")) for c in spec["containers"][:2])
        federation = by_kind(docs, "ConfigMap", "plateau-federation")["data"]
        silo_data = "/srv/silo/train" + ("" if overlay == "local" else ".parquet")
        assert federation == {"NUM_PARTITIONS": "3", "SILO_DATA": silo_data}, overlay
        assert nodes["spec"]["replicas"] == 3
        server = by_kind(docs, "Deployment", "superexec-serverapp")["spec"]["template"]["spec"]
        assert {"name": "silos", "mountPath": "/srv/server", "subPath": "server",
                "readOnly": True} in server["containers"][0]["volumeMounts"]


def test_metrics_service_is_annotated_for_prometheus(rendered: dict) -> None:
    service = by_kind(rendered["cpu"], "Service", "plateau-metrics")
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert service["spec"]["ports"][0]["port"] == 9464


@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_are_consistent(compose: Path) -> None:
    spec = yaml.safe_load(compose.read_text())
    services = spec["services"]
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            assert (compose.parent / build["context"] / build["dockerfile"]).is_file(), name
        elif compose.name != "compose.gpu.yml":
            assert "image" in service, name
        for dependency in service.get("depends_on", []):
            assert dependency in services, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if volume.startswith("${SILOS:-./silos}/"):  # made by deploy/make-silos.py
                assert volume.endswith(":ro"), (name, volume)  # a silo's data is read-only
            elif source.startswith("."):
                path = compose.parent / source
                generated = "certs/" in source  # made by docker/generate-certs.sh
                assert generated or path.exists(), (name, source)
            elif compose.name == "compose.yml":
                assert source in spec["volumes"], (name, source)
    secure = compose.name != "compose.quickstart-insecure.yml"
    commands = " ".join(str(c) for s in services.values() for c in s.get("command", []))
    if secure and compose.name == "compose.yml":
        assert "--enable-supernode-auth" in commands
        assert "--insecure --runtime-api-address=superlink" not in commands
    assert ("--insecure" in commands) == (not secure or ("clientapp" in commands
                                          and "127.0.0.1" not in commands)) or secure


def test_only_the_quickstart_file_runs_the_superlink_without_tls() -> None:
    for compose in COMPOSE_FILES:
        services = yaml.safe_load(compose.read_text())["services"]
        link = services.get("superlink", {})
        insecure = "--insecure" in link.get("command", [])
        assert insecure == (compose.name == "compose.quickstart-insecure.yml"), compose.name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed "
                    "(.ci/run installs Debian's prometheus)")
def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    shutil.copy(DOCKER / "prometheus" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ROOT / "deploy" / "monitoring" / "alerts.yml", tmp_path / "alerts.yml")
    result = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_certificates_verify_and_keys_are_openssh_ecdsa(tmp_path: Path) -> None:
    subprocess.run(["bash", str(DOCKER / "generate-certs.sh"), str(tmp_path)],
                   env={**os.environ, "NODES": "1", "SAN": "DNS:superlink,IP:10.0.0.1"},
                   check=True, capture_output=True)
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"),
                               str(tmp_path / "server.pem")], capture_output=True, text=True,
                              check=False)
    assert verified.returncode == 0, verified.stderr
    names = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "server.pem"), "-noout",
                            "-ext", "subjectAltName"], capture_output=True, text=True, check=True)
    assert "DNS:superlink" in names.stdout and "IP Address:10.0.0.1" in names.stdout
    assert (tmp_path / "keys" / "supernode-1.pub").read_text().startswith("ecdsa-sha2-nistp384")


def test_make_silos_writes_disjoint_deterministic_silos_and_a_held_back_test_set(
        tmp_path: Path) -> None:
    """deploy/make-silos.py, which the walkthroughs of deploy/README.md start with: every digit
    in exactly one silo or the server's test set, the same bytes on every run, image folders
    holding the same records as the Parquet files."""
    import pandas as pd
    from PIL import Image

    def make(out: Path, *args: str) -> None:
        subprocess.run([sys.executable, str(ROOT / "deploy" / "make-silos.py"), "--out", str(out),
                        "--silos", "3", *args], check=True, capture_output=True)

    make(tmp_path / "a", "--server-test")
    make(tmp_path / "b", "--server-test")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert [str(p) for p in files] == ["server/test.parquet", "silo-0/train.parquet",
                                       "silo-1/train.parquet", "silo-2/train.parquet"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tables = {str(p.parent): pd.read_parquet(tmp_path / "a" / p) for p in files}
    assert list(tables["silo-0"].columns) == [f"px{i}" for i in range(64)] + ["label"]
    assert {k: len(t) for k, t in tables.items()} == {"server": 359, "silo-0": 480,
                                                      "silo-1": 479, "silo-2": 479}
    rows = pd.concat(tables.values())
    pixels = rows.drop(columns="label")
    assert pixels.min().min() == 0 and pixels.max().max() == 1
    assert sorted(rows["label"].unique()) == list(range(10))
    # no record in two places (digits has a few duplicate images; the split is by record, so
    # the count of distinct rows must match the dataset's own)
    from sklearn.datasets import load_digits

    digits = pd.DataFrame(load_digits().data / 16).assign(label=load_digits().target)
    assert len(rows.drop_duplicates()) == len(digits.drop_duplicates()) and len(rows) == 1797

    make(tmp_path / "images", "--format", "imagefolder", "--server-test")
    pngs = sorted((tmp_path / "images" / "silo-1" / "train").glob("*/*.png"))
    assert len(pngs) == 479 and len(list((tmp_path / "images").rglob("*.png"))) == 1797
    silo = tables["silo-1"]
    for png in pngs[::50]:  # file <n> of class <label> is the silo's record n, as pixels
        image = Image.open(png)
        assert image.mode == "L" and image.size == (8, 8)
        record = silo.iloc[int(png.stem)]
        assert record["label"] == int(png.parent.name)
        pixels = [b / 255 for b in image.tobytes()]
        assert max(abs(a - b) for a, b in zip(pixels, record.iloc[:64], strict=True)) < 0.003
    assert subprocess.run([sys.executable, str(ROOT / "deploy" / "make-silos.py"), "--out",
                           str(tmp_path / "a")], capture_output=True).returncode == 2  # not empty
