#!/usr/bin/env python3
"""Reference logits from Hugging Face transformers, the ground truth for llmchain-model's tests.

Two modes:

* ``--gguf PATH --out DIR`` loads the GGUF exactly as transformers does (dequantised to f32) and
  writes the fixtures the Rust tests compare against (``make fixtures``):
    - ``manifest.json``: per case its input ids, attention mask, position ids, the logits file
      and its shape; plus the greedy generation of the "capital of France" chat;
    - ``<case>.f32``: raw little-endian f32 logits.
  Single prompts store the logits of every position (a stronger check than the last one); the
  padded batch stores the last position of each row (left padding, so it is real for all rows).

* ``--model-dir DIR --ids FILE --out FILE`` loads a safetensors directory written by
  llmchain-model (``config.json`` + ``model.safetensors``) and writes, for each sequence of the
  JSON list of id lists in FILE, the logits of every position, concatenated as raw f32. This is
  the Python half of the safetensors round-trip test.

Runs offline (HF_HUB_OFFLINE=1): nothing is downloaded; the tokenizer comes from the GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

# Prompts chosen to exercise different token kinds: plain prose, digits and symbols, code,
# non-Latin scripts and emoji (byte-level BPE fallbacks), and a chat-formatted prompt.
SINGLE_PROMPTS = [
    ("prose", "The quick brown fox jumps over the lazy dog because"),
    ("numbers", "Pump 42 reported 61.2 C, 63.8 C and 95.0 C; the vibration was 11.2 mm/s."),
    ("code", "fn main() {\n    let x: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", x);\n}"),
    ("unicode", "Café déjà vu — 東京は日本の首都です 🚀✨"),
    ("chat", None),  # rendered from CHAT below
]

BATCH_PROMPTS = [
    "Hello",
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
]

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW_TOKENS = 32


def load_gguf(path: str):
    path = os.path.realpath(path)
    directory, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()
    return tok, model


def write_f32(path: str, tensor: torch.Tensor) -> None:
    np.ascontiguousarray(tensor.detach().to(torch.float32).numpy()).astype("<f4").tofile(path)


def chat_ids(tok) -> list[int]:
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


@torch.no_grad()
def fixtures(gguf: str, out: str) -> None:
    torch.manual_seed(0)
    os.makedirs(out, exist_ok=True)
    tok, model = load_gguf(gguf)
    cases = []

    for name, text in SINGLE_PROMPTS:
        ids = chat_ids(tok) if text is None else tok(text, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([ids], dtype=torch.long)
        logits = model(input_ids=input_ids).logits[0]  # [T, V]
        file = f"{name}.f32"
        write_f32(os.path.join(out, file), logits)
        cases.append(
            {
                "name": name,
                "text": text,
                "input_ids": [ids],
                "attention_mask": [[1] * len(ids)],
                "position_ids": [list(range(len(ids)))],
                "positions": "all",
                "logits_file": file,
                "shape": list(logits.shape),
            }
        )

    # A padded batch of mixed lengths, left padded with the pad token. Positions count real
    # tokens only (what `generate` does), so every row must equal its unpadded forward pass.
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in BATCH_PROMPTS]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits[:, -1, :]
    write_f32(os.path.join(out, "batch.f32"), logits)
    cases.append(
        {
            "name": "batch",
            "text": None,
            "input_ids": input_ids.tolist(),
            "attention_mask": mask.tolist(),
            "position_ids": position_ids.tolist(),
            "positions": "last",
            "logits_file": "batch.f32",
            "shape": list(logits.shape),
        }
    )

    prompt = chat_ids(tok)
    generated = model.generate(
        torch.tensor([prompt], dtype=torch.long),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        pad_token_id=pad,
    )[0, len(prompt) :].tolist()
    generation = {
        "messages": CHAT,
        "prompt_ids": prompt,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": model.generation_config.eos_token_id,
        "output_ids": generated,
        "text": tok.decode(generated, skip_special_tokens=True),
    }

    manifest = {
        "source": os.path.basename(os.path.realpath(gguf)),
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "vocab_size": model.config.vocab_size,
        "cases": cases,
        "generation": generation,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    print(f"wrote {len(cases)} logit cases and the greedy generation to {out}", file=sys.stderr)


@torch.no_grad()
def model_dir_logits(model_dir: str, ids_file: str, out: str) -> None:
    with open(ids_file) as f:
        sequences = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    chunks = [model(input_ids=torch.tensor([s], dtype=torch.long)).logits[0] for s in sequences]
    write_f32(out, torch.cat(chunks, dim=0))
    print(f"wrote logits of {len(sequences)} sequences to {out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", help="GGUF file: write the fixtures to --out (a directory)")
    parser.add_argument("--model-dir", help="safetensors model directory: write its logits to --out (a file)")
    parser.add_argument("--ids", help="with --model-dir: JSON list of token id lists")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.gguf) == bool(args.model_dir):
        parser.error("give exactly one of --gguf and --model-dir")
    if args.gguf:
        fixtures(args.gguf, args.out)
    else:
        if not args.ids:
            parser.error("--model-dir needs --ids")
        model_dir_logits(args.model_dir, args.ids, args.out)


if __name__ == "__main__":
    main()
