# `make demo` runs the main job on the built-in demo data; `make test` runs the whole test suite.
# Both create the virtual environment in .venv and install requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install demo demo-mixing listening-test test test-fast gpu-check benchmarks clean

install: $(INSTALLED)

$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(INSTALLED)
	$(PY) pipeline.py

demo-mixing: $(INSTALLED)
	$(PY) pipeline.py 'steps=[mixer_pretrain,mixer,wave_u_net,mix,evaluate_mix]'

listening-test: $(INSTALLED)
	$(PY) listening_test.py demo

test: $(INSTALLED)
	$(PY) -m pytest -n 2 --dist loadgroup -q

test-fast: $(INSTALLED)
	$(PY) -m pytest -n 2 -q -m "not slow"

# On a CUDA machine (two GPUs for the DDP tests): the tests marked gpu, then the GPU figures.
gpu-check: $(INSTALLED)
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: CUDA is not available here')"
	$(PY) -m pytest -q -m gpu -p no:xdist
	$(PY) benchmarks/gpu_figures.py

benchmarks: $(INSTALLED)
	for b in $(filter-out benchmarks/gpu_figures.py,$(wildcard benchmarks/*.py)); do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf runs data/demo
