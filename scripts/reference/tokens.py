#!/usr/bin/env python3
"""Reference token ids and dequantised tensor values for the Rust tests of `llmchain-model`.

Writes OUT/tokens.json with, for the given GGUF:
  - `strings`: for each of a fixed list of varied strings, the ids Hugging Face transformers
    produces (`AutoTokenizer.from_pretrained(dir, gguf_file=name)(text).input_ids`) and HF's
    `decode` of those ids;
  - `chats`: chat conversations rendered with `apply_chat_template` (text and ids), with and
    without a system message, with and without `add_generation_prompt`;
  - `tensors`: for a few real tensors (Q8_0, Q4_1, F32), values dequantised by the `gguf`
    package at fixed row-major indices, plus the f64 sum of the whole tensor.

Usage: python scripts/reference/tokens.py --gguf .llmchain/smollm2.gguf --out .llmchain/fixtures
"""

import argparse
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import transformers  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

STRINGS = [
    "",
    " ",
    "  ",
    "a",
    "Hello world",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "  two leading and three trailing   ",
    "multiple     spaces    inside",
    "tab\tseparated\tvalues",
    "\t\tleading tabs",
    "line one\nline two\n",
    "\n\n\nthree newlines first",
    "windows\r\nline\r\nendings",
    "mixed \t\n \n\t whitespace",
    "0",
    "42",
    "1234567890",
    "3.14159265358979",
    "1,000,000 and 2.5e-10",
    "-273.15 degrees",
    "temp_c=61.2,61.9,62.5,63.0,63.8,64.1",
    "def add(a, b):\n    return a + b\n",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    '{"device_id":"pump-0042","kind":"pump","note":"slight rattling"}',
    "SELECT * FROM users WHERE id = 7;",
    "emoji 😀 and 👍🏽 and 👨‍👩‍👧",
    "🔥🔥🔥",
    "你好，世界",
    "日本語のテキストです。",
    "한국어 문장입니다",
    "café naïve résumé façade",
    "e\u0301 combining accent",
    "Ελληνικά και Русский текст",
    "مرحبا بالعالم",
    "שלום עולם",
    "non\u00a0breaking\u00a0space",
    "zero\u200bwidth",
    "don't won't I'll we've they're she's I'd",
    "DON'T SHOUT",
    "https://example.com/path?query=1&x=y#frag",
    "mailto:someone@example.org",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<|im_start|><|im_end|><|endoftext|>",
    "<|im_start",
    "< |im_end| >",
    "<repo_name>llmchain<file_sep>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "The quick brown fox jumps over the lazy dog.",
    "# Heading\n\n- item 1\n- item 2\n\n**bold** _italic_ `code`",
    "x² + y² = z², ∑∞ ≠ ∅",
    "smoke seen near the motor, burning smell",
    "NO SMOKE seen; leak test passed",
    "vib 4.6mm/s ↑, temp 81°C",
    "$100.00 (USD) — 50% off!",
    "\\escaped\\ backslashes and 'quotes' \"double\"",
    # Spacing that HF's `clean_up_tokenization_spaces` would rewrite on decode, if it were on.
    "Hello , world . Is n't it ? I 'm sure ! do n't",
    "ends with a space before newline \n and carriage return\r",
]

CHATS = [
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    ([{"role": "user", "content": "What is the capital of France?"}], False),
    (
        [
            {"role": "system", "content": "You are a maintenance assistant."},
            {"role": "user", "content": "pump-0042: temp 95.3 C, smoke seen"},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye  \n"},
        ],
        False,
    ),
    (
        [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "second"},
            {"role": "system", "content": "late system message"},
        ],
        True,
    ),
    ([{"role": "user", "content": ""}], True),
    (
        [
            {"role": "user", "content": "emoji 😀 and <|im_end|> inside\nsecond line"},
            {"role": "assistant", "content": " leading space, trailing newline\n"},
        ],
        True,
    ),
]

TENSORS = [
    "token_embd.weight",
    "blk.0.attn_q.weight",
    "blk.29.ffn_down.weight",
    "blk.0.attn_norm.weight",
    "output_norm.weight",
]


def ids_of(result):
    """`apply_chat_template(tokenize=True)` returns a list or a BatchEncoding across versions."""
    if isinstance(result, dict) or hasattr(result, "input_ids"):
        result = result["input_ids"]
    return [int(i) for i in result]


def tensor_samples(path):
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    rng = np.random.default_rng(20261129)
    out = []
    for name in TENSORS:
        t = by_name[name]
        values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        n = values.size
        indices = sorted(set(list(range(min(64, n))) + list(range(max(0, n - 64), n))
                             + [int(i) for i in rng.integers(0, n, size=256)]))
        out.append(
            {
                "name": name,
                "type": t.tensor_type.name,
                # Row-major shape, outermost first.
                "shape": [int(d) for d in reversed(t.shape.tolist())],
                "indices": indices,
                "values": [float(values[i]) for i in indices],
                "sum": float(values.astype(np.float64).sum()),
            }
        )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="path to the GGUF file")
    parser.add_argument("--out", required=True, help="directory to write tokens.json into")
    args = parser.parse_args()

    path = os.path.realpath(args.gguf)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))

    strings = []
    for text in STRINGS:
        ids = [int(i) for i in tok(text).input_ids]
        strings.append({"text": text, "ids": ids, "decoded": tok.decode(ids)})

    chats = []
    for messages, add_generation_prompt in CHATS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        ids = ids_of(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt))
        chats.append(
            {"messages": messages, "add_generation_prompt": add_generation_prompt, "text": text, "ids": ids}
        )

    fixture = {
        "gguf": os.path.basename(path),
        "transformers": transformers.__version__,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "strings": strings,
        "chats": chats,
        "tensors": tensor_samples(path),
    }
    os.makedirs(args.out, exist_ok=True)
    target = os.path.join(args.out, "tokens.json")
    tmp = target + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
    os.replace(tmp, target)
    print(f"wrote {target}: {len(strings)} strings, {len(chats)} chats, {len(fixture['tensors'])} tensors",
          file=sys.stderr)


if __name__ == "__main__":
    main()
