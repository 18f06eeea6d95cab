# make test / make demo / make bench: each bootstraps .venv on first use.
# On a machine whose Python already has torch (the GPU machine), skip the venv:
#   make test SYSTEM_PYTHON=1      (installs this project with --no-deps into that Python)
PYTHON ?= python3
VENV ?= .venv
TORCH_PINS = torch==2.14.1 torchvision==0.29.1
SOURCES = setup.py $(wildcard csrc/*.cpp csrc/*.h)

ifeq ($(SYSTEM_PYTHON),1)
PY := $(PYTHON)
STAMP := .system-install.stamp
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
endif

.PHONY: test demo bench lint clean

test: $(STAMP)
	$(PY) -m pytest tests -q

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(PY) -m ruff check .

$(VENV)/.installed: $(SOURCES)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS) ninja setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	touch $@

.system-install.stamp: $(SOURCES)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

clean:
	rm -rf build *.egg-info inception_fused/*.so .system-install.stamp

# make gpu-check [SYSTEM_PYTHON=1]: on a GPU machine, the CUDA suite, the sm_90a report
# against the live device and the benchmark grid (benchmarks/gpu_check.py; --dry-run
# prints the steps anywhere).
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_FLAGS)
