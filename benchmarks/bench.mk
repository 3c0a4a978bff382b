# Benchmark targets, included by the main Makefile (`-include benchmarks/bench.mk`). Every script in
# benchmarks/ has a `make bench-*` target here; benchmarks/README.md lists them with what they measure, their
# run time on 2 cores and the doc table each one feeds. Extra flags go through BENCH_ARGS, e.g.
#   make bench-vq BENCH_ARGS="--seeds 1 2"
# Outputs go under runs/ (gitignored).
#
# All targets but bench-throughput and bench-clip-parity run in the main .venv. bench-throughput compares mmfusion against OpenCLIP
# (`open_clip_torch`), which is never a runtime dependency of mmfusion. open_clip_torch requires torchvision,
# and PyPI's torchvision does not import beside the torch 2.13.0 of the main .venv, so that benchmark gets its
# own venv with a matched torch/torchvision pair (both wheels lie on this machine's disk; about 5.6 GB with
# their CUDA libraries, which are usable on CPU). mmfusion is installed there editable, so both sides of the
# comparison run on the same torch.
BENCH_PYTHON ?= python3
BENCH_VENV   := .venv-bench
BENCH_BIN    := $(BENCH_VENV)/bin
BENCH_STAMP  := $(BENCH_VENV)/.installed
BENCH_TORCH  ?= torch==2.14.1 torchvision==0.29.1
BENCH_ARGS   ?=
BENCH_OUT    ?= runs/bench
PY           := $(BIN)/python

BENCH_TARGETS := bench-throughput bench-clip-parity bench-step-variants bench-precision bench-clft bench-comm bench-compress \
	bench-data-throughput bench-ddwa bench-distill bench-fusion-zoo bench-grad-checkpointing bench-mixing \
	bench-moe-balance bench-scaling bench-serve-load bench-serve-split bench-generate-latency \
	bench-sparse-attention bench-unified-stability bench-unified-quality bench-unified-audio \
	bench-unified-decode bench-unified-variants bench-vq bench-judge bench-pretrained bench-federated bench-bias-skew bench-bias-pairs bench-scd

BENCH_TARGETS += bench-decoder-hf bench-serve-vs-plain bench-diffusion

.PHONY: bench-env bench-list $(BENCH_TARGETS)

bench-list:
	@echo $(BENCH_TARGETS) | tr ' ' '\n'

bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): pyproject.toml benchmarks/bench.mk
	test -x $(BENCH_BIN)/python || $(BENCH_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/pip install --quiet --upgrade pip
	$(BENCH_BIN)/pip install --quiet $(BENCH_TORCH)
	$(BENCH_BIN)/pip install --quiet open_clip_torch
	$(BENCH_BIN)/pip install --quiet -e .
	$(BENCH_BIN)/python -c "import open_clip, mmfusion, torch, torchvision; print('bench env ok: torch', torch.__version__, 'open_clip', open_clip.__version__)"
	touch $(BENCH_STAMP)

# ---- training speed ---------------------------------------------------------------------------------------
# mmfusion vs OpenCLIP, 8 alternating rounds x 8 steps per model, 2 threads (docs/benchmarks.md).
bench-throughput: $(BENCH_STAMP)
	$(BENCH_BIN)/python benchmarks/train_throughput.py $(BENCH_ARGS)

# mmfusion's step against variants of itself (bf16, SDPA attention, SDPA math, fused AdamW; compile on request).
bench-step-variants: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/step_variants.py --json $(BENCH_OUT)/step_variants.json $(BENCH_ARGS)

# fp32 vs bf16 autocast on the quickstart model + the CPU's bf16 facts (README "Configuration", precision.py).
bench-precision: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/step_variants.py --variants bf16 --rounds 4 --steps 3 --json $(BENCH_OUT)/precision.json $(BENCH_ARGS)

bench-grad-checkpointing: $(STAMP)
	$(PY) benchmarks/grad_checkpointing.py --threads 1 --sizes 128x3,256x6,384x8 --batch-size 32 --steps 5 --warmup 2 $(BENCH_ARGS)

bench-data-throughput: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/data_throughput.py --out $(BENCH_OUT)/data_throughput $(BENCH_ARGS)

bench-comm: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/comm.py --nproc 2 --steps 30 --json $(BENCH_OUT)/comm.json $(BENCH_ARGS)

bench-scaling: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/scaling.py --nproc 2 --steps 10 --json $(BENCH_OUT)/scaling.json $(BENCH_ARGS)

# ---- recipes, sampling, fusion ------------------------------------------------------------------------------
bench-mixing: $(STAMP)
	$(PY) benchmarks/mixing.py $(BENCH_ARGS)

bench-ddwa: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/ddwa.py --json $(BENCH_OUT)/ddwa.json $(BENCH_ARGS)

bench-distill: $(STAMP)
	$(PY) benchmarks/distill.py $(BENCH_ARGS)

bench-pretrained: $(STAMP)
	nice -n 10 $(PY) benchmarks/pretrained_text.py $(BENCH_ARGS)

bench-federated: $(STAMP)
	nice -n 10 $(PY) benchmarks/federated.py $(BENCH_ARGS)

bench-bias-skew: $(STAMP)
	nice -n 10 $(PY) benchmarks/bias_skew.py --rare image $(BENCH_ARGS)

bench-bias-pairs: $(STAMP)
	nice -n 10 $(PY) benchmarks/bias_pairs.py --label size --seeds 0 1 2 $(BENCH_ARGS)

# SCD adversarial-input detection (PGD, character and synonym attacks; a two-tower model and a fusion classifier),
# concept filters and the watermark (docs/safety.md): trains three two-tower models of 500 steps; add
# BENCH_ARGS="--reuse" to re-score them without training, "--parts fusion" for one part.
bench-scd: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 10 $(PY) benchmarks/scd.py --seeds 0 1 2 --out $(BENCH_OUT)/scd $(BENCH_ARGS)

# joint image + text diffusion (configs/diffusion.yaml): t2i / i2t / joint accuracy under the judges, 3 seeds,
# with and without the consistency constraint, sampling images/s, the sample grid (docs/diffusion.md)
# (one judge for every seed: the renderer is the same; docs/diffusion.md ran the seeds as parallel processes)
bench-diffusion: $(STAMP)
	test -f $(BENCH_OUT)/diffusion_judge/judge.json || $(PY) -m mmfusion.eval.judge_cli --steps 500 --seed 0 \
		--threads 1 --eval-n 300 --out $(BENCH_OUT)/diffusion_judge
	nice -n 10 $(PY) benchmarks/diffusion.py --variants base,consistency --judge $(BENCH_OUT)/diffusion_judge \
		--speed --grid docs/img/diffusion_grid.png $(BENCH_ARGS)

bench-clft: $(STAMP)
	$(PY) benchmarks/clft.py --seeds 0 1 $(BENCH_ARGS)

bench-fusion-zoo: $(STAMP)
	$(PY) benchmarks/fusion_zoo.py $(BENCH_ARGS)

bench-moe-balance: $(STAMP)
	$(PY) benchmarks/moe_balance.py --out runs/moe_balance/results.json $(BENCH_ARGS)

# ---- serving ------------------------------------------------------------------------------------------------
bench-compress: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/compress.py --torchao --finetune-steps 50 --repeats 20 --json $(BENCH_OUT)/compress.json $(BENCH_ARGS)

bench-serve-load: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/serve_load.py --rate 100 --duration 10 --concurrency 200 --scenarios open,closed,batching,cache,inprocess --json $(BENCH_OUT)/serve_load.json $(BENCH_ARGS)

bench-serve-split: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/serve_load.py --scenarios split --split-requests 200 --json $(BENCH_OUT)/serve_split.json --plot $(BENCH_OUT)/serve_split.png $(BENCH_ARGS)

# The unified model the latency table is measured on: the one `make bench-unified-quality` saves.
UNIFIED_MODEL ?= runs/unified_benchmark/model
$(UNIFIED_MODEL)/vocab.json: | $(STAMP)
	$(PY) benchmarks/unified.py --part quality --save-model $(UNIFIED_MODEL)

bench-generate-latency: $(STAMP) $(UNIFIED_MODEL)/vocab.json
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/generate_latency.py --model $(UNIFIED_MODEL) --json $(BENCH_OUT)/generate_latency.json $(BENCH_ARGS)

# ---- unified model ------------------------------------------------------------------------------------------
bench-vq: $(STAMP)
	$(PY) benchmarks/vq.py $(BENCH_ARGS)

bench-unified-stability: $(STAMP)
	$(PY) benchmarks/unified.py --part stability --out runs/unified_stability $(BENCH_ARGS)

# 600 decoder steps; trains the quickstart two-tower model into runs/quickstart/model first when it is missing.
bench-unified-quality: $(STAMP)
	$(PY) benchmarks/unified.py --part quality --save-model $(UNIFIED_MODEL) $(BENCH_ARGS)

bench-unified-audio: $(STAMP)
	$(PY) benchmarks/unified_audio.py $(BENCH_ARGS)

bench-unified-decode: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/unified_decode.py --json $(BENCH_OUT)/unified_decode.json --plot $(BENCH_OUT)/unified_decode.png $(BENCH_ARGS)

# UnifiedDecoder (LLaMA-shaped) vs transformers' LlamaForCausalLM, same weights: train / prefill / decode tokens/s.
bench-decoder-hf: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/decoder_vs_hf.py --json $(BENCH_OUT)/decoder_vs_hf.json $(BENCH_ARGS)

# mmfusion serve (dynamic batching) vs a plain FastAPI endpoint vs ONNX Runtime in-process, 64 clients.
bench-serve-vs-plain: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/serve_vs_plain.py --json $(BENCH_OUT)/serve_vs_plain.json $(BENCH_ARGS)

bench-unified-variants: $(STAMP)
	$(PY) benchmarks/unified_variants.py $(BENCH_ARGS)

bench-sparse-attention: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/sparse_attention.py --lengths 1024 2048 4096 --json $(BENCH_OUT)/sparse_attention.json --plot $(BENCH_OUT)/sparse_attention.png $(BENCH_ARGS)

# The generation-metrics judge (mmfusion.eval.judge_cli, not a benchmarks/ script): one seed per call.
bench-judge: $(STAMP)
	$(PY) -m mmfusion.eval.judge_cli --threads 1 --seed 0 $(BENCH_ARGS)

# OpenCLIP -> mmfusion import parity (and export back) against the real open_clip (docs/pretrained.md).
bench-clip-parity: $(BENCH_STAMP)
	$(BENCH_BIN)/python benchmarks/clip_parity.py $(BENCH_ARGS)

# PPO-CS (issue 17, Z1): appended as its own line so that other targets' edits of BENCH_TARGETS do not collide
BENCH_TARGETS += bench-ppo-cs
.PHONY: bench-ppo-cs
bench-ppo-cs: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 10 $(PY) benchmarks/ppo_cs.py --seeds 0 1 2 $(BENCH_ARGS)

# Issue 17 on a user's data: concept filters from a labelled JSONL vs prompt vectors (the SCD benchmark's models,
# reused when bench-scd left them), and PPO-CS on user text files checked by the exact judges
BENCH_TARGETS += bench-filters-user bench-ppo-cs-user
.PHONY: bench-filters-user bench-ppo-cs-user
bench-filters-user: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 10 $(PY) benchmarks/filters_user.py --seeds 0 1 2 --reuse $(BENCH_ARGS)
bench-ppo-cs-user: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 10 $(PY) benchmarks/ppo_cs_user.py --seeds 0 1 2 $(BENCH_ARGS)
