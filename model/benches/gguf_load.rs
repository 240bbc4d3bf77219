//! Load-path figures for the SmolLM2 GGUF: header parse, dequantisation of every tensor to f32,
//! and building the tokenizer. Run with `cargo bench -p llmchain-model --bench gguf_load`; it
//! prints the best and median of several runs (a benchmark, not a test: nothing is asserted).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use llmchain_model::gguf::Gguf;
use llmchain_model::tokenizer::Tokenizer;

const RUNS: usize = 5;

fn gguf_path() -> PathBuf {
    std::env::var_os("LLMCHAIN_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.llmchain/smollm2.gguf")))
}

/// Runs `f` `RUNS` times and returns (best, median) durations and the last result.
fn measure<T>(mut f: impl FnMut() -> T) -> (Duration, Duration, T) {
    let mut times = Vec::with_capacity(RUNS);
    let mut last = None;
    for _ in 0..RUNS {
        let start = Instant::now();
        last = Some(f());
        times.push(start.elapsed());
    }
    times.sort();
    (times[0], times[RUNS / 2], last.expect("RUNS > 0"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = gguf_path();
    let (best, median, gguf) = measure(|| Gguf::open(&path));
    let gguf = gguf?;
    println!("gguf open+parse:       best {:8.2} ms  median {:8.2} ms", ms(best), ms(median));

    let (best, median, params) = measure(|| -> Result<usize, llmchain_model::Error> {
        let mut params = 0;
        for t in gguf.tensors() {
            params += gguf.dequantize(&t.name)?.0.len();
        }
        Ok(params)
    });
    let params = params?;
    println!(
        "dequantise all:        best {:8.2} ms  median {:8.2} ms  ({params} params, {} tensors, {:.0} Mparam/s)",
        ms(best),
        ms(median),
        gguf.tensors().len(),
        params as f64 / best.as_secs_f64() / 1e6
    );

    let (best, median, tokenizer) = measure(|| Tokenizer::from_gguf(&gguf));
    let tokenizer = tokenizer?;
    println!("tokenizer from gguf:   best {:8.2} ms  median {:8.2} ms", ms(best), ms(median));

    let text =
        "pump-0042 temp 61.2 -> 64.1 C rising, vibration 2.1 -> 2.3 mm/s, note: slight rattling. ".repeat(64);
    let (best, median, ids) = measure(|| tokenizer.encode(&text));
    let n = ids?.len();
    println!(
        "encode {} bytes:      best {:8.2} ms  median {:8.2} ms  ({n} tokens, {:.0} tokens/s)",
        text.len(),
        ms(best),
        ms(median),
        n as f64 / best.as_secs_f64()
    );
    println!("threads: {}", std::thread::available_parallelism().map_or(1, |n| n.get()));
    Ok(())
}
