# Every target builds its own environment from nothing: .venv with uv (installed with pip if absent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: train demo test test-main test-parity test-timm-parity bench-vision bench-attention bench-recurrent env clean

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
test: test-main test-parity test-timm-parity

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
	$(PARITY_VENV)/bin/python -m pytest -n 2 -m parity --durations=5 tests/zoo/test_hf_parity.py $(PARITY_ARGS)

# Parity with timm's vision models. timm imports torchvision, and the torch / torchvision pair
# that installs and imports together from this machine's disk is 2.14.1 / 0.29.1 (a CUDA build,
# run on the CPU); hence an environment of its own.
TIMM_VENV := .venv-timm
$(TIMM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 timm==1.0.31 -e '.[test]'
	@touch $@

test-timm-parity: $(TIMM_VENV)/.installed
	$(TIMM_VENV)/bin/python -m pytest -n 2 -m parity --durations=5 tests/zoo/test_timm_parity_*.py $(PARITY_ARGS)

# Vision train steps (forward + backward + AdamW update) against timm on the same CPU.
bench-vision: $(TIMM_VENV)/.installed
	$(TIMM_VENV)/bin/python benchmarks/vision.py $(BENCH_ARGS)

bench-attention: env
	$(PY) benchmarks/attention.py $(BENCH_ARGS)

bench-recurrent: env
	$(PY) benchmarks/recurrent.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(PARITY_VENV) $(TIMM_VENV) .pytest_cache
