# typhoon-nb: two commands on a fresh machine, `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch spec. torch==2.13.0 is the CPU build this project is tested on (on our machines it installs from local
# disk; a bare `torch` pulls a multi-GB CUDA build). On a GPU machine: make demo TORCH_SPEC="torch>=2.4"
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip -q --disable-pip-version-check
# The lock of tested versions: every install goes through it, so a fresh machine gets the set the suite passed with.
# LOCK= installs the newest releases settings.ini allows (make test-latest); make lock moves the lock forward.
LOCK ?= constraints.txt
PIN := $(if $(LOCK),-c $(LOCK))
# nbdev_test workers and pytest workers (pytest-xdist, one test file per worker); each runs torch on TEST_THREADS
# threads, so that the workers together use the cores once (the models in tests are small: one thread each is faster
# than two workers fighting over two threads each)
NB_WORKERS ?= 2
PYTEST_WORKERS ?= 2
TEST_THREADS ?= 1

.PHONY: demo test install install-dev browser-deps sync-check nbtest pytest readme docs bench base lock test-latest test-oldest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip $(PIN)

$(VENV)/.installed: $(BIN)/python settings.ini setup.py $(LOCK)
	$(PIP) install "$(TORCH_SPEC)" $(PIN)
	$(PIP) install -e . $(PIN)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e ".[dev]" $(PIN)
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## The main job on the embedded default
demo: install
	$(BIN)/typhoon-nb demo

## Everything CI checks (CI runs exactly this)
test: install-dev browser-deps sync-check nbtest pytest

# What the browser tests need: the widget scripts (npm, always) and Chromium from the system's packages where it is
# missing and this user may install it (root or password-less sudo); otherwise one line says what to run, and pytest's
# closing summary lists the browser tests as skipped with the reason.
BROWSER_JS := tests/browser/node_modules/.package-lock.json
$(BROWSER_JS): tests/browser/package.json tests/browser/package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix tests/browser --no-audit --no-fund --ignore-scripts --loglevel=error; \
	else echo "make test: npm not found, the panel browser test will be skipped (install Node.js with npm, then: npm ci --prefix tests/browser)"; fi

browser-deps: $(BROWSER_JS)
	@if [ -x "$${TYPHOON_NB_CHROMIUM:-/usr/bin/chromium}" ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "make test: Chromium not found, the browser tests will be skipped (install Chromium, or set TYPHOON_NB_CHROMIUM to its path)"; \
	elif [ "$$(id -u)" = 0 ]; then echo "make test: installing Chromium for the browser tests (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-thai-tlwg >/dev/null) \
	  || echo "make test: Chromium could not be installed, the browser tests will be skipped (apt-get install -y --no-install-recommends chromium)"; \
	elif sudo -n true 2>/dev/null; then echo "make test: installing Chromium for the browser tests (sudo apt-get)"; \
	  (sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-thai-tlwg >/dev/null) \
	  || echo "make test: Chromium could not be installed, the browser tests will be skipped (sudo apt-get install -y --no-install-recommends chromium)"; \
	else echo "make test: Chromium not found, the browser tests will be skipped; to run them: sudo apt-get install -y --no-install-recommends chromium"; fi

# nbdev_clean and nbdev_export must change nothing: the notebooks are clean and the library matches them
sync-check: install-dev
	@snap() { find nbs typhoon_nb -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' | sort | xargs md5sum; }; \
	snap > /tmp/typhoon-nb-sync.before; \
	$(BIN)/nbdev_clean && $(BIN)/nbdev_export; \
	snap > /tmp/typhoon-nb-sync.after; \
	if ! diff /tmp/typhoon-nb-sync.before /tmp/typhoon-nb-sync.after; then \
	  echo "nbdev_clean/nbdev_export changed the files above: run them and commit"; exit 1; fi; \
	echo "sync-check: notebooks clean, typhoon_nb/ matches nbs/"

nbtest: install-dev
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/nbdev_test --n_workers $(NB_WORKERS)

# -rs: every skipped test and its reason in the closing summary; TYPHOON_NB_LOCK: the lock this venv was installed through
pytest: install-dev
	OMP_NUM_THREADS=$(TEST_THREADS) TYPHOON_NB_LOCK=$(LOCK) $(BIN)/python -m pytest tests -q -rs --durations=10 -n $(PYTEST_WORKERS) --dist loadfile

## The declared ranges at both ends, each in a venv of its own: the newest releases (no lock), and the lower bounds of
## settings.ini (torch stays TORCH_SPEC). make lock: test-latest, then the lock rewritten from what passed.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest LOCK=

test-oldest:
	rm -rf .venv-oldest && mkdir -p build
	$(PYTHON) tools/lock.py oldest > build/oldest-constraints.txt
	$(MAKE) test VENV=.venv-oldest LOCK=build/oldest-constraints.txt

lock: test-latest
	$(PYTHON) tools/lock.py freeze .venv-latest/bin/python constraints.txt
	@echo "lock: constraints.txt rewritten from the versions the suite passed with (git diff constraints.txt)"

## Rebuild the embedded tiny Typhoon from its recipe and ship it to typhoon_nb/assets/ (on a GPU where there is one:
## minutes there, hours on 2 CPU cores); make test then checks the new files against their recorded hashes
base: install
	$(BIN)/python -c "from typhoon_nb.tiny import tiny_typhoon, ship; ship(tiny_typhoon(rebuild=True))"

readme: install-dev
	$(BIN)/python -c "from typhoon_nb.docs import make_readme; make_readme()"

## The offline docs site in _docs/ (no Quarto needed); fails on any warning
docs: install-dev
	$(BIN)/python -c "import sys; from typhoon_nb.site import main; sys.exit(main())"

## Benchmarks: execute every nbs/benchmarks/*.ipynb in place with its full parameters, then clean it (slow: minutes each)
bench: install-dev
	@set -e; for nb in nbs/benchmarks/*.ipynb; do \
	  echo "bench: $$nb"; \
	  HF_HUB_OFFLINE=1 $(BIN)/papermill "$$nb" "$$nb" --cwd nbs/benchmarks -k python3 --no-progress-bar; \
	  $(BIN)/nbdev_clean --fname "$$nb"; \
	done; \
	for nb in $$(grep -l 'benchmarks/results/' nbs/techniques/*.ipynb); do \
	  echo "bench: $$nb (headline from the results)"; \
	  HF_HUB_OFFLINE=1 $(BIN)/papermill "$$nb" "$$nb" --cwd nbs/techniques -k python3 --no-progress-bar; \
	  $(BIN)/nbdev_clean --fname "$$nb"; \
	done
