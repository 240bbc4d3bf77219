//! SmolLM2 / Llama transformer in libtorch: GGUF import, tokenizer, KV cache, scoring, generation.
