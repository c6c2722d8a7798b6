# One-command set-up on a fresh machine: the first target run creates .venv and builds the
# C++ extension; later runs reuse them (and rebuild when requirements, setup or csrc change).
# --no-compile: Python compiles only the modules a run imports, when it imports them (byte-compiling
# every installed file took 1 min 17 s of the 2 min 56 s install on 2 cores).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2

.PHONY: setup test bench bench-pytest compile-record clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile -r requirements-dev.txt
	$(BIN)/pip install --quiet -e . --no-build-isolation
	touch $(STAMP)

# The tests: Triton kernels in the interpreter on the CPU, compiled for sm_80/sm_90, C++ and reference.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The main job: benchmark + verification run (small default on the CPU, full suite on a GPU).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# The same suites under pytest-benchmark (JSON for pytest-benchmark compare).
bench-pytest: $(STAMP)
	$(BIN)/python -m pytest benchmarks/test_suites.py -p no:xdist --benchmark-json=benchmarks/results/latest-pytest-benchmark.json

# After a change to a Triton kernel (or Triton): compile every shipped config for sm_80/sm_90, the
# first configs for sm_86/sm_89 and, launched over an odd length, for all four (about an hour of
# CPU time) into the record the compile tests check.
compile-record: $(STAMP)
	env -u TRITON_INTERPRET $(BIN)/python -m tangent_kernels.triton.compile_check --record tests/compile_record.json

clean:
	rm -rf $(VENV) build *.egg-info tangent_kernels/*.so
