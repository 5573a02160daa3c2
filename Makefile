# kasa_trl developer tasks. Override on the command line, e.g. for a CUDA build of torch:
#   make venv PYTHON=python3.12 TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
# torch goes in first and pinned: an unpinned torch would let pip pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?= -q -p no:cacheprovider
DEMO_ARGS ?=
BENCH_QUICK ?= examples/benchmarks/run_all.py --quick

VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp

.PHONY: venv demo test lint format bench-quick clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --upgrade pip
	$(VENV_PY) -m pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV_PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(VENV_PY) examples/sft_llama.py $(DEMO_ARGS)

test: venv
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV_PY) -m ruff check .
	$(VENV_PY) -m ruff format --check .

format: venv
	$(VENV_PY) -m ruff check --fix .
	$(VENV_PY) -m ruff format .

bench-quick: venv
	$(VENV_PY) $(BENCH_QUICK)

clean:
	rm -rf outputs runs build dist .pytest_cache .ruff_cache .hypothesis *.egg-info kasa_trl.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
