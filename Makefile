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

.PHONY: demo test venv system-deps clean gpu-wheels

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

# A folder of wheels for a GPU machine without a package registry (launcher/gpu_bench.sh installs them
# there): the pure-Python dependencies torch does not bring, for that machine's Python (GPU_PY), and
# DeepSpeed built without ops against this venv's torch (its ops JIT-build on first use there).
WHEELS  ?= .whl
GPU_PY  ?= 3.12
GPU_WHEELS := webdataset==1.0.2 braceexpand==0.1.7 fire==0.7.1 termcolor==3.3.0 hjson==3.1.0 pydantic==2.14.3 \
  pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 boto3==1.44.5 botocore==1.44.5 \
  s3transfer==0.19.3 jmespath==1.1.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
gpu-wheels: venv
	@mkdir -p $(WHEELS)
	@for spec in $(GPU_WHEELS); do \
	  $(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d $(WHEELS) $$spec || exit 1; done
	DS_BUILD_OPS=0 $(BIN)/pip wheel --quiet --no-deps --no-build-isolation deepspeed==0.19.8 -w $(WHEELS)
	@ls $(WHEELS)

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
