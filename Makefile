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

# No `build` prerequisite: the test build compiles every workspace binary the end-to-end tests run
# (each package with a binary has integration tests, so cargo builds its binaries into
# target/debug/), with the features the tests unify (dev-dependencies turn on e.g. libc's
# `extra_traits` and rustix's `fs`). A separate `cargo build --workspace --bins` first resolves
# features without dev-dependencies, so on a clean clone it compiled most of the dependency
# graph a second time.
test: setup fixtures lint ## every check and test: fmt, clippy, the whole suite
	$(CARGO) nextest run --workspace --profile ci

# QUICK=1: the short variant (smaller data, fewer steps, smaller held-out sets); SERVE=1: keep the coordinator
# and agents running after the report until Ctrl-C; PROFILE=release: release binaries.
QUICK ?=
SERVE ?=
PROFILE ?= debug
demo: setup ## the whole loop on one machine: fine-tune, canary rollout to 3 agents, incremental round, report (QUICK=1, SERVE=1)
	$(PYTHON) scripts/demo.py --profile $(PROFILE) $(if $(filter 1 yes true,$(QUICK)),--quick) $(if $(filter 1 yes true,$(SERVE)),--serve)

bench-model: setup ## prefill/decode tok/s and peak RSS: ours vs HF transformers vs llama.cpp, with ratios
	$(PYTHON) scripts/bench/model.py

bench-agent: setup ## decisions/s and p50/p99 at batch 1/8/32: ours vs llama.cpp, ratio; raw/summary bytes
	$(PYTHON) scripts/bench/agent.py

bench-transfer: setup ## FetchBlob of a 512 MiB blob vs a raw TCP copy on loopback (MB/s, ratio)
	$(CARGO) bench -p llmchain-coordinator --bench transfer

# Simulated agents run in a debug-profile bench binary (its dependencies are optimised) against a
# release coordinator. FLEET_AGENTS, FLEET_SECONDS and more: see tests/benches/fleet.rs.
bench-fleet: setup ## FLEET_AGENTS (20000) simulated agents on one coordinator: held, heartbeat p50/p99, summaries, CPU, RSS
	$(CARGO) build --release -p llmchain-coordinator --bin coordinator
	$(CARGO) bench -p llmchain-tests --bench fleet --profile dev

bench: setup ## every benchmark (or BENCH=model,transfer,agent,train,fleet) into bench/REPORT.md, each figure next to its peer
	$(PYTHON) scripts/bench/report.py

clean-fixtures: ## remove generated fixtures
	rm -rf $(FIXTURES)

.PHONY: finetune-check bench-train bench-fleet bench

finetune-check: setup ## fine-tune real SmolLM2 on the CPU (last-layers:2, lora:8), publish, check accuracy and delta
	bash scripts/finetune-check.sh

bench-train: setup ## training tok/s of last-layers:2: ours with/without activation cache vs HF transformers + PyTorch
	$(PYTHON) scripts/bench/train.py

.PHONY: release

release: setup ## release binaries + dist/llmchain-edge-agent-VERSION-linux-x86_64.tar.gz (agent, libtorch libs, systemd unit, installer)
	bash scripts/release.sh --profile release

.PHONY: fuzz

FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= manifest trust records summaries gguf safetensors
fuzz: setup ## cargo fuzz (nightly) each parser of untrusted bytes for FUZZ_SECONDS (60) and print executions; not in make test
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  case $$t in gguf|safetensors) feat="--features model";; *) feat="";; esac; \
	  mkdir -p corpus/$$t; \
	  cargo +nightly fuzz run --sanitizer none $$feat $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) \
	    -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 > target-$$t.log 2>&1; rc=$$?; \
	  grep -E '^(Done|stat::number_of_executed_units)' target-$$t.log | sed "s/^/$$t: /"; \
	  if [ $$rc -ne 0 ]; then tail -n 40 target-$$t.log; echo "$$t: crashed (reproducer under fuzz/artifacts/$$t)"; exit $$rc; fi; \
	done
