# Two commands on a fresh machine: `make demo` (the whole workflow on the generated demo
# data) and `make test` (the whole test suite). Both create .venv with the pinned set first.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
INSTALLED := $(VENV)/.installed
# Commands in the rules (`python -m equiav`, deno for yt-dlp) come from the venv.
RUN := PATH="$(BIN):$$PATH"

.PHONY: setup demo test lint dry-run clean-demo

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(INSTALLED)
	$(RUN) snakemake --profile workflow/profiles/default $(ARGS)
	$(RUN) snakemake --report results/report.html $(ARGS)
	@cat results/summary.md
	@echo "The report: results/report.html"

test: $(INSTALLED)
	$(RUN) python -m pytest $(PYTEST_ARGS)

# Style is checked, not fixed: `ruff format . && ruff check --fix . && snakefmt Snakefile workflow/rules` fixes it.
lint: $(INSTALLED)
	$(RUN) snakemake --lint
	$(RUN) snakefmt --check Snakefile workflow/rules
	$(RUN) ruff check .
	$(RUN) ruff format --check .

dry-run: $(INSTALLED)
	$(RUN) snakemake --profile workflow/profiles/default -n $(ARGS)

clean-demo:
	rm -rf results/demo data/demo
