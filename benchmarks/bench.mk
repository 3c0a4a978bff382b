# Benchmark targets, included by the main Makefile (`-include benchmarks/bench.mk`).
#
# The benchmark compares mmfusion against OpenCLIP (`open_clip_torch`), which is never a runtime
# dependency of mmfusion. open_clip_torch requires torchvision, and PyPI's torchvision does not import
# beside the torch 2.13.0 of the main .venv, so the benchmark gets its own venv with a matched
# torch/torchvision pair (both wheels lie on this machine's disk; about 5.6 GB with their CUDA
# libraries, which are usable on CPU). mmfusion is installed there editable, so both sides of the
# comparison run on the same torch.
BENCH_PYTHON ?= python3
BENCH_VENV   := .venv-bench
BENCH_BIN    := $(BENCH_VENV)/bin
BENCH_STAMP  := $(BENCH_VENV)/.installed
BENCH_TORCH  ?= torch==2.14.1 torchvision==0.29.1
BENCH_ARGS   ?=

.PHONY: bench-env bench-throughput

bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): pyproject.toml benchmarks/bench.mk
	test -x $(BENCH_BIN)/python || $(BENCH_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/pip install --quiet --upgrade pip
	$(BENCH_BIN)/pip install --quiet $(BENCH_TORCH)
	$(BENCH_BIN)/pip install --quiet open_clip_torch
	$(BENCH_BIN)/pip install --quiet -e .
	$(BENCH_BIN)/python -c "import open_clip, mmfusion, torch, torchvision; print('bench env ok: torch', torch.__version__, 'open_clip', open_clip.__version__)"
	touch $(BENCH_STAMP)

# Full default run: 8 alternating rounds x 8 steps per model, 2 threads; about 2.5 minutes on 2 cores.
# Pass extra flags with BENCH_ARGS="--precision bf16 --json runs/bench.json".
bench-throughput: $(BENCH_STAMP)
	$(BENCH_BIN)/python benchmarks/train_throughput.py $(BENCH_ARGS)
