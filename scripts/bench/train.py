"""Training throughput of last-layers:2 on SmolLM2-135M-Instruct: ours (tch) with and without
the activation cache, next to HF transformers + PyTorch doing the same freeze (all but the last
two blocks and the final norm), in one run on the same records and the same prompts.

    python scripts/bench/train.py [--examples 64] [--epochs 2] [--batch-size 16] [--threads 2]

Tokens are whole sequences (system prompt, record, answer) of the steps run, the same count for
every runtime. "with cache" excludes the one-time trunk pass (reported on its own, and
amortised over the epochs run). Prints a table and JSON; asserts nothing. Figures on a shared
machine vary with its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trainer() -> str:
    subprocess.run([os.environ.get("CARGO", "cargo"), "build", "-q", "-p", "llmchain-cloud-trainer", "--bins"],
                   cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "debug", "cloud-trainer")


def run_ours(exe: str, data: str, args, cache: bool, out: str) -> dict:
    cmd = [exe, "train", "--mode", "last-layers:2", "--gguf", args.gguf, "--data", data, "--eval", data,
           "--skip-eval", "--no-publish", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--checkpoint-every", "0", "--out", out]
    if not cache:
        cmd.append("--no-activation-cache")
    env = dict(os.environ, RUST_LOG="warn")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_torch(data: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    directory, name = os.path.split(os.path.realpath(args.gguf))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.train()
    layers = model.config.num_hidden_layers
    trainable = []
    for n, p in model.named_parameters():
        on = n.startswith(f"model.layers.{layers - 1}.") or n.startswith(f"model.layers.{layers - 2}.") \
            or n == "model.norm.weight"
        p.requires_grad_(on)
        if on:
            trainable.append(p)
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    rows = [json.loads(line) for line in open(data)]
    seqs = []
    for r in rows:
        messages = [{"role": "system", "content": r["instructions"]}, {"role": "user", "content": r["text"]}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt)["input_ids"]
        a_ids = tok(r["label"] + "<|im_end|>")["input_ids"]
        seqs.append((p_ids + a_ids, len(p_ids)))
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for i in range(0, len(seqs), args.batch_size):
            batch = seqs[i:i + args.batch_size]
            t = max(len(s) for s, _ in batch)
            ids = torch.zeros((len(batch), t), dtype=torch.long)
            mask = torch.zeros((len(batch), t), dtype=torch.long)
            labels = torch.full((len(batch), t), -100, dtype=torch.long)
            for b, (s, p) in enumerate(batch):
                ids[b, :len(s)] = torch.tensor(s)
                mask[b, :len(s)] = 1
                labels[b, p:len(s)] = torch.tensor(s[p:])
                tokens += len(s)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad()
    secs = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
            "runtime": f"torch {torch.__version__} + transformers {__import__('transformers').__version__} f32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=os.environ.get("LLMCHAIN_SMOLLM2_GGUF", os.path.join(ROOT, ".llmchain/smollm2.gguf")))
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["torch"])
    ap.add_argument("--data")
    args = ap.parse_args()
    if args.worker == "torch":
        print(json.dumps(run_torch(args.data, args)))
        return
    exe = trainer()
    with tempfile.TemporaryDirectory() as tmp:
        records = os.path.join(tmp, "records.jsonl")
        subprocess.run([exe, "data", "--seed", "3", "--count", str(args.examples), "--out", records],
                       check=True, stderr=subprocess.DEVNULL)
        # The texts exactly as the trainer renders them, for the PyTorch run.
        texts = os.path.join(tmp, "texts.jsonl")
        subprocess.run([exe, "data", "--seed", "3", "--count", str(args.examples), "--texts", "--out", texts],
                       check=True, stderr=subprocess.DEVNULL)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        cache = run_ours(exe, records, args, True, os.path.join(tmp, "cache"))
        nocache = run_ours(exe, records, args, False, os.path.join(tmp, "nocache"))
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "torch", "--data", texts,
                               "--gguf", args.gguf, "--epochs", str(args.epochs), "--batch-size",
                               str(args.batch_size), "--threads", str(args.threads)],
                              stdout=subprocess.PIPE, text=True, env=env, check=True)
        torch_run = json.loads(proc.stdout.strip().splitlines()[-1])
    ours_cache = cache["train_tokens"] / cache["train_seconds"]
    ours_amortised = cache["train_tokens"] / (cache["train_seconds"] + cache["cache_seconds"])
    ours_nocache = nocache["train_tokens"] / nocache["train_seconds"]
    pt = torch_run["tokens_per_s"]
    print(f"last-layers:2 on SmolLM2-135M, {args.examples} examples x {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.threads} threads (CPU; figures depend on machine load)")
    print(f"  {'runtime':<44} {'tokens/s':>10} {'vs PyTorch':>11}")
    for name, v in [("ours, activation cache (steps only)", ours_cache),
                    (f"ours, activation cache (+{cache['cache_seconds']:.0f} s trunk pass)", ours_amortised),
                    ("ours, no cache", ours_nocache),
                    (torch_run["runtime"], pt)]:
        print(f"  {name:<44} {v:>10.0f} {v / pt:>10.2f}x")
    print(json.dumps({"ours_cache_tokens_per_s": ours_cache, "ours_cache_amortised_tokens_per_s": ours_amortised,
                      "ours_nocache_tokens_per_s": ours_nocache, "pytorch_tokens_per_s": pt,
                      "ratio_cache_vs_pytorch": ours_cache / pt, "ratio_nocache_vs_pytorch": ours_nocache / pt}))


if __name__ == "__main__":
    main()
