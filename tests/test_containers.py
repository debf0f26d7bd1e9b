"""The container tier (`make test-containers`; deselected from `make test`): the images built and
the deployments run for real with podman, deploy/README.md sections 3-5, the walkthroughs run as
written (read from the guide).

- images: a Debian base made with debootstrap (no registry is reachable here), the app image on it
  with the host's extra CA certificates and its CPU torch wheel as build inputs, built cold and
  again warm; Prometheus from Debian's package;
- Compose (podman-compose), the walkthrough of section 4: three silos written by
  deploy/make-silos.py, each mounted read-only into its trainer with its policy in its node
  config, SuperLink with TLS and SuperNode authentication, the ServerApp SuperExec, Prometheus;
  keys registered, five rounds with record-level DP and central and federated evaluation, each
  silo's epsilon and the federated accuracy through Prometheus's HTTP API, the exported model
  copied out of the results volume and its predictions with plateau.predict; then a second run
  that every silo declines (their ledgers, on their own volumes, have no budget left), every
  Grafana dashboard query evaluated by the live Prometheus; the insecure quick start;
- Kubernetes, the walkthrough of section 5a: the kustomize overlay `local` rendered and played
  with `podman kube play` (deploy/k8s/podman-play.py substitutes what podman 4.3 cannot play), a
  SuperLink pod and three silo pods connected over TLS, each silo's image folder mounted from the
  host, a run with record-level DP and central and federated evaluation to completion, the
  exported model's predictions;
- afterwards no container, pod, volume, network, secret or process of the tier is left, and the
  tier's image store is deleted.

Podman runs as root with its own storage, configuration and network folder under a temporary
directory (PLATEAU_CONTAINERS_DIR keeps them, and so the layer cache, between runs). Where podman
cannot run the tier skips and says why; with PLATEAU_CONTAINERS_REQUIRED=1 (CI) it fails instead.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
APP_IMAGE = "localhost/plateau-app:0.1.0"
BASE_IMAGE = "localhost/debian-python:bookworm"
PROMETHEUS_IMAGE = "localhost/prometheus-debian:2.42"
DASHBOARD = Path("deploy") / "monitoring" / "grafana-dashboard.json"  # in the build context
# dashboard series that a DP run with flatness probes must show
GUIDE = ROOT / "deploy" / "README.md"
# dashboard series that the walkthrough's run (record-level DP, central and federated
# evaluation, three silos) must show
SHOWN = {"plateau_round", "plateau_rounds_planned", "plateau_test_accuracy", "plateau_test_loss",
         "plateau_global_update_norm", "plateau_update_norm_bucket",
         "plateau_round_duration_seconds_bucket", "plateau_round_duration_seconds_sum",
         "plateau_round_duration_seconds_count", "plateau_clients_sampled_total",
         "plateau_clients_replied_total", "plateau_bytes_sent_total",
         "plateau_bytes_received_total", "plateau_record_epsilon", "plateau_record_budget_within",
         "plateau_federated_accuracy", "plateau_silo_accuracy"}
EVENTS = {"plateau_clients_failed_total", "plateau_clients_rejected_total"}
MEASURED: dict[str, object] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unavailable(reason: str) -> None:
    if os.environ.get("PLATEAU_CONTAINERS_REQUIRED") == "1":
        pytest.fail(f"container tier required but cannot run: {reason}")
    pytest.skip(reason)


def wait_until(check, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} (after {timeout:.0f} s)")
        time.sleep(every)


def live_pids() -> set[int]:
    """PIDs of processes that are not zombies."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.add(int(entry.name))
    return pids


def command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


