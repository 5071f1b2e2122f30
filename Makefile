# One entry point for everything a newcomer or CI does. Python comes from $(PY).
PY ?= python3
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: install check test demo bench compare e2e soak clean

# torch/torchvision first: this exact CPU-runnable pair installs offline from the local index here;
# GPU users may install their own torch build before `pip install -e .[dev]` instead.
install:
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev]"

check:
	$(PY) -m ruff check ssf training service tests bench
	$(PY) -m ruff format --check ssf training service tests bench
	$(PY) -m mypy
	lint-imports

test:
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo:
	$(PY) -m service.demo

bench:
	$(PY) -m bench.run_all

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
