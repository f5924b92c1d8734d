# PTB LSTM language models (Zaremba et al. 2014). `make help` lists the targets.
# Every target that needs the environment builds it first: on a fresh machine
# `make train-small` and `make test` are the only commands you need.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
WHEELS ?= wheels
# The dropout placements of `make ablation` (every file in configs/ablation/, comma-separated)
# and how many train at once (1 thread each).
comma         := ,
space         := $(subst ,, )
PLACEMENTS    ?= $(subst $(space),$(comma),$(sort $(basename $(notdir $(wildcard configs/ablation/*.yaml)))))
ABLATION_JOBS ?= 2
# Appended as `command || $(STATUS)`: a command stopped by SIGINT or SIGTERM (exit 128 + signal) stops
# make by the same signal, so that `make train-small` ends with 130 or 143 like the command. GNU make
# itself can only exit 0, 1 or 2: any other failure (3: a non-finite run; 138: SIGUSR1, which make
# reads as a debug toggle) ends make with 2 after its line "make: *** [...] Error N" naming the code.
STATUS = { rc=$$?; case $$rc in 130|143) trap "exit $$rc" INT TERM; kill -$$((rc - 128)) $$PPID; sleep 30 & wait;; esac; exit $$rc; }

.DEFAULT_GOAL := help
.PHONY: help setup data train-small train-medium train-large reproduce ablation figures eval table test test-fast lint bench profile wheels gpu-check gpu-table1 gpu-table1-import clean

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'
	@echo "  ARGS='key=value ...' passes Hydra overrides to train-*, e.g. make train-small ARGS='trainer.seed=2'"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

setup: $(STAMP) ## create .venv and install the package with its dev extras, at the versions in constraints.txt

data: $(STAMP) ## download PTB into data/ptb (or $LM_DATA_DIR) and check the MD5 sums
	$(PY) -m lm.data || $(STATUS)

train-small: data ## train the paper's small (non-regularized) model, then print the table
	$(PY) -m lm.train experiment=zaremba_small $(ARGS) || $(STATUS)
	$(PY) -m lm.report --with-runs runs || $(STATUS)

train-medium: data ## train the paper's medium regularized model (39 epochs), then print the table
	$(PY) -m lm.train experiment=zaremba_medium $(ARGS) || $(STATUS)
	$(PY) -m lm.report --with-runs runs || $(STATUS)

train-large: data ## train the paper's large regularized model (55 epochs), then print the table
	$(PY) -m lm.train experiment=zaremba_large $(ARGS) || $(STATUS)
	$(PY) -m lm.report --with-runs runs || $(STATUS)

reproduce: data ## every row of Table 1 into runs/table1 (30+ h on 2 cores: run it under nohup; reruns continue)
	$(PY) -m lm.reproduce $(ARGS) || $(STATUS)

ablation: data ## dropout placements side by side (about 2 h on 2 cores; reruns continue), then results/ablation/
	$(PY) -m lm.train -m experiment=ablation ablation=$(PLACEMENTS) hydra/launcher=joblib \
		hydra.launcher.n_jobs=$(ABLATION_JOBS) trainer.threads=1 trainer.progress=false trainer.resume=auto $(ARGS) || $(STATUS)
	$(PY) -m lm.ablation runs/ablation --out results/ablation || $(STATUS)

figures: data ## draw the dropout pictures into results/figures/ from the real model (trains a small LSTM briefly)
	$(PY) -m lm.figures $(ARGS) || $(STATUS)

# CKPT reaches the command through the environment, quoted: any path works (spaces, '=', ',').
eval: $(STAMP) ## evaluate a checkpoint under both protocols: make eval CKPT=runs/zaremba_small/seed-1/checkpoint.pt
	@test -n "$$CKPT" || { echo "error: give CKPT=path/to/checkpoint.pt" >&2; exit 2; }
	$(PY) -m lm.evaluate "checkpoint=$$CKPT" $(ARGS) || $(STATUS)

table: $(STAMP) ## regenerate results/README.md from results/; print it with your runs/ (sweeps too) beside
	$(PY) -m lm.report --with-runs runs || $(STATUS)

test: lint ## lint, then the full test suite (real-PTB tests need $LM_DATA_DIR; they skip without it)
	$(PY) -m pytest || $(STATUS)

test-fast: $(STAMP) ## the fast tier: every module in under a minute (no real PTB, no test of a second or more)
	$(PY) -m pytest -q -m "not slow and not full and not ptb" || $(STATUS)

lint: $(STAMP) ## ruff: lint and format check (ruff format . fixes the format)
	$(PY) -m ruff check . && $(PY) -m ruff format --check . || $(STATUS)

bench: $(STAMP) ## training and evaluation speed against a plain PyTorch step, written to results/bench.json
	$(PY) scripts/bench.py $(ARGS) || $(STATUS)

profile: $(STAMP) ## where a training step's time goes, by category, written to results/profile/
	$(PY) scripts/profile_step.py $(ARGS) || $(STATUS)

# make wheels runs where pip reaches an index; make gpu-check on the GPU machine, offline, with the Python that has
# torch ($(PYTHON), not .venv, whose CPU torch it must not see): it installs wheels/ beside that torch itself.
wheels: $(STAMP) ## wheels of every dependency but torch into $WHEELS (wheels/), for an offline GPU machine
	$(PY) scripts/wheels.py --dest "$(WHEELS)" $(ARGS) || $(STATUS)

gpu-check: ## on the GPU machine: install wheels/, CUDA tests, bench, medium+large for 8.5 min; into $OUT or gpu-check/
	$(PYTHON) scripts/gpu_check.py --wheels "$(WHEELS)" $(ARGS) || $(STATUS)

gpu-table1: ## on the GPU machine: large, Gal's medium (+MC), medium x3 (+averages) in 9.5 min; reruns continue; into $OUT
	$(PYTHON) scripts/gpu_table1.py --wheels "$(WHEELS)" $(ARGS) || $(STATUS)

# FROM reaches the command through the environment, quoted, like CKPT.
gpu-table1-import: $(STAMP) ## what make gpu-table1 brought back (FROM=its folder) into results/gpu-table1/, then the table
	@test -n "$$FROM" || { echo "error: give FROM=the folder make gpu-table1 wrote (with gpu-table1.tar.gz)" >&2; exit 2; }
	$(PY) scripts/gpu_table1.py --import-from "$$FROM" || $(STATUS)
	$(PY) -m lm.report --with-runs runs || $(STATUS)

clean: ## remove the environment and caches (keeps data/ and results/)
	rm -rf $(VENV) .pytest_cache *.egg-info
