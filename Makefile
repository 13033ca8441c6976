# Every target builds its own environment from nothing: .venv with uv (installed with pip if absent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: train demo test bench-attention bench-recurrent env clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv
	$(PYTHON) -m uv venv -q --allow-existing -p $(PYTHON) $(VENV)
	$(PYTHON) -m uv pip install -q -p $(PY) -e '.[test,digits,colab]'
	@touch $@

env: $(VENV)/.installed

# The main job: train the default config (MQAR, attnzoo/configs/mqar.py); rerunning resumes.
train: env
	$(PY) -m attnzoo.train --config attnzoo/configs/mqar.py --workdir runs/mqar $(TRAIN_ARGS)

demo: env
	$(PY) -m attnzoo.demo

test: env
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

bench-attention: env
	$(PY) benchmarks/attention.py $(BENCH_ARGS)

bench-recurrent: env
	$(PY) benchmarks/recurrent.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
