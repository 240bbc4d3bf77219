#!/usr/bin/env python3
"""An independent look at `last-layers:2` on SmolLM2: the same training in plain PyTorch, and
probes of what the frozen trunk gives the two trained blocks. A research tool, not part of
`make test`; docs/training.md has the figures it gave.

It reads the recipe example's cache (the stream entering block 28 for every record, computed
by llmchain-model) and the matching token ids, labels and rule steps:

    cargo run --release -p llmchain-cloud-trainer --example recipe -- \
        --pool 1200 --held 400 --cache-only --dump /tmp/recipe.json
    python scripts/reference/last_layers.py train --dump /tmp/recipe.json --epochs 6
    python scripts/reference/last_layers.py probe --dump /tmp/recipe.json
    python scripts/reference/last_layers.py readout --dump /tmp/recipe.json --train 300 --epochs 40

Other variants of the recipe (`--limits-after`, …) keep their own cache files: pass them with
`--train-cache` / `--held-cache`.

* ``train``: blocks 28–29 and the final norm, written out in PyTorch (RMSNorm, rotary as HF,
  grouped-query attention, SwiGLU), initialised from the GGUF as transformers dequantises it
  and rounded to bf16 as version 1 stores it, trained with torch's AdamW (warm-up, cosine to
  zero, global-norm clipping, decay on matrices) on the cross-entropy over the four labels'
  first tokens, batch 8, the shared prefix run once per step. Prints held-out accuracy (first
  token) after every epoch. Before training it checks its forward against transformers' whole
  model on two held-out records and stops if they differ.
* ``probe``: logistic regressions on the cached stream: (1) the label from the answer position
  alone; (2) each numeric limit (`max ≥ limit`) from the last digit of that series' maximum;
  (3) the label from the answer position and the ends of every number of the record.
* ``readout``: a one-layer attention readout trained from scratch on the cached stream (learnt
  keys and values over every record position, a query from the answer position, an MLP), as a
  question about the data: how far does a generic learner get from these records' labels?

Runs offline (HF_HUB_OFFLINE=1): the weights and the tokenizer come from the GGUF.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, EPS, THETA = 9, 3, 64, 576, 1e-5, 100000.0
BLOCKS = (28, 29)
PARAMS = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
          "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


def rows(path: str, n: int):
    from safetensors import safe_open
    f = safe_open(path, "pt")
    return f.get_tensor("prefix"), [f.get_tensor(f"row.{i}") for i in range(n)]


def hf_model(gguf: str):
    from transformers import AutoModelForCausalLM
    directory, name = os.path.split(os.path.realpath(gguf))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    with torch.no_grad():  # version 1 stores bf16: the same numbers as the cache was built with
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


class TopBlocks:
    """Blocks 28–29 and the final norm of SmolLM2 as plain tensors, with the shared-prefix forward."""

    def __init__(self, model, first_tokens):
        sd = model.state_dict()
        self.p = {f"{l}.{n}": sd[f"model.layers.{l}.{n}"].clone().requires_grad_(True) for l in BLOCKS for n in PARAMS}
        self.p["norm"] = sd["model.norm.weight"].clone().requires_grad_(True)
        self.head = sd["model.embed_tokens.weight"][first_tokens].clone()  # tied: the labels' first tokens
        self.inv_freq = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)

    def rope(self, start, end):
        f = torch.arange(start, end).float()[:, None] * self.inv_freq[None]
        e = torch.cat([f, f], -1)
        return e.cos(), e.sin()

    @staticmethod
    def rotate(x, cos, sin):
        half = HEAD_DIM // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w

    def qkv(self, l, h, cos, sin):
        b, t, _ = h.shape
        p = self.p
        q = (h @ p[f"{l}.self_attn.q_proj.weight"].T).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = (h @ p[f"{l}.self_attn.k_proj.weight"].T).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = (h @ p[f"{l}.self_attn.v_proj.weight"].T).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin), v

    def mlp(self, l, x):
        p = self.p
        h = self.rms(x, p[f"{l}.post_attention_layernorm.weight"])
        inner = F.silu(h @ p[f"{l}.mlp.gate_proj.weight"].T) * (h @ p[f"{l}.mlp.up_proj.weight"].T)
        return x + inner @ p[f"{l}.mlp.down_proj.weight"].T

    def forward(self, prefix, x):
        """`prefix` [1, P, hidden] (shared), `x` [B, T, hidden] right-padded rows → rows after block 29."""
        n, (b, t, _) = prefix.shape[1], x.shape
        pcos, psin = self.rope(0, n)
        cos, sin = self.rope(n, n + t)
        mask = torch.ones(t, n + t, dtype=torch.bool).tril(n)
        group = HEADS // KV_HEADS
        for l in BLOCKS:
            o = self.p[f"{l}.self_attn.o_proj.weight"]
            q, pk, pv = self.qkv(l, self.rms(prefix, self.p[f"{l}.input_layernorm.weight"]), pcos, psin)
            a = F.scaled_dot_product_attention(q, pk.repeat_interleave(group, 1), pv.repeat_interleave(group, 1),
                                               is_causal=True)
            prefix = self.mlp(l, prefix + a.transpose(1, 2).reshape(1, n, -1) @ o.T)
            q, k, v = self.qkv(l, self.rms(x, self.p[f"{l}.input_layernorm.weight"]), cos, sin)
            k = torch.cat([pk.expand(b, -1, -1, -1), k], 2).repeat_interleave(group, 1)
            v = torch.cat([pv.expand(b, -1, -1, -1), v], 2).repeat_interleave(group, 1)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = self.mlp(l, x + a.transpose(1, 2).reshape(b, t, -1) @ o.T)
        return x

    def label_logits(self, prefix, cached, examples, idx):
        """The four labels' first-token logits at the answer position of examples `idx`."""
        t = max(cached[i].shape[0] for i in idx)
        x = torch.zeros(len(idx), t, HIDDEN)
        for b, i in enumerate(idx):
            x[b, :cached[i].shape[0]] = cached[i]
        y = self.forward(prefix, x)
        at = torch.tensor([len(examples[i]["ids"]) - 1 for i in idx])
        return self.rms(y[torch.arange(len(idx)), at], self.p["norm"]) @ self.head.T

    def accuracy(self, prefix, cached, examples):
        right = 0
        with torch.no_grad():
            order = sorted(range(len(cached)), key=lambda i: cached[i].shape[0])
            for j in range(0, len(order), 32):
                idx = order[j:j + 32]
                said = self.label_logits(prefix, cached, examples, idx).argmax(1)
                right += (said == torch.tensor([examples[i]["label"] for i in idx])).sum().item()
        return right / len(cached)


