# One entry point for everything a newcomer or CI does. Python comes from $(PY).
PY ?= python3
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: install system-deps check test demo bench compare e2e soak clean

# torch/torchvision first: this exact CPU-runnable pair installs offline from the local index here;
# GPU users may install their own torch build before `pip install -e .[dev]` instead.
install: system-deps
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev]"

# redis-server (registry tests) and nginx (topology tests) from Debian, only when missing.
system-deps:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	@command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx)

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
