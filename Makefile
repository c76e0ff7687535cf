# sidvid_rec: install, demo and test. Uses the active Python environment.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
RUN_DIR ?= runs/demo

.PHONY: install demo test test-fast lint clean

install:
	$(PIP) install -r requirements/cpu.txt
	$(PIP) install --no-deps -r requirements/nodeps.txt
	$(PIP) install --no-deps -e .

demo: install
	sidvid-rec pipeline --config configs/ml-latest-small/demo.yaml --run-dir $(RUN_DIR)

test: lint
	$(PYTHON) -m pytest -q -ra tests

test-fast: lint
	$(PYTHON) -m pytest -q -ra -m "not slow" tests

# The layers contract of pyproject.toml: a backward import between stages fails here.
lint:
	lint-imports

clean:
	rm -rf runs build *.egg-info .pytest_cache
