# The README's commands. Each one creates .venv and installs charlm into it if that was not done yet.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: install train sample test test-all bench gpu-check report sweep compare record lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[dev,sweep]'
	touch $(STAMP)

train: $(STAMP)            ## train the default LSTM on the embedded tiny shakespeare (make train ARGS="model=gru")
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m charlm.train $(ARGS)

sample: $(STAMP)           ## make sample CKPT=outputs/.../checkpoints/best.ckpt ARGS="prompt=ROMEO:"
	$(PY) -m charlm.sample ckpt_path=$(CKPT) $(ARGS)

test: $(STAMP)             ## the fast test suite (CI runs this)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest $(ARGS)

test-all: $(STAMP)         ## every test, slow ones included (gpu ones skip without a GPU)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -m "" $(ARGS)

bench: $(if $(NO_INSTALL),,$(STAMP))  ## charlm vs a bare PyTorch loop (both sampling modes), sampling, scans, on this machine (NO_INSTALL=1: use PY as it is)
	$(PY) scripts/bench.py $(ARGS)

gpu-check:                 ## GPU proof into gpu-check/DATE/, no install (PART=part1, then PART=part2: <= 9 min each; DRY=1: CPU rehearsal)
	PY=$(PY) scripts/gpu_check.sh $(PART) $(if $(DRY),--dry-run)

report: $(STAMP)           ## gradient-flow, clipping and memory-span figures into reports/
	$(PY) -m charlm.report $(ARGS)

sweep: $(STAMP)            ## Optuna search: make sweep ARGS="hparams_search=lstm_lr"
	$(PY) -m charlm.sweep $(ARGS)

COMPARE_BUDGET ?= budget.seconds=70
COMPARE_MODELS ?= models=[rnn,lstm,gru,transformer,mingru,hawk]
compare: $(STAMP)          ## 6 models x 3 seeds, 70 s each, <= ~30 min on 2 CPU cores (conf/compare.yaml; COMPARE_MODELS=models=null: all; COMPARE_BUDGET=budget.tokens=2000000)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m charlm.compare $(COMPARE_BUDGET) '$(COMPARE_MODELS)' 'seeds=[1,2,3]' $(ARGS)

record: $(STAMP)           ## every published figure, one process at a time, into results/MACHINE/DATE/ (75-95 min on 2 CPU cores, by their speed; PARTS=calibration,train,budgets,compare,report,bench FORCE=1 RECORD_PRESET=tiny)
	PARTS=$(PARTS) FORCE=$(FORCE) RECORD_PRESET=$(RECORD_PRESET) $(PY) scripts/record.py $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check charlm tests scripts

clean:
	rm -rf outputs multirun reports/*.tmp .pytest_cache
