# Two commands matter (see README):  make demo   and   make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHARED ?= ../shared/data

.PHONY: setup demo test test-all bench gpu data clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet "setuptools>=68"   # the build backend (Python 3.12+ venvs have none)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .   # cnf-train, cnf-sample, ... in .venv/bin
	touch $@

setup: $(VENV)/.installed

# Copy the MNIST files shipped beside the project (if any) into the ignored data root.
data:
	@if [ -d $(SHARED)/MNIST/raw ]; then mkdir -p data/MNIST/raw && cp -n $(SHARED)/MNIST/raw/*.gz data/MNIST/raw/; \
	else echo "no $(SHARED)/MNIST/raw here: put the MNIST .gz files in data/MNIST/raw or use --set data.download=true"; fi

# The main job on the embedded default: FFJORD's toy configuration on checkerboard, shortened.
demo: setup
	$(PY) train.py configs/toy.yaml --out runs/demo --set train.iterations=1000 \
		$(if $(wildcard runs/demo/checkpoint.pt),--resume)
	$(PY) sample.py runs/demo/best.pt --out runs/demo/samples.png --n 5000

test: setup data
	$(PY) -m pytest

test-all: setup data
	$(PY) -m pytest -m ""

bench: setup
	$(PY) bench/bench_toy.py --iterations 1000

# With an NVIDIA GPU: the GPU tests, then FFJORD's MNIST config timed with TF32 off and on.
gpu: setup data
	$(PY) -m pytest tests/test_devices.py
	$(PY) bench/bench_mnist.py --no-cpu
	$(PY) bench/bench_mnist.py --no-cpu --set train.tf32=true

clean:
	rm -rf runs $(VENV)