class HostState:
    """What podman changes outside the tier's folder, undone afterwards: netavark 1.4 leaves its
    iptables chains (even per-network ones) and its run folder behind and turns on IPv4
    forwarding; image copies write a blob cache to /var/lib/containers/cache whatever the
    storage; runc, the network namespaces and podman leave empty folders. Only what was not
    there before the tier is removed."""

    STATE = (Path("/run/containers/networks"), Path("/var/lib/containers"))
    FOLDERS = (Path("/run/containers"), Path("/run/netns"), Path("/run/runc"),
               Path.home() / ".config" / "containers" / "podman",
               Path.home() / ".config" / "containers")  # removed when empty
    FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

    def __init__(self) -> None:
        self.chains = self.netavark_chains()
        self.existed = {path for path in (*self.STATE, *self.FOLDERS) if path.exists()}
        self.forward = self.FORWARD.read_text().strip()

    @staticmethod
    def rules(program: str, table: str) -> list[str]:
        result = subprocess.run([program, "-w", "-t", table, "-S"], capture_output=True,
                                text=True, check=False)
        return result.stdout.splitlines() if result.returncode == 0 else []

    @classmethod
    def netavark_chains(cls) -> set[tuple[str, str, str]]:
        return {(program, table, line.split()[1])
                for program in ("iptables", "ip6tables") if shutil.which(program)
                for table in ("nat", "filter", "mangle")
                for line in cls.rules(program, table)
                if line.startswith("-N ") and "NETAVARK" in line}

    def restore(self) -> None:
        new = self.netavark_chains() - self.chains
        for program, table, chain in sorted(new):
            for line in self.rules(program, table):  # the jumps into it, then the chain itself
                words = shlex.split(line)
                if words[0] == "-A" and "-j" in words and words[words.index("-j") + 1] == chain:
                    subprocess.run([program, "-w", "-t", table, "-D", *words[1:]],
                                   capture_output=True, check=False)
        for program, table, chain in sorted(new):
            subprocess.run([program, "-w", "-t", table, "-F", chain], capture_output=True,
                           check=False)
        for program, table, chain in sorted(new):
            subprocess.run([program, "-w", "-t", table, "-X", chain], capture_output=True,
                           check=False)
        for path in self.STATE:
            if path not in self.existed:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.FOLDERS:
            if path not in self.existed and path.is_dir() and not any(path.iterdir()):
                mounts = Path("/proc/self/mounts").read_text().split()
                if str(path) in mounts:  # podman bind-mounts /run/netns on itself, shared
                    subprocess.run(["umount", str(path)], capture_output=True, check=False)
                with contextlib.suppress(OSError):
                    path.rmdir()
        if self.FORWARD.read_text().strip() != self.forward:
            self.FORWARD.write_text(self.forward)

    def left(self) -> list[str]:
        left = [f"{p} -t {t} {c}" for p, t, c in sorted(self.netavark_chains() - self.chains)]
        left += [str(path) for path in (*self.STATE, *self.FOLDERS)
                 if path.exists() and path not in self.existed]
        return left


