# Two entry points (see README.md): `make demo` and `make test`. Both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch/torchvision are pinned here only to pick the wheels that exist on these machines;
# setup.cfg keeps lower bounds.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install install-bench demo test test-slow bench-flops

install:
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[test]'

install-bench: install
	$(PIP) install -q -e '.[test,bench]'

demo: install
	$(PYTHON) -m convfx.cli demo --out out/demo

test: install
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest -q

test-slow: install
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest -q -m slow

bench-flops: install
	$(PYTHON) benchmarks/flops.py --shared-data ../shared/data --out benchmarks/results/flops.md
