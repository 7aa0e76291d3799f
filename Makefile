# Stable Diffusion on TorchServe, optimized with DeepSpeed on CUDA GPUs. `make help` lists the targets.
# Every variable can be overridden: `make demo PROMPT="a red fox"`, `make package WEIGHTS=weights/ MODEL_CONFIG=config/model-config.yaml`.

PYTHON       ?= python3
VENV         ?= .venv
BIN          := $(VENV)/bin
# torch is installed first, on its own: deepspeed's sdist imports it at build time. torch==2.13.0 is what the CPU
# machines and CI use (from their local CPU wheel; from PyPI alone on Linux pip would fetch the CUDA build). On a GPU
# host keep the CUDA torch already installed (measured with 2.11.0+cu130) with `make install TORCH=`.
TORCH        ?= torch==2.13.0
MODEL_NAME   ?= stable-diffusion
# The embedded model's family: tiny (SD 1.x), tiny-sd2 (SD 2.x, v-prediction) or tiny-sdxl (SDXL).
PRESET       ?= tiny
TINY_MODEL   ?= build/$(PRESET)
WEIGHTS      ?= $(TINY_MODEL)
MODEL_STORE  ?= model_store
MODEL_CONFIG ?= config/model-config-cpu.yaml
TS_CONFIG    ?= config.properties
PROMPT       ?= a photo of an astronaut riding a horse on mars
WAIT         ?= 300
# The KServe front (`make serve-kserve`): REST and gRPC ports beside TorchServe's 8080-8082.
KSERVE_PORT      ?= 8090
KSERVE_GRPC_PORT ?= 8091
# The playground page (`make playground`): which running front it talks to, and its own port.
FRONT            ?= torchserve
PLAYGROUND_PORT  ?= 7860
# Offline installs: `make wheelhouse` on a connected machine, copy the folder, `make install WHEELHOUSE=wheelhouse`.
# For another Python or platform (e.g. a GPU host), set WHEEL_TARGET, for example
#   WHEEL_TARGET="--python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all:" TORCH=torch==2.11.0
WHEELHOUSE   ?=
WHEEL_TARGET ?=
PIP_SOURCE   := $(if $(WHEELHOUSE),--no-index --find-links $(WHEELHOUSE))

.PHONY: help install install-kserve install-dev browser wheelhouse model package serve serve-kserve query playground stop demo test clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## Create .venv with the pinned runtime dependencies and the engine
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(BIN)/pip install $(PIP_SOURCE) $(TORCH))
	$(BIN)/pip install $(PIP_SOURCE) --no-build-isolation -r requirements.txt
	$(BIN)/pip install $(PIP_SOURCE) --no-build-isolation --no-deps -e .
	touch $@

install-kserve: $(VENV)/.installed-kserve ## Add the KServe front's model server (kserve) to .venv
$(VENV)/.installed-kserve: $(VENV)/.installed requirements-kserve.txt
	$(BIN)/pip install $(PIP_SOURCE) -r requirements-kserve.txt
	touch $@

install-dev: $(VENV)/.installed-dev ## Add the test tools (and the KServe front, which the tests cover) to .venv
$(VENV)/.installed-dev: $(VENV)/.installed-kserve requirements-dev.txt
	$(BIN)/pip install $(PIP_SOURCE) -r requirements-dev.txt
	touch $@

browser: ## Install Debian's chromium for the playground's browser test when it is missing (as root; else a warning)
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; \
	else echo "warning: no chromium and no root to install it: the playground's browser test will be skipped" \
		"(outside CI; set CHROMIUM=/path/to/chromium to use another)"; fi

wheelhouse: install ## Download every wheel (deepspeed built into one) into wheelhouse/ for offline installs
	mkdir -p wheelhouse
	$(BIN)/pip wheel --no-deps --no-build-isolation -w wheelhouse $$(grep -E '^deepspeed==' requirements.txt)
	grep -v -E '^deepspeed==' requirements.txt > wheelhouse/requirements-rest.txt
	$(BIN)/pip download $(WHEEL_TARGET) -d wheelhouse $(TORCH) wheelhouse/deepspeed-*.whl \
		-r wheelhouse/requirements-rest.txt -r requirements-kserve.txt -r requirements-dev.txt setuptools wheel

model: install ## Build the embedded tiny random model of PRESET (noise images, nothing downloaded), with two LoRA adapters, into $(TINY_MODEL)
	$(BIN)/python scripts/make_tiny_model.py --preset $(PRESET) --out $(TINY_MODEL) --loras

package: install ## Zip $(WEIGHTS) into model.zip and build $(MODEL_STORE)/$(MODEL_NAME).mar with $(MODEL_CONFIG)
	$(BIN)/python scripts/package_model.py $(WEIGHTS) $(MODEL_STORE) --config $(MODEL_CONFIG) --model-name $(MODEL_NAME)

serve: install ## Start TorchServe in the background (logs in logs/, token in key_file.json)
	mkdir -p logs
	$(BIN)/torchserve --start --ncs --ts-config $(TS_CONFIG) --model-store $(MODEL_STORE) \
		--models $(MODEL_NAME)=$(MODEL_NAME).mar > logs/torchserve.out 2>&1

serve-kserve: install-kserve ## Start the KServe front on KSERVE_PORT in the background (logs/kserve.log), serving the MAR
	mkdir -p logs
	$(BIN)/python handler/sd_kserve.py --model-dir $(MODEL_STORE)/$(MODEL_NAME).mar --model-name $(MODEL_NAME) \
		--http-port $(KSERVE_PORT) --grpc-port $(KSERVE_GRPC_PORT) > logs/kserve.log 2>&1 & echo $$! > logs/kserve.pid

query: install ## Wait until the model is ready, send PROMPT, write output-<timestamp>.jpg
	$(BIN)/python scripts/query.py --wait $(WAIT) --model $(MODEL_NAME) --prompt "$(PROMPT)"

playground: install-kserve ## Serve the playground page on PLAYGROUND_PORT against the running front FRONT (torchserve or kserve)
	$(BIN)/python scripts/playground.py --front $(FRONT) --port $(PLAYGROUND_PORT) \
		$(if $(filter kserve,$(FRONT)),--url http://127.0.0.1:$(KSERVE_PORT))

stop: install ## Stop TorchServe and the KServe front (SIGTERM: requests in flight finish first)
	-$(BIN)/torchserve --stop --foreground
	@if [ -f logs/kserve.pid ]; then pid=$$(cat logs/kserve.pid); kill $$pid 2>/dev/null; \
		while kill -0 $$pid 2>/dev/null; do sleep 0.5; done; rm -f logs/kserve.pid; echo "KServe front stopped"; fi

demo: model package ## Fresh machine, end to end: install, tiny model, package, serve, query, stop
	$(MAKE) serve; rc=$$?; \
	if [ $$rc -eq 0 ]; then $(MAKE) query; rc=$$?; fi; \
	$(MAKE) stop; exit $$rc

test: install-dev browser ## Run all CPU tests: unit, handler, and the real TorchServe end to end (GPU tests skip)
	$(BIN)/python -m pytest -ra

clean: ## Remove built models, archives, logs and outputs (keeps .venv and wheelhouse/)
	rm -rf build $(MODEL_STORE) logs key_file.json output-*.jpg output-*.png .pytest_cache