class Podman:
    """podman and podman-compose with this tier's own storage, configuration and networks."""

    def __init__(self, root: Path) -> None:
        self.root = root
        hard_nofile = int(subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True,
                                         text=True, check=True).stdout.strip())
        (root / "networks").mkdir(parents=True, exist_ok=True)
        # crun fails on this kernel's hybrid cgroup layout; default ulimits must not exceed ours
        (root / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={hard_nofile}:{hard_nofile}", "nproc=32768:32768"]\n'
            'log_driver = "k8s-file"\n'
            "[network]\n"
            'network_backend = "netavark"\n'
            f'network_config_dir = "{root / "networks"}"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            f'tmp_dir = "{root / "tmp"}"\n')
        (root / "storage.conf").write_text(
            '[storage]\ndriver = "overlay"\n'
            f'graphroot = "{root / "storage"}"\nrunroot = "{root / "run"}"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(root / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def run(self, *args: str, timeout: float = 300, check: bool = True, cwd: Path | None = None,
            env: dict | None = None, program: str = "podman") -> subprocess.CompletedProcess:
        result = subprocess.run([program, *args], capture_output=True, text=True, check=False,
                                timeout=timeout, cwd=cwd, env={**self.env, **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"{program} {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def lines(self, *args: str) -> list[str]:
        return [line for line in self.run(*args).stdout.splitlines() if line.strip()]

    def leftovers(self) -> dict[str, list[str]]:
        return {"containers": self.lines("ps", "-a", "--format", "{{.Names}}"),
                "pods": self.lines("pod", "ps", "--format", "{{.Name}}"),
                "volumes": self.lines("volume", "ls", "--format", "{{.Name}}"),
                "networks": [n for n in self.lines("network", "ls", "--format", "{{.Name}}")
                             if n != "podman"],
                "secrets": self.lines("secret", "ls", "--format", "{{.Name}}")}

    def image_size(self, image: str) -> int:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


class Cli:
    """The flwr CLI on the host, with its own FLWR_HOME and one SuperLink connection."""

    def __init__(self, home: Path, connection: str, address: str, ca: Path | None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{ca}"' if ca else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n'
            f'address = "{address}"\n{security}\n')
        self.connection = connection
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    def __call__(self, *args: str, cwd: Path | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True,
                              check=False, timeout=timeout, cwd=cwd, env=self.env)

    def register(self, key: Path, name: str) -> None:
        result = self("supernode", "register", str(key), self.connection, "--name", name)
        assert result.returncode == 0 and "registered successfully" in result.stdout, \
            result.stdout + result.stderr

    def online(self) -> int:
        return self("supernode", "list", self.connection).stdout.count("online")

    def submit(self, app: Path, config: str) -> str:
        result = self("run", str(app), self.connection, "--run-config", config,
                      "--format", "json", cwd=app)
        assert result.returncode == 0, result.stdout + result.stderr
        return str(json.loads(result.stdout[result.stdout.index("{"):])["run-id"])

    def status(self, run_id: str) -> str:
        listing = self("ls", self.connection, "--run-id", run_id, "--format", "json").stdout
        with contextlib.suppress(ValueError):
            runs = json.loads(listing[listing.index("{"):]).get("runs", [])
            if runs:
                return runs[0]["status"]
        return "unknown"


def healthy(port: int, ca: Path | None) -> bool:
    """The SuperLink's /health answers, over TLS verified against `ca` when given."""
    scheme = "https" if ca else "http"
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=3,
                                    context=context) as response:
            return response.status == 200
    except OSError:
        return False


def prometheus(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture(scope="module")
def podman(request: pytest.FixtureRequest):
    """Podman that can run containers here, with its own state; removed afterwards."""
    if "containers" not in (request.config.getoption("-m") or ""):
        pytest.skip("the container tier runs only when selected: make test-containers "
                    "(pytest -m containers)")
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        unavailable("rootful podman needed: run as root on Linux")
    for tool in ("podman", "debootstrap"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (apt-get install podman buildah runc "
                        "debootstrap catatonit netavark aardvark-dns; .ci/run does)")
    for tool in ("podman-compose", "kubectl"):
        if not (BIN / tool).exists():
            unavailable(f"{tool} is missing from the venv: `make install` installs the test extras")
    kept = os.environ.get("PLATEAU_CONTAINERS_DIR")
    root = Path(kept) if kept else Path(tempfile.mkdtemp(prefix="plateau-containers-"))
    root.mkdir(parents=True, exist_ok=True)
    before = live_pids()
    host = HostState()
    engine = Podman(root)
    info = engine.run("info", "--format", "{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}",
                      check=False)
    if info.returncode != 0:
        unavailable(f"podman cannot run here: {info.stderr.strip()[-500:]}")
    try:
        yield engine
    finally:
        left = engine.leftovers()
        for pod in left["pods"]:
            engine.run("pod", "rm", "--force", pod, check=False)
        for container in left["containers"]:
            engine.run("rm", "--force", container, check=False)
        for volume in left["volumes"]:
            engine.run("volume", "rm", "--force", volume, check=False)
        for network in left["networks"]:
            engine.run("network", "rm", "--force", network, check=False)
        if not kept:
            engine.run("rmi", "--all", "--force", check=False, timeout=600)
            engine.run("system", "reset", "--force", check=False, timeout=600)
            shutil.rmtree(root, ignore_errors=True)

        def started_here() -> list[str]:
            # podman's helpers, and anything run from the image's venv (processes in containers)
            return [f"{pid} {command_line(pid)[:120]}" for pid in live_pids() - before
                    if any(word in command_line(pid) for word in
                           ("conmon", "aardvark-dns", "netavark", "catatonit", "podman",
                            "/opt/venv/bin/", str(root)))]

        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not started_here(), 30, "processes exit")
        with contextlib.suppress(TimeoutError):  # podman's cleanup processes finish late
            wait_until(lambda: host.restore() or not host.left(), 20, "host state restored")
        assert not any(left.values()), f"left behind (now removed): {left}"
        assert not started_here(), f"processes left behind: {started_here()}"
        assert not host.left(), f"left on the host: {host.left()}"


@pytest.fixture(scope="module")
def images(podman: Podman, request: pytest.FixtureRequest):
    """The build context (a copy of the repository plus the build inputs) with every image built.

    The app image is built twice: cold (empty layer cache) and warm (every layer cached)."""
    context = podman.root / "src"
    shutil.rmtree(context, ignore_errors=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, context / name)
    # build inputs of deploy/README.md "Without a registry": the proxy's CA, the CPU torch wheel
    for cert in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):
        shutil.copy(cert, context / "docker" / "ca-certificates" / cert.name)
    version = importlib.metadata.version("torch").split("+")[0]
    wheel = subprocess.run([str(BIN / "python"), "-m", "pip", "download", "--quiet", "--no-deps",
                            "--dest", str(context / "docker" / "wheels"), f"torch=={version}+cpu"],
                           capture_output=True, text=True, check=False, timeout=600)
    assert wheel.returncode == 0, f"no CPU torch wheel for {version}: {wheel.stderr[-2000:]}"

    exists = podman.run("image", "exists", BASE_IMAGE, check=False).returncode == 0
    started = time.monotonic()
    if not exists:
        podman.run(str(context / "docker" / "debian-base.sh"), BASE_IMAGE, program="bash",
                   timeout=900)
        MEASURED["base image (debootstrap + import)"] = f"{time.monotonic() - started:.0f} s"

    def build(*args: str) -> tuple[float, str]:
        began = time.monotonic()
        result = podman.run("build", *args, cwd=context, timeout=1500)
        return time.monotonic() - began, result.stdout + result.stderr

    cold_s, cold_log = build("-f", "docker/Dockerfile", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                             "-t", APP_IMAGE, ".")
    warm_s, warm_log = build("-f", "docker/Dockerfile", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                             "-t", APP_IMAGE, ".")
    steps = len(re.findall(r"^STEP \d+/\d+: (?:RUN|COPY)", warm_log, re.MULTILINE))
    assert steps >= 8 and warm_log.count("Using cache") >= steps, warm_log[-3000:]
    prom_s, _ = build("-f", "docker/prometheus/Dockerfile", "--build-arg",
                      f"BASE_IMAGE={BASE_IMAGE}", "-t", PROMETHEUS_IMAGE, "docker/prometheus")
    cached = "" if "Using cache" not in cold_log else " (partly cached: PLATEAU_CONTAINERS_DIR)"
    MEASURED["app image build, cold" + cached] = f"{cold_s:.0f} s"
    MEASURED["app image build, warm (all layers cached)"] = f"{warm_s:.1f} s"
    MEASURED["Prometheus image build"] = f"{prom_s:.0f} s"
    for image in (BASE_IMAGE, APP_IMAGE, PROMETHEUS_IMAGE):
        MEASURED[f"size {image}"] = f"{podman.image_size(image) / 1e9:.2f} GB"
    yield context
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\ncontainer tier measurements:")
        for key, value in MEASURED.items():
            print(f"  {key}: {value}")


def test_app_image_runs_every_role_unprivileged_without_the_build_inputs(
        podman: Podman, images: Path) -> None:
    probe = ("import os, flwr, torch, shutil; "
             "print(os.getuid(), flwr.__version__, torch.__version__, "
             "all(shutil.which(c) for c in ('flower-superlink', 'flower-supernode', "
             "'flower-superexec', 'flwr-serverapp', 'flwr-clientapp', 'flwr')), "
             "os.environ['FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION'], "
             "sorted(os.listdir('/usr/local/share/ca-certificates')), "
             "os.access('/app/results', os.W_OK), os.access('/var/lib/flwr', os.W_OK))")
    out = podman.run("run", "--rm", APP_IMAGE, "python", "-c", probe).stdout.split()
    assert out[:5] == ["49999", "1.42.0", "2.13.0+cpu", "True", "1"], out
    assert out[5:] == ["[]", "True", "True"], out
    # the build trusted the host's extra CA certificates; the image's trust store does not
    bundle = podman.run("run", "--rm", APP_IMAGE, "cat",
                        "/etc/ssl/certs/ca-certificates.crt").stdout
    for cert in (images / "docker" / "ca-certificates").glob("*.crt"):
        body = "".join(cert.read_text().split("-----")[2].split())
        assert body[:64] not in "".join(bundle.split()), cert.name
    # Ray is for simulations only and stays out of the image
    assert podman.run("run", "--rm", APP_IMAGE, "python", "-c", "import ray",
                      check=False).returncode != 0


def dashboard_queries(dashboard_file: Path) -> list[tuple[str, str]]:
    dashboard = json.loads(dashboard_file.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel.get("targets", []) if target.get("expr")]


def guide_block(name: str) -> str:
    """The bash block between deploy/README.md's `<!-- NAME:begin -->` and `<!-- NAME:end -->`."""
    found = re.search(rf"<!-- {name}:begin -->\n```bash\n(.*?)```\n<!-- {name}:end -->",
                      GUIDE.read_text(), re.DOTALL)
    assert found is not None, f"deploy/README.md has lost its {name} markers"
    return found.group(1)


def run_guide(podman: Podman, name: str, cwd: Path, env: dict, log: Path,
              timeout: float = 900) -> str:
    """Run deploy/README.md's block `name` as written, from `cwd` (a copy of the checkout, with
    the checkout's venv), with bash -e -o pipefail and podman's settings in the environment;
    return its output (also written to `log`). Fails with the output's tail when it fails."""
    venv = cwd / ".venv"
    if not venv.exists():
        venv.symlink_to(ROOT / ".venv")
    environment = {k: v for k, v in podman.env.items() if k not in ("FLWR_HOME", "VIRTUAL_ENV")}
    environment |= {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", **env}
    try:
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", guide_block(name)],
                                cwd=cwd, env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                check=False)
    except subprocess.TimeoutExpired as err:
        output = err.output if isinstance(err.output, str) else (err.output or b"").decode()
        log.write_text(output)
        raise AssertionError(f"{name} ran past {timeout:.0f} s:\n{output[-4000:]}") from None
    log.write_text(result.stdout)
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stdout[-6000:]}"
    return result.stdout


# plateau.predict's line on labelled data: `accuracy 0.899721 (323 of 359 records; loss ...)`
PREDICTED = re.compile(r"^accuracy (\d+\.(\d+))\b.*?(\d+) records", re.MULTILINE)


def check_exported_model(output: str, run: Path, test_records: int) -> float:
    """The guide's plateau.predict line: the exported model's accuracy on the server's test
    data, which is the run's last central evaluation on the same data."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error") or summary.get("stop_reason")
    assert {"model.json", "model.safetensors"} <= {p.name for p in (run / "model").iterdir()}
    predicted = PREDICTED.findall(output)
    assert len(predicted) == 1, output[-3000:]
    accuracy, records = float(predicted[0][0]), int(predicted[0][2])
    assert records == test_records, (records, test_records)
    central = summary["model"]["central_accuracy"]  # the exported round's, on test-data
    assert accuracy == pytest.approx(central, abs=0.5 * 10 ** -len(predicted[0][1])), \
        (accuracy, central)
    assert accuracy > 0.6, accuracy  # learnt: chance is 0.1
    return accuracy


def check_record_privacy(summary: dict, silos: int, target: float) -> dict[str, float]:
    """Every silo within its budget, each with its own epsilon, at most the run's target."""
    privacy = summary["record_privacy"]
    assert privacy["silo_status"] == {str(i): "within budget" for i in range(silos)}, privacy
    spent = privacy["epsilon_per_silo"]
    assert sorted(spent) == [str(i) for i in range(silos)], spent
    assert all(0 < e <= target for e in spent.values()), spent
    return spent


def read_only_mount(podman: Podman, container: str, target: str) -> str:
    """The host folder mounted at `target` in `container`, which must be read-only."""
    mounts = json.loads(podman.run("inspect", "--format", "{{json .Mounts}}", container).stdout)
    found = [m for m in mounts if m["Destination"] == target]
    assert len(found) == 1 and found[0]["RW"] is False, (container, mounts)
    return found[0]["Source"]


def test_compose_walkthrough_three_silos_from_data_to_predictions(
        podman: Podman, images: Path, tmp_path: Path) -> None:
    """deploy/README.md section 4 as written: three silos made from digits, each mounted
    read-only into its trainer with its policy in its node config, TLS and SuperNode
    authentication, a run with record-level DP and central and federated evaluation, each
    silo's epsilon and the federated accuracy from Prometheus, the exported model's predictions.
    Then what the guide does not show: the silos' policy at work (their ledgers on their own
    volumes refuse a second run past their budget), the trainers, zygotes and paced SuperNodes,
    and every dashboard query against the live Prometheus."""
    docker = images / "docker"
    shutil.rmtree(docker / "certs", ignore_errors=True)
    shutil.rmtree(docker / "silos", ignore_errors=True)
    ports = {"SUPERLINK_PORT": free_port(), "METRICS_PORT": free_port(),
             "PROMETHEUS_PORT": free_port()}
    env = {**{k: str(v) for k, v in ports.items()}, "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE}
    # the GPU override merges (its CUDA image cannot be built or run here)
    merged = yaml.safe_load(podman.run("-f", "docker/compose.yml", "-f", "docker/compose.gpu.yml",
                                       "config", program=str(BIN / "podman-compose"), cwd=images,
                                       env=env).stdout)["services"]
    for i in (1, 2, 3):
        trainer = merged[f"trainer-{i}"]
        assert trainer["image"] == "plateau-app:0.1.0-cuda", trainer
        assert trainer["build"]["args"] in (["TORCH_VARIANT=cu126"], {"TORCH_VARIANT": "cu126"})
        assert merged[f"superexec-clientapp-{i}"]["network_mode"] == f"service:supernode-{i}"
    assert merged["superlink"]["image"] == "plateau-app:0.1.0"
    # the image-folder variant of section 4 names the silos' data with SILO_DATA
    images_variant = yaml.safe_load(podman.run(
        "-f", "docker/compose.yml", "config", program=str(BIN / "podman-compose"), cwd=images,
        env={**env, "SILO_DATA": "/srv/silo/train"}).stdout)["services"]
    for i in (1, 2, 3):
        node_config = images_variant[f"supernode-{i}"]["command"][-1]
        assert f"partition-id={i - 1} num-partitions=3" in node_config, node_config
        assert "data='/srv/silo/train' " in node_config, node_config

    def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return podman.run("-f", "docker/compose.yml", *args, program=str(BIN / "podman-compose"),
                          cwd=images, env=env, timeout=300, check=check)

    work = tmp_path / "work"
    started = time.monotonic()
    try:
        output = run_guide(podman, "compose-walkthrough", images, {**env, "WORK": str(work)},
                           tmp_path / "compose-walkthrough.log")
        MEASURED["Compose walkthrough: data, certificates, stack up, 5 rounds, predictions"] = \
            f"{time.monotonic() - started:.0f} s"
        assert '"status": "finished:completed"' in output, output[-3000:]
        run = work / "silos"
        summary = json.loads((run / "summary.json").read_text())
        rounds = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
        assert summary["config"]["dataset"] == "local" and summary["config"]["record-dp"] == "on"
        spent = check_record_privacy(summary, 3, 8.0)
        test_file = docker / "silos" / "server" / "test.parquet"
        import pyarrow.parquet as pq  # the venv's; the records the server's test file holds

        accuracy = check_exported_model(output, run, pq.read_metadata(test_file).num_rows)
        federated = rounds[-1]["federated_accuracy"]
        assert federated > 0.6 and rounds[-1]["federated_examples"] > 0, rounds[-1]
        MEASURED["Compose walkthrough: central / federated accuracy"] = \
            f"{accuracy:.4f} / {federated:.4f}"
        MEASURED["Compose walkthrough: round wall times (rounds.jsonl)"] = \
            [r["wall_s"] for r in rounds]
        # what the guide's Prometheus queries printed: each silo's epsilon, the federated accuracy
        by_silo = json.loads((work / "record-epsilon.json").read_text())["data"]["result"]
        assert {s["metric"]["partition"]: float(s["value"][1]) for s in by_silo} == \
            pytest.approx(spent, rel=1e-9), by_silo
        last = json.loads((work / "federated-accuracy.json").read_text())["data"]["result"]
        assert len(last) == 1 and float(last[0]["value"][1]) == pytest.approx(federated), last

        # each silo's data reached its trainer alone, read-only; its ledger is on its own volume
        for i in (1, 2, 3):
            source = read_only_mount(podman, f"plateau_trainer-{i}_1", "/srv/silo")
            assert Path(source).resolve() == (docker / "silos" / f"silo-{i - 1}").resolve()
            for other in (f"plateau_supernode-{i}_1", f"plateau_superexec-clientapp-{i}_1"):
                mounts = podman.run("inspect", "--format", "{{json .Mounts}}", other).stdout
                assert "/srv/silo" not in mounts, (other, mounts)
            ledger = Path(podman.run("volume", "inspect", "--format", "{{.Mountpoint}}",
                                     f"plateau_ledger-{i}").stdout.strip())
            assert json.loads((ledger / "record-ledger.json").read_text()), i
        # ... so a second run is declined by every silo: its ledger has no budget left
        cli = Cli(tmp_path / "cli", "plateau-docker", f"127.0.0.1:{ports['SUPERLINK_PORT']}",
                  docker / "certs" / "ca.crt")
        again = cli.submit(images, "dataset='local' num-classes=10 model='linear' "
                                   "record-dp='on' record-target-epsilon=8 num-server-rounds=2 "
                                   "local-steps=20 batch-size=64 lr=1.0 sample-rate=1.0 "
                                   "population-size=3 evaluate='federated' run-name='again'")
        wait_until(lambda: cli.status(again).startswith("finished"), 240, "second run finished")
        results = Path(podman.run("volume", "inspect", "--format", "{{.Mountpoint}}",
                                  "plateau_results").stdout.strip())
        second = json.loads((results / "again" / "summary.json").read_text())
        budget = second["record_privacy"]["silo_status"]
        assert budget == {str(i): "out of budget" for i in range(3)}, (second, budget)
        assert "no silo can train" in str(second.get("stop_reason")), second

        def logs(service: str) -> str:
            result = compose("logs", service)
            return result.stdout + result.stderr

        # each silo's rounds were its warm trainer's work, its ClientApp processes forks of the
        # SuperExec's zygote, its SuperNode paced
        for i in (1, 2, 3):
            assert logs(f"trainer-{i}").count("train for run") >= 5, logs(f"trainer-{i}")
            executor = logs(f"superexec-clientapp-{i}")
            assert "forks of a warm zygote" in executor and "starts cold" not in executor, \
                executor[-3000:]
            assert "looks for work every 0.2 s" in logs(f"supernode-{i}")

        # every dashboard query, as Grafana would send it for this run, over the run's span
        prom = ports["PROMETHEUS_PORT"]
        known = set(prometheus(prom, "metadata"))
        span = {"start": f"{time.time() - (time.monotonic() - started) - 60:.0f}",
                "end": f"{time.time():.0f}", "step": "5"}
        runs = prometheus(prom, "label/run/values", **{"match[]": "plateau_round"},
                          start=span["start"], end=span["end"])
        assert "silos" in runs  # the dashboard's `run` variable: label_values(plateau_round, run)
        # a query may come back empty only for what the run had no value of: counters of events
        # that did not happen, gauges of optional round keys (absent or null in every round of
        # rounds.jsonl, e.g. client-level epsilon in a run with record-level DP only); never for
        # the series this run must show
        keys = {key for r in rounds for key, value in r.items() if value is not None}
        no_value = {name for _, expr in dashboard_queries(images / DASHBOARD)
                    for name in re.findall(r"\bplateau_[a-z_]+", expr)
                    if name.removeprefix("plateau_") not in keys} - SHOWN - EVENTS
        if not any(r["num_failed"] for r in rounds):
            no_value.add("plateau_clients_failed_total")
        if not any(r["num_rejected"] for r in rounds):
            no_value.add("plateau_clients_rejected_total")
        empty_panels: set[str] = set()
        panels: dict[str, list[bool]] = {}
        for title, expr in dashboard_queries(images / DASHBOARD):
            names = set(re.findall(r"\bplateau_[a-z_]+", expr))
            bases = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in names}
            assert bases <= known or names <= known or names <= no_value, (title, expr)
            result = prometheus(prom, "query_range", query=expr.replace("$run", "silos"),
                                **span)["result"]
            panels.setdefault(title, []).append(bool(result))
            if not result:
                empty_panels.add(title)
                assert names <= no_value, (title, expr, sorted(no_value))
        assert len(panels) >= 10, panels  # every panel of the dashboard has a query
        MEASURED["dashboard queries with data / evaluated"] = \
            f"{sum(map(sum, panels.values()))}/{sum(map(len, panels.values()))} " \
            f"(empty, nothing to show in this run: {sorted(empty_panels)})"
    finally:
        logs_all = compose("logs", check=False)
        (tmp_path / "compose.log").write_text(logs_all.stdout + logs_all.stderr)
        run_guide(podman, "compose-down", images, {**env, "WORK": str(work)},
                  tmp_path / "compose-down.log", timeout=300)
    assert not any(podman.leftovers().values()), podman.leftovers()



def test_compose_insecure_quickstart_runs_a_round(podman: Podman, images: Path,
                                                  tmp_path: Path) -> None:
    port = free_port()
    env = {"SUPERLINK_PORT": str(port)}

    def compose(*args: str) -> str:
        return podman.run("-f", "docker/compose.quickstart-insecure.yml", *args,
                          program=str(BIN / "podman-compose"), cwd=images, env=env,
                          timeout=300).stdout

    cli = Cli(tmp_path / "cli", "plateau-quickstart", f"127.0.0.1:{port}", None)
    try:
        compose("up", "-d")
        wait_until(lambda: healthy(port, None), 60, "SuperLink healthy")
        wait_until(lambda: cli.online() >= 2, 120, "two SuperNodes online")
        run_id = cli.submit(images, "num-server-rounds=1 sample-rate=1.0")
        wait_until(lambda: cli.status(run_id).startswith("finished"), 300, "run finished")
        assert cli.status(run_id) == "finished:completed"
    finally:
        compose("down", "-v")
    assert not any(podman.leftovers().values()), podman.leftovers()


def test_kubernetes_walkthrough_silos_from_host_folders_with_podman_kube_play(
        podman: Podman, images: Path, tmp_path: Path) -> None:
    """deploy/README.md section 5a as written: the `local` overlay rendered and played with
    `podman kube play` (deploy/k8s/podman-play.py substitutes what podman 4.3 cannot play), a
    SuperLink pod and three silo pods over TLS, each silo's image folder mounted read-only from
    the host into its trainer, a run with record-level DP and central and federated evaluation
    to completion, and the exported model's predictions."""
    k8s = images / "deploy" / "k8s"
    shutil.rmtree(k8s / "base" / "certs", ignore_errors=True)
    work, silos = tmp_path / "work", tmp_path / "silos"
    env = {"WORK": str(work), "SILOS": str(silos), "LINK_PORT": str(free_port())}
    started = time.monotonic()
    try:
        output = run_guide(podman, "k8s-walkthrough", images, env, tmp_path / "k8s.log")
        MEASURED["podman kube play walkthrough: data, play, 2 rounds, predictions"] = \
            f"{time.monotonic() - started:.0f} s"
        for substituted in ("Namespace plateau dropped", "Service superlink -> DNS alias",
                            "StatefulSet superlink -> 1 Pod(s)",
                            "StatefulSet supernode -> 3 Pod(s)",
                            "Secret plateau-supernode-keys -> hostPath",
                            "emptyDir sockets -> hostPath",
                            "PersistentVolumeClaim state-superlink-0",
                            "PersistentVolumeClaim ledger-supernode-2",
                            "env SILO from metadata.labels['apps.kubernetes.io/pod-index'] -> '2'",
                            f"with subPath silo-2 -> hostPath {silos / 'silo-2'}",
                            f"with subPath server -> hostPath {silos / 'server'}"):
            assert substituted in output, (substituted, output[-4000:])
        assert '"status": "finished:completed"' in output, output[-3000:]
        pods = podman.lines("pod", "ps", "--format", "{{.Name}}")
        assert sorted(pods) == ["superexec-serverapp-pod-0", "superlink-0", "supernode-0",
                                "supernode-1", "supernode-2"], pods
        run = work / "k8s"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["rounds_completed"] == 2 and summary["config"]["record-dp"] == "on"
        check_record_privacy(summary, 3, 8.0)
        rounds = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
        assert rounds[-1]["federated_examples"] > 0 and rounds[-1]["federated_accuracy"] > 0.3
        images_held = sum(1 for _ in (silos / "server" / "test").glob("*/*.png"))
        accuracy = check_exported_model(output, run, images_held)
        MEASURED["podman kube play walkthrough: central / federated accuracy"] = \
            f"{accuracy:.4f} / {rounds[-1]['federated_accuracy']:.4f}"
        link = podman.run("logs", "superlink-0-superlink")
        assert "Uvicorn running on https://0.0.0.0:8000" in link.stdout + link.stderr
        for i in (0, 1, 2):  # each silo's folder reached its own trainer alone, read-only
            source = read_only_mount(podman, f"supernode-{i}-trainer", "/srv/silo")
            assert Path(source).resolve() == (silos / f"silo-{i}").resolve(), source
            for other in ("supernode", "superexec"):
                mounts = podman.run("inspect", "--format", "{{json .Mounts}}",
                                    f"supernode-{i}-{other}").stdout
                assert str(silos) not in mounts, mounts
            trainer = podman.run("logs", f"supernode-{i}-trainer")
            assert "train for run" in trainer.stdout + trainer.stderr, trainer.stderr[-2000:]
    finally:
        if (work / "play" / "plan.json").exists():
            run_guide(podman, "k8s-down", images, env, tmp_path / "k8s-down.log", timeout=300)
    assert not any(podman.leftovers().values()), podman.leftovers()
