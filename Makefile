# Two entry points: `make demo` (set up + main job) and `make test` (set up + tests).
# Both create .venv with Python 3.12 when it is missing or pyproject.toml changed.
SHELL := /bin/bash
VENV := .venv
PY312 := $(shell pyenv which python3.12 2>/dev/null || command -v python3.12 2>/dev/null)

.PHONY: demo test test-fast fuzz setup clean-venv clean-cache

$(VENV)/.installed: pyproject.toml
	@if [ -z "$(PY312)" ]; then \
	  echo "pneumojax needs Python 3.12: install it (e.g. 'pyenv install 3.12') or put python3.12 on PATH." >&2; exit 1; fi
	@[ -x $(VENV)/bin/python ] || $(PY312) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@touch $@

setup: $(VENV)/.installed

# The main job: train + evaluate on the real X-ray sample shipped in the package (400 Kermany
# images, CC BY 4.0); ImageNet weights when a ported checkpoint exists
# (pneumojax port --backbone densenet121 --weights imagenet), else none.
DEMO_WEIGHTS := $(if $(wildcard checkpoints/densenet121-imagenet/manifest.json),imagenet,none)
demo: $(VENV)/.installed
	$(VENV)/bin/pneumojax train --data sample --backbone densenet121 --weights $(DEMO_WEIGHTS) \
	  --image-size 128 --epochs 10 --out runs/demo --overwrite
	@echo "Try the model in a browser: $(VENV)/bin/pneumojax serve --run runs/demo  (then open http://127.0.0.1:8000/)"

# The formatter and pyflakes' checks first (seconds), then the suite on two worker processes
# (pytest-xdist; each test file stays on one worker, so its module fixtures are made once).
test: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check --select F .
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile

# The inner loop (under a minute on 2 cores): the house, the docs' links, figures and statistics,
# data layouts and splits, I/O, the sample, the command's usage errors; nothing trains.
FAST_TESTS := house docs_links metrics stats io data data_errors resize sample cli_usage calibration
test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(FAST_TESTS:%=tests/test_%.py)

# The command-line fuzz (tests/test_fuzz_cli.py) longer and random: random file trees and options
# for train, evaluate, predict and explain; every case must end in exit 0/1/2 with no traceback.
fuzz: $(VENV)/.installed
	PNEUMOJAX_FUZZ_EXAMPLES=300 PNEUMOJAX_FUZZ_RANDOM=1 $(VENV)/bin/python -m pytest \
	  tests/test_fuzz_cli.py --hypothesis-show-statistics -p no:cacheprovider

clean-venv:
	rm -rf $(VENV)

# The test suite's JAX compilation cache (tests/conftest.py): safe to delete at any time.
clean-cache:
	rm -rf .jax-cache
