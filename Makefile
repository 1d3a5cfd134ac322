# Two commands for a new user: `make demo` (the whole job on generated data) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo

.PHONY: install demo test lint format clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,beam,milvus,serve,litert]"
	touch $(STAMP)

install: $(STAMP)

# One pytest worker per core, a test file per worker (module fixtures are built once): most of
# a test's time is single-threaded tracing and exporting, so this halves the suite on 2 cores.
test: install
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# One formatter and linter for the whole tree; settings in pyproject.toml ([tool.ruff]).
lint: install
	$(BIN)/ruff format --check vsearch_tf tools tests
	$(BIN)/ruff check vsearch_tf tools tests

format: install
	$(BIN)/ruff format vsearch_tf tools tests
	$(BIN)/ruff check --fix vsearch_tf tools tests

clean-demo:
	rm -rf $(DEMO) saved_models/demo saved_models/demo-untrained

# Generated data (+ synthetic shopper photos of its training products) -> untrained baseline and
# trained model -> export (with flip averaging) -> index -> eval -> query;
# ends with the command that serves the index.
demo: install clean-demo
	$(BIN)/python tools/make_demo_data.py --out $(DEMO)/data --seed 0 --val 60
	$(BIN)/vsearch data synth $(DEMO)/data --per-product 8
	$(BIN)/vsearch train --config configs/demo.yml --set run.name=untrained --set train.epochs=0
	$(BIN)/vsearch export $(DEMO)/runs/untrained --name demo-untrained --flip
	$(BIN)/vsearch index --model saved_models/demo-untrained --gallery $(DEMO)/data/gallery.csv --out $(DEMO)/index-untrained
	$(BIN)/vsearch eval --index $(DEMO)/index-untrained --queries $(DEMO)/data/queries.csv --out $(DEMO)/eval-untrained.json
	$(BIN)/vsearch train --config configs/demo.yml
	$(BIN)/vsearch export $(DEMO)/runs/trained --name demo --flip
	$(BIN)/vsearch index --model saved_models/demo --gallery $(DEMO)/data/gallery.csv --out $(DEMO)/index
	$(BIN)/vsearch eval --index $(DEMO)/index --queries $(DEMO)/data/queries.csv --out $(DEMO)/eval.json --montage $(DEMO)/montage.png
	$(BIN)/vsearch query --index $(DEMO)/index $(DEMO)/data/images/user/u00200_1.jpg --top-k 5
	@echo "untrained: $$(cat $(DEMO)/eval-untrained.json | $(BIN)/python -c 'import json,sys; r=json.load(sys.stdin); print("mAP@1000 %.4f  R@1 %.4f" % (r["map_at_k"], r["recall"]["1"]))')"
	@echo "trained:   $$(cat $(DEMO)/eval.json | $(BIN)/python -c 'import json,sys; r=json.load(sys.stdin); print("mAP@1000 %.4f  R@1 %.4f" % (r["map_at_k"], r["recall"]["1"]))')"
	@echo "montage of queries and their top 5: $(DEMO)/montage.png"
	@echo "search it in a browser (http://127.0.0.1:8080) or over HTTP (docs/serving.md):"
	@echo "  $(BIN)/vsearch serve --index $(DEMO)/index"
