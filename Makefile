# Two set-up commands: `make demo` and `make test` (`make quick`: the tests not marked
# slow). All create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR := build/demo

.PHONY: demo test quick lint bench clean venv support-table

venv: $(STAMP)

# Second pip call: the native code (runtime_shim/native: helper, runtime, lazykv_run) compiles against the executorch
# the first one installed (pip's isolated build env has none); without isolation this time,
# and LAZYKV_REQUIRE_NATIVE=1 turns a failed build into an install error.
NATIVE_SOURCES := $(wildcard runtime_shim/native/CMakeLists.txt runtime_shim/native/src/* \
	runtime_shim/native/include/lazykv/* runtime_shim/native/tools/* runtime_shim/native/tests/*)

$(STAMP): pyproject.toml setup.py runtime_shim/native/xnnpack_options.cpp runtime_shim/native/build.py $(NATIVE_SOURCES)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	LAZYKV_REQUIRE_NATIVE=1 $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lazykv.cli.demo --out-dir $(DEMO_DIR)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q --durations=15 tests

# The quick tier: everything not marked slow (under 2 minutes).
quick: lint
	$(BIN)/python -m pytest -q -m "not slow" tests

# The full support table of export_llm's models x options (tens of minutes: two exports a
# cell); rewrites the table in README.md. `make test` runs a representative subset.
support-table: $(STAMP)
	$(BIN)/python -m pytest -q -m support_table tests/test_export_llm_configs.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks all

clean:
	rm -rf build
