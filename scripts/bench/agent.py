#!/usr/bin/env python3
"""Agent decision benchmark (issue 5): our engine vs llama.cpp on the same GGUF and tokens.

    python scripts/bench/agent.py [--gguf PATH] [--threads 2] [--records 64] [--repeats 2]
                                  [--skip-llamacpp] [--profile]

- ours: `cargo bench -p llmchain-edge-agent --bench decisions` (release build). It scores
  simulated records (fixed seed) with the agent's engine at batch sizes 1, 8 and 32 (the
  instructions' keys and values computed once per model; one padded forward step per batch
  over the records and all their candidates, which share each record's keys and values
  through the attention mask), and runs 10,000 records through the agent's summary
  windows for the bandwidth ratio. It exports the exact token ids it scored: the prefix, each
  record's part, each candidate ("<label><|im_end|>").
- llama.cpp: `llama-cpp-python==0.3.36` on the same GGUF (Q4_1, as is), scoring the same token
  ids with the same advantage: the prefix is evaluated once, and for each record the context is
  rewound to the prefix (`n_tokens`; `eval` drops KV entries past it), the record is evaluated,
  then each candidate's tokens are fed one at a time from the record's end, each label scored
  by its summed log-probability from the last logits (no `logits_all`). Its Python API holds
  one sequence, so batches of 8 and 32 are sequential: decisions/s is the same at every batch
  size, and a record's latency is the time from its batch's start to its own decision (ours:
  to its batch's end, when all decisions of the batch are out), which favours llama.cpp.

Both run with the same threads, each in its own process; each figure is the best of `--repeats`
passes after a warm-up. Agreement is the share of records where both pick the same label.
Prints a table with ratios and whether the targets are met; it does not assert.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import LLAMA_CPP_VERSION, ensure_llamacpp  # noqa: E402  (scripts/bench/model.py)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCHES = (1, 8, 32)
TARGET_DECISIONS_RATIO = 2.0  # ours / llama.cpp decisions/s at batch 32
TARGET_BANDWIDTH_RATIO = 100.0  # raw bytes / summary bytes


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank, as the Rust bench."""
    rank = math.ceil(p / 100.0 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def worker_llamacpp(export_path: str, gguf: str, threads: int, repeats: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    with open(export_path) as f:
        export = json.load(f)
    prefix = export["prefix_ids"]
    cands = export["candidate_ids"]
    records = export["records"]
    labels = export["labels"]
    needed = len(prefix) + max(map(len, records)) + max(map(len, cands))
    n_ctx = 256 * ((needed + 255) // 256)

    t = time.perf_counter()
    llm = Llama(
        model_path=gguf,
        n_ctx=n_ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t
    n_vocab = llm.n_vocab()

    def last_logprobs() -> np.ndarray:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).astype(np.float64)
        m = logits.max()
        return logits - m - np.log(np.exp(logits - m).sum())

    # The shared instructions, once: their KV entries stay at positions [0, len(prefix)).
    t = time.perf_counter()
    llm.reset()
    llm.eval(prefix)
    prefix_ms = (time.perf_counter() - t) * 1e3
    base = llm.n_tokens

    def score(ids: list[int]) -> list[float]:
        llm.n_tokens = base  # rewind to the prefix; eval drops the KV entries past it
        llm.eval(ids)
        end = llm.n_tokens
        first = last_logprobs()
        out = []
        for cand in cands:
            lp = float(first[cand[0]])
            for j in range(1, len(cand)):
                llm.eval([cand[j - 1]])
                lp += float(last_logprobs()[cand[j]])
            llm.n_tokens = end
            out.append(lp)
        return out

    for ids in records[:2]:  # warm-up
        score(ids)
    best = None
    for _ in range(max(1, repeats)):
        times, scores = [], []
        start = time.perf_counter()
        for ids in records:
            t = time.perf_counter()
            scores.append(score(ids))
            times.append(time.perf_counter() - t)
        total = time.perf_counter() - start
        if best is None or total < best[0]:
            best = (total, times, scores)
    total, times, scores = best
    batches = {}
    for b in BATCHES:
        latencies = []
        for i in range(0, len(times), b):
            elapsed = 0.0
            for dt in times[i : i + b]:
                elapsed += dt
                latencies.append(elapsed * 1e3)
        latencies.sort()
        batches[str(b)] = {
            "decisions_per_s": len(records) / total,
            "p50_ms": percentile(latencies, 50.0),
            "p99_ms": percentile(latencies, 99.0),
        }
    chosen = [labels[max(range(len(row)), key=row.__getitem__)] for row in scores]
    return {
        "runtime": f"llama.cpp (llama-cpp-python {LLAMA_CPP_VERSION}, Q4_1, prefix reuse, sequential)",
        "threads": threads,
        "load_s": load_s,
        "prefix_ms": prefix_ms,
        "records": len(records),
        "batches": batches,
        "labels": chosen,
        "logprobs": scores,
    }


def run_ours(args, export_path: str) -> dict | None:
    if args.ours_bin:
        cmd = [args.ours_bin]
    else:
        cmd = [os.environ.get("CARGO", "cargo"), "bench", "-q", "-p", "llmchain-edge-agent", "--bench", "decisions", "--"]
    cmd += ["--threads", str(args.threads), "--records", str(args.records), "--repeats", str(args.repeats),
           "--gguf", args.gguf, "--export", export_path]
    if args.profile:
        cmd.append("--profile")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        print(f"bench: our runtime failed (exit {proc.returncode})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_llamacpp(args, export_path: str) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", export_path, "--gguf", args.gguf,
           "--threads", str(args.threads), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"bench: llama.cpp failed (exit {proc.returncode})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verdict(ratio: float, target: float) -> str:
    return f"target >= {target:.0f}x: " + ("met" if ratio >= target else "MISSED")


def report(ours: dict | None, theirs: dict | None, export: dict | None) -> None:
    print()
    if not ours:
        print("bench-agent: our bench failed; nothing to compare (see the errors above)")
        return
    if ours:
        print(f"records: {ours['records']} simulated (seed {ours['seed']}), threads {ours['threads']}, "
              f"best of {ours['repeats']} passes; shared prefix {ours['prefix_tokens']} tokens")
    header = f"{'batch':>5}  {'ours dec/s':>10} {'p50 ms':>8} {'p99 ms':>8}   {'llama.cpp dec/s':>15} {'p50 ms':>8} {'p99 ms':>8}   {'ratio':>6}"
    print(header)
    for b in BATCHES:
        o = ours["batches"][str(b)] if ours else None
        t = theirs["batches"][str(b)] if theirs else None
        left = f"{o['decisions_per_s']:10.2f} {o['p50_ms']:8.1f} {o['p99_ms']:8.1f}" if o else f"{'-':>10} {'-':>8} {'-':>8}"
        right = f"{t['decisions_per_s']:15.2f} {t['p50_ms']:8.1f} {t['p99_ms']:8.1f}" if t else f"{'-':>15} {'-':>8} {'-':>8}"
        ratio = f"{o['decisions_per_s'] / t['decisions_per_s']:5.2f}x" if o and t else f"{'-':>6}"
        print(f"{b:>5}  {left}   {right}   {ratio}")
    print()
    if ours and theirs:
        r = ours["batches"]["32"]["decisions_per_s"] / theirs["batches"]["32"]["decisions_per_s"]
        print(f"ours / llama.cpp decisions/s at batch 32: {r:.2f}x  {verdict(r, TARGET_DECISIONS_RATIO)}")
    if ours:
        bw = ours["bandwidth"]
        print(f"raw / summary bytes, {bw['records']} records in windows of {bw['window_records']} with "
              f"{bw['hard_examples']} hard examples: {bw['raw_bytes']} / {bw['summary_bytes']} = "
              f"{bw['ratio']:.1f}x  {verdict(bw['ratio'], TARGET_BANDWIDTH_RATIO)}")
        print("  (summaries built by the agent's summary window; decisions there from "
              f"{ours['bandwidth_decider']})")
        for s in ours["bandwidth_sweep"]:
            print(f"  window {s['window_records']:>6} records, {s['hard_examples']} hard examples: "
                  f"{s['raw_bytes']} / {s['summary_bytes']} = {s['ratio']:.1f}x")
    if ours and theirs and export:
        mine = export["ours_batch_1"]
        same = sum(a == b for a, b in zip(mine, theirs["labels"]))
        truth = export["truth"]
        acc_o = sum(a == b for a, b in zip(mine, truth)) / len(truth)
        acc_t = sum(a == b for a, b in zip(theirs["labels"], truth)) / len(truth)
        diffs = [abs(a - b) for ra, rb in zip(export["ours_batch_1_logprobs"], theirs["logprobs"]) for a, b in zip(ra, rb)]
        diffs.sort()
        print(f"agreement (same label, ours batch 1 vs llama.cpp): {100.0 * same / len(mine):.1f}% of {len(mine)} records; "
              f"|logprob difference| median {percentile(diffs, 50):.3f}, max {diffs[-1]:.3f} (f32 vs Q4_1 kernels)")
        print(f"accuracy vs the label rules (base model, not fine-tuned): ours {100 * acc_o:.1f}%, llama.cpp {100 * acc_t:.1f}%")
    if ours:
        same = ", ".join(f"batch {b}: {100 * ours['batches'][str(b)]['same_label_as_batch_1']:.1f}%" for b in BATCHES[1:])
        print(f"ours, same label as at batch 1 ({same})")
        print(f"  ours: {ours['runtime']} on {ours['device']}, load {ours['load_s']:.1f}s, prefix {ours['prefix_ms']:.0f} ms")
    if theirs:
        print(f"  llama.cpp: {theirs['runtime']}, load {theirs['load_s']:.1f}s, prefix {theirs['prefix_ms']:.0f} ms; "
              "batches of 8/32 run sequentially (one sequence in its Python API)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=os.environ.get("LLMCHAIN_SMOLLM2_GGUF", os.path.join(ROOT, ".llmchain/smollm2.gguf")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--records", type=int, default=64, help="records scored per batch size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also time the parts of a batch (ours, stderr)")
    parser.add_argument("--ours-bin", help="a prebuilt decisions bench binary to run instead of `cargo bench`")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.gguf = os.path.realpath(args.gguf)
    if args.worker:
        print(json.dumps(worker_llamacpp(args.worker, args.gguf, args.threads, args.repeats)))
        return

    have_llamacpp = not args.skip_llamacpp and ensure_llamacpp()
    with tempfile.TemporaryDirectory(prefix="llmchain-bench-agent-") as tmp:
        export_path = os.path.join(tmp, "tokens.json")
        ours = run_ours(args, export_path)
        export = None
        if ours and os.path.exists(export_path):
            with open(export_path) as f:
                export = json.load(f)
        theirs = run_llamacpp(args, export_path) if have_llamacpp and export else None
    if theirs:
        print(json.dumps({k: v for k, v in theirs.items() if k not in ("labels", "logprobs")}), file=sys.stderr)
    print(json.dumps(ours), file=sys.stderr)
    report(ours, theirs, export)


if __name__ == "__main__":
    main()
