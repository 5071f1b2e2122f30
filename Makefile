# One entry point for everything a newcomer or CI does. Python comes from $(PY).
PY ?= python3
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: install system-deps check test demo bench compare e2e soak demo-assets clean

# torch/torchvision first: this exact CPU-runnable pair installs offline from the local index here;
# GPU users may install their own torch build before `pip install -e .[dev]` instead.
install: system-deps
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev]"

# redis-server (registry tests), nginx (topology tests) and chromium + chromedriver (console browser
# tests) from Debian, only when missing.
system-deps:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	@command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx)
	@command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

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

# The paper's comparison on the real backbone: linear, BitFit, SSF, full x 3 real-image tasks x 3 seeds (~35 min).
compare:
	$(PY) -m training.compare

# Reproduce the demo's example task deltas and held-out samples on the real backbone (assets/demo/, ~12 min).
demo-assets:
	$(PY) -m training.demo_tasks

# The compose topology as local processes (redis-server, 2 replicas, nginx from deploy/); also part of `make test`.
e2e:
	$(PY) -m pytest -q -p no:cacheprovider -m e2e tests/deploy $(PYTEST_ARGS)

# Long reliability tier (not in CI, about 80 min): R3+R7 soak with 10 Redis kills, the leaking build that
# must fail it, R5 replica kills behind nginx, S5 slowloris, atheris on the decoder.
soak:
	$(PIP) install -q -e ".[soak]"
	$(PY) -m tests.reliability.long.soak --minutes 60 --kills 10
	! $(PY) -m tests.reliability.long.soak --minutes 5 --kills 0 --leaky
	$(PY) -m tests.reliability.long.replica_kills --kills 10
	$(PY) -m tests.reliability.long.slowloris --conns 50
	$(PY) -m tests.reliability.long.fuzz_decode --seconds 300

# Long tier (about 15-25 min; needs root): build the images (official bases, or Debian-built ones from
# deploy/local-bases.sh when no registry answers) and run docker-compose.yml for real with podman-compose
# (docker compose where a Docker engine answers), checked through nginx. deploy/README.md has the numbers.
.PHONY: compose-e2e
compose-e2e:
	@command -v podman >/dev/null || docker info >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq podman runc netavark aardvark-dns mmdebstrap)
	@docker info >/dev/null 2>&1 || $(PIP) install -q "podman-compose==1.6.0"
	SSF_COMPOSE_E2E=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/containers $(PYTEST_ARGS)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
