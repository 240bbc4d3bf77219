# LLMChain developer entry points. `make test` and `make demo` install what they need first
# (scripts/setup.sh, idempotent: a second run takes about a second).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
PYTHON := .llmchain/venv/bin/python
FIXTURES := .llmchain/fixtures
GGUF := .llmchain/smollm2.gguf

.PHONY: help setup fixtures build lint test demo bench-model bench-agent bench-transfer clean-fixtures

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 20

setup: ## install libtorch, the SmolLM2 GGUF, the reference stack, etcd and mosquitto (idempotent)
	@bash scripts/setup.sh
	@command -v cargo-nextest >/dev/null || $(CARGO) install --locked cargo-nextest

# Reference outputs of Hugging Face transformers on the same GGUF; regenerated only when the
# scripts or pinned requirements change.
$(FIXTURES)/tokens.stamp: scripts/reference/tokens.py requirements/reference.txt | setup
	@mkdir -p $(FIXTURES)
	HF_HUB_OFFLINE=1 $(PYTHON) scripts/reference/tokens.py --gguf $(GGUF) --out $(FIXTURES)
	@touch $@

$(FIXTURES)/logits.stamp: scripts/reference/logits.py requirements/reference.txt | setup
	@mkdir -p $(FIXTURES)
	HF_HUB_OFFLINE=1 $(PYTHON) scripts/reference/logits.py --gguf $(GGUF) --out $(FIXTURES)
	@touch $@

fixtures: setup $(FIXTURES)/tokens.stamp $(FIXTURES)/logits.stamp ## write HF reference fixtures for the model tests

build: setup ## build every binary (debug)
	$(CARGO) build --workspace --bins

lint: setup ## rustfmt and clippy, warnings are errors
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: setup fixtures lint build ## every check and test: fmt, clippy, the whole suite
	$(CARGO) nextest run --workspace --profile ci

demo: setup ## the whole loop on one machine (not there yet)
	@echo "make demo: the end-to-end loop (coordinator, trainer, agents) is not built yet; see README.md" >&2
	@exit 1

bench-model: setup ## prefill/decode tok/s and peak RSS: ours vs HF transformers vs llama.cpp, with ratios
	$(PYTHON) scripts/bench/model.py

bench-agent: setup ## decisions/s and p50/p99 at batch 1/8/32: ours vs llama.cpp, ratio; raw/summary bytes
	$(PYTHON) scripts/bench/agent.py

bench-transfer: setup ## FetchBlob of a 512 MiB blob vs a raw TCP copy on loopback (MB/s, ratio)
	$(CARGO) bench -p llmchain-coordinator --bench transfer

clean-fixtures: ## remove generated fixtures
	rm -rf $(FIXTURES)

.PHONY: finetune-check bench-train

finetune-check: setup ## fine-tune real SmolLM2 on the CPU (last-layers:2, lora:8), publish, check accuracy and delta
	bash scripts/finetune-check.sh

bench-train: setup ## training tok/s of last-layers:2: ours with/without activation cache vs HF transformers + PyTorch
	$(PYTHON) scripts/bench/train.py

.PHONY: release

release: setup ## release binaries + dist/llmchain-edge-agent-VERSION-linux-x86_64.tar.gz (agent, libtorch libs, systemd unit, installer)
	bash scripts/release.sh --profile release
