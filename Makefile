# kasa_trl developer tasks. Override on the command line, e.g. for a CUDA build of torch:
#   make venv PYTHON=python3.12 TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
# torch goes in first and pinned: an unpinned torch would let pip pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Where torch comes from. Without an NVIDIA driver (no nvidia-smi): PyTorch's CPU index, since the public index's
# Linux wheel of torch is the CUDA build (about 20 NVIDIA packages, several GB). It is an extra index, so a mirror
# or a local wheel of the pinned version still counts, and when it cannot be reached pip's own indexes decide; the
# install prints which build it got. With a driver: pip's default (the CUDA build on Linux). Any other:
# TORCH_INDEX=https://download.pytorch.org/whl/cu128; TORCH_INDEX= for pip's default on a CPU machine.
HAVE_NVIDIA_SMI := $(shell command -v nvidia-smi 2>/dev/null)
TORCH_INDEX ?= $(if $(HAVE_NVIDIA_SMI),,https://download.pytorch.org/whl/cpu)
PYTEST_ARGS ?= -q -p no:cacheprovider
DEMO_ARGS ?=
BENCH_QUICK ?= examples/benchmarks/run_all.py --quick

VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp

.PHONY: venv demo test lint format bench-quick dist clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --upgrade pip
	@index="$(TORCH_INDEX)"; \
	if [ -n "$$index" ] && ! $(VENV_PY) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" \
			"$${index%/}/torch/" >/dev/null 2>&1; then \
		echo "note: $$index cannot be reached: torch comes from pip's configured indexes"; index=""; \
	fi; \
	echo "$(VENV_PY) -m pip install \"$(TORCH_SPEC)\"$${index:+ --extra-index-url $$index}"; \
	$(VENV_PY) -m pip install "$(TORCH_SPEC)" $${index:+--extra-index-url "$$index"}
	@$(VENV_PY) -c "import torch; cuda = torch.version.cuda; \
	print(f'installed torch {torch.__version__}:', f'CUDA {cuda} build' if cuda else 'CPU build')"
	$(VENV_PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(VENV_PY) examples/sft_llama.py $(DEMO_ARGS)

test: venv
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

# ruff, then mypy with pyproject.toml's [tool.mypy] settings (kasa_trl/, strict).
lint: venv
	$(VENV_PY) -m ruff check .
	$(VENV_PY) -m ruff format --check .
	$(VENV_PY) -m mypy

format: venv
	$(VENV_PY) -m ruff check --fix .
	$(VENV_PY) -m ruff format .

bench-quick: venv
	$(VENV_PY) $(BENCH_QUICK)

# The sdist, then the wheel built from it (so a file missing from the sdist fails here), into dist/.
dist: venv
	rm -rf dist
	$(VENV_PY) -c "from setuptools import build_meta; build_meta.build_sdist('dist')"
	$(VENV_PY) -m pip wheel --no-deps --no-build-isolation -w dist dist/kasa_trl-*.tar.gz

clean:
	rm -rf outputs runs build dist .pytest_cache .ruff_cache .mypy_cache .hypothesis *.egg-info kasa_trl.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