def train(args, dump) -> None:
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = hf_model(args.gguf)
    first = torch.tensor([c[0] for c in dump["candidates"]])
    top = TopBlocks(model, first)
    tprefix, tcached = rows(args.train_cache, args.train)
    hprefix, hcached = rows(args.held_cache, len(dump["held"]))
    train_ex, held_ex = dump["train"][:args.train], dump["held"]
    # The forward must be the model's: compare with transformers' whole model on two records.
    with torch.no_grad():
        for i in range(2):
            ids = torch.tensor([dump["prefix"] + held_ex[i]["ids"]])
            want = model(input_ids=ids).logits[0, -1, first]
            got = top.label_logits(hprefix, hcached, held_ex, [i])[0]
            if not torch.allclose(want, got, atol=2e-3, rtol=1e-4):
                raise SystemExit(f"forward differs from transformers on held-out record {i}: {want} vs {got}")
    del model
    params = list(top.p.values())
    qk = [p for n, p in top.p.items() if "q_proj" in n or "k_proj" in n]
    groups = [{"params": qk, "weight_decay": args.weight_decay, "scale": args.qk_lr_scale},
              {"params": [p for p in params if p.dim() == 2 and all(p is not q for q in qk)],
               "weight_decay": args.weight_decay, "scale": 1.0},
              {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0, "scale": 1.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    per_epoch = math.ceil(args.train / args.batch)
    total, step, t0 = args.epochs * per_epoch, 0, time.time()
    print(f"before: held-out {top.accuracy(hprefix, hcached, held_ex):.4f}", flush=True)
    for epoch in range(args.epochs):
        order = list(range(args.train))
        random.shuffle(order)
        right = 0
        for j in range(0, args.train, args.batch):
            idx = order[j:j + args.batch]
            if step < args.warmup:
                lr = args.lr * (step + 1) / args.warmup
            else:
                lr = args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, total - args.warmup)))
            for g in opt.param_groups:
                g["lr"] = lr * g["scale"]
            logits = top.label_logits(tprefix, tcached, train_ex, idx)
            truth = torch.tensor([train_ex[i]["label"] for i in idx])
            right += (logits.argmax(1) == truth).sum().item()
            loss = F.cross_entropy(logits, truth)
            opt.zero_grad()
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.clip)
            opt.step()
            step += 1
        held = top.accuracy(hprefix, hcached, held_ex)
        print(f"epoch {epoch + 1}: training accuracy during the epoch {right / args.train:.4f}, "
              f"held-out {held:.4f} at {time.time() - t0:.0f} s", flush=True)


