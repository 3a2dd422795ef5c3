# The two commands of the quick start: `make demo` and `make test`.
# Both create (or reuse) .venv and install everything mmgen needs, system packages included.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON  ?= $(shell command -v python3.11 || command -v python3)
STAMP   := $(VENV)/.installed
OUT     ?= runs/quickstart
# Parallel test workers (pytest-xdist); CI machines have 2 cores.
WORKERS ?= 2

.PHONY: demo test install system-deps clean

demo: $(STAMP)
	$(VENV)/bin/mmgen quickstart --out $(OUT)

# Lint and formatting (ruff), the one-way package chain (import-linter, contract in pyproject.toml), then the suite.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-logo
	$(PY) -m pytest -n $(WORKERS) --durations=15 tests

install: $(STAMP)

# espeak-ng speaks ShapesWorld captions; everything else comes from PyPI.
system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  echo "installing espeak-ng with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng >/dev/null; }

# torch is installed first and pinned (constraints.txt) so that no dependency swaps it for another
# build; deepspeed builds against the installed torch, hence --no-build-isolation for it.
$(STAMP): pyproject.toml constraints.txt | system-deps
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation deepspeed
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# lmms-eval (the mmgen[lmms] extra) without its own dependency tree, which pins wandb==0.25.0 and
	# av<16 and pulls dozens of task-specific packages; the plug-in and its tests need only these.
	$(PY) -m pip install -q -c constraints.txt --no-deps 'lmms-eval>=0.7,<0.8'
	$(PY) -m pip install -q -c constraints.txt datasets evaluate sacrebleu tenacity pytablewriter 'filelock<4'
	@touch $(STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache
