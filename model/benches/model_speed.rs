//! Speed of our SmolLM2 runtime: prefill (one 512-token prompt; 8 prompts × 128 tokens), decode
//! (batch 1, 128 tokens after a 16-token prompt) and peak RSS after load + 512-token prefill.
//!
//! `cargo bench -p llmchain-model --bench model_speed [-- --threads 2 --repeats 3 --gguf PATH]`;
//! `--prefill-only` skips the decode figure (quicker when profiling prefill, e.g. under `perf`).
//! Prints a human summary on stderr and one JSON object on stdout (`scripts/bench/model.py`
//! runs this next to Hugging Face and llama.cpp and prints the ratios). Token ids are synthetic
//! and identical across runtimes, so every runtime does the same work; the best of `repeats`
//! timed runs is reported, after one untimed warm-up, because other load on the machine only
//! ever makes a run slower.

use std::path::PathBuf;
use std::time::Instant;

use llmchain_model::{Llama, Padding};
use tch::Device;

/// The prompt ids every runtime in the benchmark uses (same formula in scripts/bench/model.py).
fn synthetic_ids(n: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| (1000 + 37 * i + 101 * salt) as u32 % 49_000).collect()
}

/// Peak resident set size of this process so far, in MiB (Linux `VmHWM`).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Best wall time of `repeats` runs of `f`, after one warm-up run.
fn best_of(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn prefill(model: &Llama, prompts: &[Vec<u32>]) {
    let logits = model.next_token_logits(prompts).expect("prefill");
    // Materialise the result so lazy devices (CUDA) finish the work inside the timing.
    let _ = logits.sum(tch::Kind::Float).double_value(&[]);
}

fn decode(model: &Llama, prompt: &[u32], steps: usize) {
    let _guard = tch::no_grad_guard();
    let mut cache = model.new_cache(1, prompt.len() + steps).expect("cache");
    let _ = model.forward_cached(&mut cache, &[prompt], Padding::Left).expect("prompt");
    for _ in 0..steps {
        let logits = model.logits(cache.last_hidden().expect("hidden"));
        let next = logits.argmax(-1, false).int64_value(&[0]) as u32;
        let _ = model.forward_cached(&mut cache, &[&[next]], Padding::Left).expect("decode step");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut threads = 2i32;
    let mut repeats = 3usize;
    let mut prefill_only = false;
    let mut gguf = std::env::var_os("LLMCHAIN_SMOLLM2_GGUF").map(PathBuf::from);
    // `cargo bench` passes `--bench`; anything we do not know is ignored.
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--threads" => threads = args.next().and_then(|v| v.parse().ok()).expect("--threads N"),
            "--repeats" => repeats = args.next().and_then(|v| v.parse().ok()).expect("--repeats N"),
            "--gguf" => gguf = args.next().map(PathBuf::from),
            "--prefill-only" => prefill_only = true,
            _ => {}
        }
    }
    let gguf = gguf.expect("set LLMCHAIN_SMOLLM2_GGUF or pass --gguf (run `make setup`)");
    tch::set_num_threads(threads);
    let device = Device::cuda_if_available();

    let t = Instant::now();
    let model = Llama::load_gguf(&gguf, device).expect("load model");
    let load_s = t.elapsed().as_secs_f64();

    let long = vec![synthetic_ids(512, 0)];
    let prefill_512_s = best_of(repeats, || prefill(&model, &long));
    let rss_mib = peak_rss_mib();
    let batch: Vec<Vec<u32>> = (0..8).map(|s| synthetic_ids(128, s + 1)).collect();
    let prefill_8x128_s = best_of(repeats, || prefill(&model, &batch));
    let short = synthetic_ids(16, 9);
    let decode_only_s = if prefill_only {
        f64::NAN
    } else {
        let decode_s = best_of(repeats, || decode(&model, &short, 128));
        // The decode timing includes the 16-token prompt; remove its share measured alone.
        let prompt_s = best_of(repeats, || decode(&model, &short, 0));
        (decode_s - prompt_s).max(f64::MIN_POSITIVE)
    };

    let result = serde_json::json!({
        "runtime": "llmchain (tch)",
        "device": format!("{device:?}"),
        "threads": threads,
        "load_s": load_s,
        "prefill_512_tok_s": 512.0 / prefill_512_s,
        "prefill_8x128_tok_s": 1024.0 / prefill_8x128_s,
        "decode_tok_s": 128.0 / decode_only_s,
        "peak_rss_mib": rss_mib,
    });
    eprintln!(
        "llmchain: load {load_s:.2}s, prefill 512 {:.1} tok/s, prefill 8x128 {:.1} tok/s, decode {:.1} tok/s, peak RSS {rss_mib:.0} MiB",
        512.0 / prefill_512_s,
        1024.0 / prefill_8x128_s,
        128.0 / decode_only_s
    );
    println!("{result}");
}