def logistic(xa, ya, xb, yb, wd):
    """L2-regularised multinomial logistic regression (LBFGS) on standardised features → (train, held) accuracy, predictions."""
    mu, sd = xa.mean(0), xa.std(0) + 1e-6
    xa, xb = (xa - mu) / sd, (xb - mu) / sd
    classes = int(max(ya.max(), yb.max())) + 1
    w = torch.zeros(xa.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xa @ w + b, ya) + wd * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pa, pb = (xa @ w + b).argmax(1), (xb @ w + b).argmax(1)
    return (pa == ya).float().mean().item(), (pb == yb).float().mean().item(), pb


def series_maxima(text: str) -> dict:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+)[^:\n]*: min [\d.]+ max ([\d.]+)", text, re.M)}


SERIES = ("temperature", "vibration", "current", "pressure")


def number_ends(tok, ids):
    """Per series line (`temperature`, …): the positions of the last token of every number on it,
    and of the number after `max`."""
    pieces = [tok.convert_ids_to_tokens(i).replace("Ġ", " ").strip() for i in ids]
    ends, maxima, line, head, after_max = {}, {}, None, "", False
    for i, word in enumerate(pieces):
        if word == "Ċ":  # a line starts; its name is what comes before its ':'
            line, head = None, ""
        elif line is None and word == ":":
            line = next((name for name in SERIES if head.startswith(name)), "")
        elif line is None:
            head += word
        after_max = after_max or word == "max"
        following = pieces[i + 1] if i + 1 < len(pieces) else ""
        if line and word.isdigit() and not (following.isdigit() or following == "."):
            ends.setdefault(line, []).append(i)
            if after_max:
                maxima[line], after_max = i, False
    return ends, maxima


def probe(args, dump) -> None:
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    directory, name = os.path.split(os.path.realpath(args.gguf))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    _, tcached = rows(args.train_cache, args.train)
    _, hcached = rows(args.held_cache, len(dump["held"]))
    train_ex, held_ex = dump["train"][:args.train], dump["held"]
    ya = torch.tensor([e["label"] for e in train_ex])
    yb = torch.tensor([e["label"] for e in held_ex])

    def answer(cached, ex):
        return torch.stack([r[len(e["ids"]) - 1] for r, e in zip(cached, ex)])

    xa, xb = answer(tcached, train_ex), answer(hcached, held_ex)
    for wd in (1e-4, 1e-3, 1e-2):
        acc_a, acc_b, said = logistic(xa, ya, xb, yb, wd)
        groups: dict = {}
        for step, s, y in zip((e["step"] for e in held_ex), said.tolist(), yb.tolist()):
            g = groups.setdefault(step, [0, 0])
            g[0] += s == y
            g[1] += 1
        by_step = " ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(groups.items(), key=lambda kv: str(kv[0])))
        print(f"label from the answer position, L2 {wd}: training {acc_a:.4f}, held-out {acc_b:.4f} ({by_step})")

    ends_a = [number_ends(tok, e["ids"]) for e in train_ex]
    ends_b = [number_ends(tok, e["ids"]) for e in held_ex]
    for field, limit in (("temperature", 95.0), ("temperature", 80.0), ("vibration", 11.2), ("vibration", 4.5),
                         ("pressure", 9.0)):
        def at_max(cached, ex, ends):
            xs, ys = [], []
            for r, e, en in zip(cached, ex, ends):
                value = series_maxima(e["text"]).get(field)
                if value is None or field not in en[1]:
                    continue
                xs.append(r[en[1][field]])
                ys.append(int(value >= limit))
            return torch.stack(xs), torch.tensor(ys)

        fa, la = at_max(tcached, train_ex, ends_a)
        fb, lb = at_max(hcached, held_ex, ends_b)
        acc_a, acc_b, _ = logistic(fa, la, fb, lb, 1e-3)
        print(f"{field} max >= {limit} from the last digit of the maximum: {int(la.sum())}/{len(la)} training "
              f"positives, training {acc_a:.4f}, held-out {acc_b:.4f} ({int(lb.sum())}/{len(lb)} positives)")

    def everything(cached, ex, ends):
        out = []
        for r, e, en in zip(cached, ex, ends):
            parts = [r[len(e["ids"]) - 1]]
            for line in SERIES:
                got = [r[i] for i in en[0].get(line, [])[:8]]
                parts += got + [torch.zeros(HIDDEN)] * (8 - len(got))
            out.append(torch.cat(parts))
        return torch.stack(out)

    fa, fb = everything(tcached, train_ex, ends_a), everything(hcached, held_ex, ends_b)
    for wd in (1e-4, 1e-3, 1e-2):
        acc_a, acc_b, _ = logistic(fa, ya, fb, yb, wd)
        print(f"label from the answer position and every number's end, L2 {wd}: training {acc_a:.4f}, held-out {acc_b:.4f}")


