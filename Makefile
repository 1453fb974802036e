# Quickstart: `make run` (the main job on the embedded default) and `make test` (the test suite).
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test bench
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh $(wildcard scripts/lmms-eval-deps.txt)
	bash scripts/setup.sh
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mcmoe-vl run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks
