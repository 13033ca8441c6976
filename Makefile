# Every target builds its own environment from nothing: .venv with uv (installed with pip if absent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: train demo test test-main test-parity bench-attention bench-recurrent env clean

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

# The tests: the main suite, then the parity tests against PyTorch modules in their own environment.
test: test-main test-parity

test-main: env
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

# Parity with Hugging Face transformers (PyTorch): torch and transformers are never attnzoo
# dependencies, so they live in a separate virtual environment (pip takes torch's CPU wheel from
# this machine's disk).
PARITY_VENV := .venv-parity
$(PARITY_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_VENV)/bin/python -m pip install -q torch==2.13.0 transformers==5.23.0 -e '.[test]'
	@touch $@

test-parity: $(PARITY_VENV)/.installed
	$(PARITY_VENV)/bin/python -m pytest -m parity --durations=5 tests/zoo/test_hf_parity.py $(PARITY_ARGS)

bench-attention: env
	$(PY) benchmarks/attention.py $(BENCH_ARGS)

bench-recurrent: env
	$(PY) benchmarks/recurrent.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(PARITY_VENV) .pytest_cache