def readout(args, dump) -> None:
    torch.manual_seed(args.seed)
    _, tcached = rows(args.train_cache, args.train)
    _, hcached = rows(args.held_cache, len(dump["held"]))

    def pack(cached, ex):
        t = max(len(e["ids"]) for e in ex)
        x = torch.zeros(len(ex), t, HIDDEN)
        mask = torch.zeros(len(ex), t, dtype=torch.bool)
        for i, (r, e) in enumerate(zip(cached, ex)):
            x[i, :len(e["ids"])], mask[i, :len(e["ids"])] = r[:len(e["ids"])], True
        last = torch.tensor([len(e["ids"]) - 1 for e in ex])
        return x, mask, last, torch.tensor([e["label"] for e in ex])

    xa, ma, la, ya = pack(tcached, dump["train"][:args.train])
    xb, mb, lb, yb = pack(hcached, dump["held"])
    mu, sd = xa[ma].mean(0), xa[ma].std(0) + 1e-5
    xa, xb = (xa - mu) / sd, (xb - mu) / sd
    heads, dim = 8, 64

    class Readout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k, self.v = torch.nn.Linear(HIDDEN, heads * dim), torch.nn.Linear(HIDDEN, heads * dim)
            self.q = torch.nn.Parameter(torch.randn(heads, dim) * 0.1)
            self.qa = torch.nn.Linear(HIDDEN, heads * dim)
            self.out = torch.nn.Sequential(torch.nn.Linear(heads * dim + HIDDEN, 256), torch.nn.GELU(),
                                           torch.nn.Linear(256, 4))

        def forward(self, x, mask, last):
            b, t, _ = x.shape
            a = x[torch.arange(b), last]
            q = self.q[None] + self.qa(a).view(b, heads, dim)
            k, v = self.k(x).view(b, t, heads, dim), self.v(x).view(b, t, heads, dim)
            w = (torch.einsum("bhd,bthd->bht", q, k) / math.sqrt(dim)).masked_fill(~mask[:, None], -1e9).softmax(-1)
            return self.out(torch.cat([torch.einsum("bht,bthd->bhd", w, v).reshape(b, -1), a], -1))

    m = Readout()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)
    for epoch in range(args.epochs):
        m.train()
        order = torch.randperm(args.train)
        for j in range(0, args.train, 16):
            idx = order[j:j + 16]
            loss = F.cross_entropy(m(xa[idx], ma[idx], la[idx]), ya[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (epoch + 1) % 5 == 0:
            m.eval()
            with torch.no_grad():
                acc_a = (m(xa, ma, la).argmax(1) == ya).float().mean().item()
                acc_b = (m(xb, mb, lb).argmax(1) == yb).float().mean().item()
            print(f"epoch {epoch + 1}: training {acc_a:.4f}, held-out {acc_b:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["train", "probe", "readout"])
    ap.add_argument("--dump", required=True, help="the recipe example's --dump output")
    ap.add_argument("--gguf", default=os.environ.get("LLMCHAIN_SMOLLM2_GGUF", os.path.join(ROOT, ".llmchain/smollm2.gguf")))
    ap.add_argument("--train-cache", default=os.path.join(ROOT, "llmchain-data/recipe/train-1200.safetensors"))
    ap.add_argument("--held-cache", default=os.path.join(ROOT, "llmchain-data/recipe/held-400.safetensors"))
    ap.add_argument("--train", type=int, default=1200, help="training records (the first N of the cache)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--qk-lr-scale", type=float, default=1.0,
                    help="train: the query and key projections at this multiple of the rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    with open(args.dump) as f:
        dump = json.load(f)
    if args.train > len(dump["train"]):
        raise SystemExit(f"--train {args.train}: the dump has {len(dump['train'])} training records")
    {"train": train, "probe": probe, "readout": readout}[args.what](args, dump)


if __name__ == "__main__":
    main()
