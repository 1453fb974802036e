# Quickstart: `make run` (the main job on the embedded default) and `make test` (the test suite), both in .venv/
# installed from the lock (requirements/lock.txt). `make lock` regenerates the lock; `make test-latest` runs the
# tests on the newest releases in a separate environment (.venv-latest; not part of CI).
VENV := .venv
STAMP := $(VENV)/.installed
LATEST := .venv-latest

.PHONY: setup run test lock test-latest
setup: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt scripts/setup.sh scripts/lmms-eval-deps.txt $(wildcard mcmoe_vl/quant/csrc/*)
	bash scripts/setup.sh
	touch $(STAMP)

# The embedded default reads only files in this repository: run it offline. RUN_PROCS processes split the suite's
# (model, recipe, seed) grid (torchrun, one thread each; RUN_PROCS=1 runs it in this process).
RUN_PROCS ?= 2
run: $(STAMP)
ifeq ($(RUN_PROCS),1)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/mcmoe-vl run
else
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(RUN_PROCS) \
		$(VENV)/bin/mcmoe-vl run
endif

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# uv resolves; the version is pinned so that the same inputs give the same lock.
lock: $(STAMP)
	$(VENV)/bin/python -m pip install -q "uv==0.13.9"
	UV=$(VENV)/bin/uv bash scripts/lock.sh

test-latest:
	VENV=$(LATEST) bash scripts/setup.sh --latest
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(LATEST)/bin/python -m pytest -q -p no:cacheprovider
