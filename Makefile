# sidvid_rec: install, demo and test. Uses the active Python environment.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
RUN_DIR ?= runs/demo
# torch comes from PyTorch's own wheel index, so the build is explicit: CPU for `make install`,
# CUDA 12.6 for `make install-gpu` (PyPI's default torch wheel would be a CUDA build).
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CUDA_INDEX ?= https://download.pytorch.org/whl/cu126

.PHONY: install install-gpu demo test test-fast lint clean

# CPU stack: torch (CPU build), fbgemm-gpu-cpu, faiss-cpu (requirements/cpu.txt).
install:
	$(PIP) install torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX)
	$(PIP) install -r requirements/cpu.txt
	$(PIP) install --no-deps -r requirements/nodeps.txt
	$(PIP) install --no-deps -e .

# GPU stack (CUDA 12): torch from the cu126 index, fbgemm-gpu of the same release, faiss-gpu-cu12
# (requirements/gpu.txt). A CPU-only fbgemm-gpu-cpu left over from `make install` is removed: it
# loads under a CUDA torch but has no CUDA kernels (sidvid_rec.stack refuses that pair).
install-gpu:
	$(PIP) uninstall -y fbgemm-gpu-cpu faiss-cpu
	$(PIP) install torch==$(TORCH_VERSION) --index-url $(TORCH_CUDA_INDEX)
	$(PIP) install -r requirements/gpu.txt
	$(PIP) install --no-deps -r requirements/nodeps.txt
	$(PIP) install --no-deps -e .

demo: install
	sidvid-rec pipeline --config configs/ml-latest-small/demo.yaml --run-dir $(RUN_DIR)

test: lint
	$(PYTHON) -m pytest -q -ra tests

test-fast: lint
	$(PYTHON) -m pytest -q -ra -m "not slow and not slurm" tests

# The layers contract of pyproject.toml: a backward import between stages fails here.
lint:
	lint-imports

clean:
	rm -rf runs build *.egg-info .pytest_cache
