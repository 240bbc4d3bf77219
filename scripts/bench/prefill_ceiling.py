"""What f32 prefill can reach on this machine, and what int8 would cost in accuracy.

    python scripts/bench/prefill_ceiling.py [--gguf PATH] [--threads 2] [--int8]

Prefill of a Llama block is its seven projections (q, k, v, o, gate, up, down) as GEMMs of
`tokens x hidden` activations, plus attention and element-wise work. This prints:

1. libtorch's f32 GEMM rate (GFLOP/s, best of 20) at the model's projection shapes for 512 and
   1,024 tokens (one 512-token prompt; 8 x 128);
2. the FLOPs of one prefill token in the projections alone (2 x the blocks' weights), and so
   the tokens/s that the best measured GEMM rate allows if nothing else took any time;
3. with `--int8`: HF transformers' model (same GGUF, f32) against the same model with every
   linear layer dynamically quantised to int8 (`torch.ao.quantization.quantize_dynamic`,
   fbgemm), on one 512-token prompt: prefill tokens/s of each, and how far the int8 logits are
   from the f32 ones (max |delta|, next-token argmax agreement, mean KL in nats).

Nothing here is asserted; the figures depend on the machine and its load.
"""

import argparse
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=os.environ.get("LLMCHAIN_SMOLLM2_GGUF", os.path.join(ROOT, ".llmchain/smollm2.gguf")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--int8", action="store_true", help="also compare dynamic int8 with f32 (loads HF transformers)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    # SmolLM2-135M: hidden 576, 9 query / 3 KV heads of 64, MLP 1536, 30 blocks.
    hidden, kv, mlp, blocks = 576, 192, 1536, 30
    shapes = {"q/o": (hidden, hidden), "k/v": (hidden, kv), "gate/up": (hidden, mlp), "down": (mlp, hidden)}
    peak = 0.0
    print(f"f32 GEMM, {args.threads} threads (GFLOP/s, best of 20):")
    for tokens in (512, 1024):
        row = []
        for name, (k, n) in shapes.items():
            a, w = torch.randn(tokens, k), torch.randn(n, k)
            rate = 2 * tokens * k * n / best(lambda: torch.nn.functional.linear(a, w), 20) / 1e9
            peak = max(peak, rate)
            row.append(f"{name} {rate:.0f}")
        print(f"  {tokens} tokens: " + ", ".join(row))
    per_token = 2 * blocks * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp)
    print(f"projection FLOPs per prefill token: {per_token / 1e6:.1f} M")
    print(f"tokens/s if the projections ran at the best rate above ({peak:.0f} GFLOP/s) and nothing "
          f"else took time: {peak * 1e9 / per_token:.0f}")

    if not args.int8:
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(os.path.realpath(args.gguf))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 512))
    with torch.no_grad():
        ref = model(ids).logits
        f32 = best(lambda: model(ids, logits_to_keep=1), 3)
        quant = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        out = quant(ids).logits
        int8 = best(lambda: quant(ids, logits_to_keep=1), 3)
    lp, lq = ref.log_softmax(-1), out.log_softmax(-1)
    print(f"HF f32 prefill 512: {512 / f32:.0f} tok/s; dynamic int8: {512 / int8:.0f} tok/s ({f32 / int8:.2f}x)")
    print(f"int8 vs f32 logits: max |delta| {(out - ref).abs().max().item():.2f}, "
          f"next-token argmax agreement {(out.argmax(-1) == ref.argmax(-1)).float().mean().item():.1%}, "
          f"mean KL {(lp.exp() * (lp - lq)).sum(-1).mean().item():.3f} nats")


if __name__ == "__main__":
    main()
