# d2v_scale: the two commands of the README.
#   make demo   a real small data2vec 2.0 pretraining on CPU through DeepSpeed (no GPU, no download)
#   make test   the test suite (CPU; the multi-rank DeepSpeed paths run for real)
# Both create the virtual environment (.venv, pinned versions) when it is missing.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.d2v-installed
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test venv system-deps clean

venv: $(STAMP)

# DeepSpeed is an sdist that builds against the torch already installed, hence the order and
# --no-build-isolation (with build isolation pip would fetch a second torch into the build env).
$(STAMP): setup.py Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "pip==26.3" "setuptools==65.5.0" "wheel==0.48.0"
	$(BIN)/pip install --quiet torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1
	$(BIN)/pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install --quiet --no-build-isolation -e '.[test,decode,hf]'
	@touch $(STAMP)

# Debian packages some tests drive for real (installed when missing and running as root).
SYSTEM_PACKAGES := espeak-ng slurm-wlm munge openssh-server pdsh
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null \
	    || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null); \
	  else echo "system packages missing:$$missing (install them as root)"; fi; fi

demo: venv
	$(BIN)/d2v demo

# pytest exits 5 when it collected nothing (e.g. an over-narrow -k): say so instead of failing.
test: venv system-deps
	@$(BIN)/python -m pytest -q -rs --durations=25 --timeout=900 tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

clean:
	rm -rf runs demo_data .pytest_cache
