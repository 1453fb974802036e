# Quickstart: `make run` (the main job on the embedded default) and `make test` (the test suite).
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh $(wildcard scripts/lmms-eval-deps.txt)
	bash scripts/setup.sh
	touch $(STAMP)

# The embedded default reads only files in this repository: run it offline.
run: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/mcmoe-vl run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

