# `make demo` and `make test` each build their own virtualenv; torch is installed first, from the exact version
# (a bare `torch` requirement would pull gigabytes of CUDA wheels on a CPU machine).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt
RUN_DIR ?= runs/demo
CHECKPOINT ?= $(RUN_DIR)/final
APP_PORT ?= 7860

.PHONY: demo app bench gpu-check test lint clean

$(STAMP): setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m train demo --output-dir $(RUN_DIR)
	HF_HUB_OFFLINE=1 $(PY) -m train verify $(RUN_DIR)

# The Gradio demo on http://127.0.0.1:$(APP_PORT); CHECKPOINT may be a folder or a Hub repo id (then HF_HUB_OFFLINE=0).
app: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(PY) app.py --checkpoint $(CHECKPOINT) --host 127.0.0.1 --port $(APP_PORT)

# The benchmarks of bench/ (not part of `make test`): tables on stdout, JSON under bench/results/.
bench: $(STAMP)
	for b in inference overhead training scaling feature_workers serve; do HF_HUB_OFFLINE=1 $(PY) -m bench.$$b --threads 1 || exit 1; done

# On a CUDA machine, no network needed: every stage on a random Qwen2-VL-2B at full depth, then bench.inference on
# the GPU; one table and bench/results/gpu_check.json (`python -m bench.gpu_check --tiny` is its CPU smoke run).
# Runs with $(VENV) when it exists, else with $(PYTHON) (an offline GPU machine brings its own CUDA torch and this
# project's requirements; building $(VENV) needs the package index).
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	HF_HUB_OFFLINE=1 $(GPU_PY) -m bench.gpu_check

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
