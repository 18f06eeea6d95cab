# make test / make demo / make bench / make lint: each bootstraps .venv on first use.
# make test-oldest: the suite on the oldest supported stack (README "Supported versions"),
#   in .venv-oldest with its own copy of the tree and its own build of the extension.
# On a machine whose Python already has torch (the GPU machine), skip the venv:
#   make test SYSTEM_PYTHON=1      (installs this project with --no-deps into that Python)
PYTHON ?= python3
VENV ?= .venv
TORCH_PINS = torch==2.14.1 torchvision==0.29.1
# The oldest stack setup.py's install_requires allows (triton comes with torch).
OLDEST_PINS = torch==2.7.1 torchvision==0.22.1
OLDEST_VENV ?= .venv-oldest
# The oldest stack runs what depends on torch/triton internals: every Triton kernel through
# the interpreter, the C++ backend, the module's dispatch, fold cache and compile paths
# (ONNX, property fuzzing, DDP and benchmarks run on the pinned stack only, to keep CI short).
OLDEST_TESTS ?= tests/test_eval_forward.py tests/test_kernels.py tests/test_nonfinite.py \
	tests/test_train_forward.py tests/test_train_backward.py tests/test_training.py \
	tests/test_module.py tests/test_fold_cache.py tests/test_autocast.py \
	tests/test_device.py tests/test_cpu_backend.py tests/test_compile_export.py
SOURCES = setup.py $(wildcard csrc/*.cpp csrc/*.h)

ifeq ($(SYSTEM_PYTHON),1)
PY := $(PYTHON)
STAMP := .system-install.stamp
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
endif

.PHONY: test test-oldest demo bench lint clean

test: $(STAMP)
	$(PY) -m pytest tests -q

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(PY) -m ruff check .

# make mutants: deliberate bugs, one at a time in a scratch copy, that the tests must
# catch (tests/mutants.py; MUTANTS="name ..." runs some).
.PHONY: mutants
mutants: $(STAMP)
	$(PY) tests/mutants.py $(MUTANTS)

$(VENV)/.installed: $(SOURCES)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS) ninja setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench,dev]'
	touch $@

.system-install.stamp: $(SOURCES)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The oldest stack runs on a copy of the tree in $(OLDEST_VENV)/src: both stacks build
# inception_fused/_C.<python tag>.so, and one build must not replace the other's. Each
# sync replaces every file but the copy's build outputs, so build_ext only rebuilds the
# extension when csrc/ changed (tar keeps the sources' times).
OLDEST_SRC := $(abspath $(OLDEST_VENV))/src
OLDEST_PY := $(abspath $(OLDEST_VENV))/bin/python
define sync_oldest_src
	mkdir -p $(OLDEST_SRC)
	find $(OLDEST_SRC) -path $(OLDEST_SRC)/build -prune -o -type f ! -name '*.so' -exec rm {} +
	tar -cf - --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude='*.so' \
		--exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache . \
		| tar -xf - -C $(OLDEST_SRC)
endef

test-oldest: $(OLDEST_VENV)/.installed
	$(sync_oldest_src)
	cd $(OLDEST_SRC) && $(OLDEST_PY) setup.py -q build_ext --inplace
	cd $(OLDEST_SRC) && $(OLDEST_PY) -m pytest $(OLDEST_TESTS) -q

$(OLDEST_VENV)/.installed: setup.py
	test -x $(OLDEST_PY) || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install -q $(OLDEST_PINS) ninja setuptools wheel
	$(sync_oldest_src)
	$(OLDEST_PY) -m pip install -q --no-build-isolation -e '$(OLDEST_SRC)[test]'
	touch $@

clean:
	rm -rf build *.egg-info inception_fused/*.so .system-install.stamp $(OLDEST_VENV)/src

# make gpu-check [SYSTEM_PYTHON=1] [QUICK=1]: on a GPU machine, the CUDA suite, the sm_90a
# report against the live device and the benchmark grid; QUICK=1: the 9-minute first
# contact, logs and rows in benchmarks/results/first-contact (benchmarks/gpu_check.py;
# --dry-run prints the steps anywhere).
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py $(if $(QUICK),--quick) $(GPU_CHECK_FLAGS)
