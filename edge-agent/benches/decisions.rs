//! Decision speed of the agent's engine on the real SmolLM2, and the bandwidth its summaries
//! save (issue 5).
//!
//! `cargo bench -p llmchain-edge-agent --bench decisions [-- --threads 2 --records 64
//! --repeats 2 --export PATH --profile]`.
//!
//! - Decisions: simulated records (fixed seed) are preprocessed and scored by
//!   [`LoadedModel::score`], the agent's path (instructions cached once, one padded forward
//!   step per batch over the records and all their candidates), in consecutive batches of 1,
//!   8 and 32. A record's latency is the time from its batch's start to the batch's end (what an
//!   agent sees for records that arrive together); decisions/s is records over total time.
//!   After one warm-up batch, the same `records` are scored `repeats` times per batch size and
//!   the fastest pass is reported (other load only ever slows a pass down).
//! - Bandwidth: 10,000 simulated records go through the agent's summary [`Window`] (windows of
//!   `--window-records`, `--hard-examples` hard examples) and the raw JSON bytes are compared
//!   with the encoded `pb::Summary` bytes. The decisions there come from the label rules, not
//!   the model (bytes do not depend on which model decided, and 10,000 model decisions would
//!   take minutes); confidences are spread deterministically so the histogram and the choice
//!   of hard examples vary as they would.
//! - `--export PATH` writes the exact token ids (prefix, per record, candidates) and our
//!   decisions, so `scripts/bench/agent.py` scores identical tokens with llama.cpp.
//! - `--profile` times the parts of a batch with the model API directly (prefill with and
//!   without the cached prefix, candidates, padding) and prints them on stderr.
//!
//! Prints a human summary on stderr and one JSON object on stdout.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use llmchain_edge_agent::{
    engine::LoadedModel,
    pipeline::{Scored, Window, WindowConfig},
};
use llmchain_model::{Llama, Padding, Prefix, prompt::ClassifierPrompt, tokenizer::Tokenizer};
use llmchain_proto::model::{ModelName, ModelRef};
use llmchain_task::{
    Label, Record,
    generate::{GenConfig, Generator},
    preprocess::{INSTRUCTIONS, record_text},
};
use prost::Message;
use tch::Device;

/// Seed of the simulated records (same records in every run).
const SEED: u64 = 5;
/// Batch sizes measured.
const BATCHES: [usize; 3] = [1, 8, 32];
/// Records through the summary windows for the bandwidth figure.
const BANDWIDTH_RECORDS: usize = 10_000;

struct Args {
    threads: i32,
    small_step_threads: Option<usize>,
    records: usize,
    repeats: usize,
    window_records: u64,
    hard_examples: usize,
    gguf: PathBuf,
    export: Option<PathBuf>,
    profile: bool,
}

fn parse_args() -> Args {
    let mut args = std::env::args().skip(1);
    let mut out = Args {
        threads: 2,
        small_step_threads: None,
        records: 64,
        repeats: 2,
        window_records: 1000,
        // The agent's default (`WindowConfig::default`).
        hard_examples: WindowConfig::default().hard_examples,
        gguf: std::env::var_os("LLMCHAIN_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_default(),
        export: None,
        profile: false,
    };
    let num = |v: Option<String>, flag: &str| -> usize {
        v.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{flag} N"))
    };
    // `cargo bench` passes `--bench`; anything we do not know is ignored.
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--threads" => out.threads = num(args.next(), "--threads") as i32,
            "--small-step-threads" => out.small_step_threads = Some(num(args.next(), "--small-step-threads")),
            "--records" => out.records = num(args.next(), "--records").max(32),
            "--repeats" => out.repeats = num(args.next(), "--repeats").max(1),
            "--window-records" => out.window_records = num(args.next(), "--window-records").max(1) as u64,
            "--hard-examples" => out.hard_examples = num(args.next(), "--hard-examples"),
            "--gguf" => out.gguf = args.next().map(PathBuf::from).expect("--gguf PATH"),
            "--export" => out.export = args.next().map(PathBuf::from),
            "--profile" => out.profile = true,
            _ => {}
        }
    }
    assert!(!out.gguf.as_os_str().is_empty(), "set LLMCHAIN_SMOLLM2_GGUF or pass --gguf (run `make setup`)");
    out
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One timed pass over the records in consecutive batches of `batch`.
struct Pass {
    decisions_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    scored: Vec<Scored>,
}

fn pass(model: &LoadedModel, texts: &[String], batch: usize) -> Pass {
    let mut latencies_ms = Vec::with_capacity(texts.len());
    let mut scored = Vec::with_capacity(texts.len());
    let start = Instant::now();
    for chunk in texts.chunks(batch) {
        let t = Instant::now();
        scored.extend(model.score(chunk).expect("score a batch"));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        latencies_ms.extend(std::iter::repeat_n(ms, chunk.len()));
    }
    let total = start.elapsed().as_secs_f64();
    latencies_ms.sort_by(f64::total_cmp);
    Pass {
        decisions_per_s: texts.len() as f64 / total,
        p50_ms: percentile(&latencies_ms, 50.0),
        p99_ms: percentile(&latencies_ms, 99.0),
        scored,
    }
}

/// A deterministic confidence in [0.25, 1) for record `i` (the rules decider has none).
fn pseudo_confidence(i: usize) -> f64 {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    0.25 + 0.75 * (x % 10_000) as f64 / 10_000.0
}

/// The rules' label as a [`Scored`] with a spread confidence.
fn rules_scored(record: &Record, i: usize) -> Scored {
    let label = llmchain_task::label(record);
    let confidence = pseudo_confidence(i);
    let other = (1.0 - confidence) / (Label::ALL.len() - 1) as f64;
    let scores = Label::ALL
        .iter()
        .map(|&l| {
            let p = if l == label { confidence } else { other };
            (l, p.ln(), p)
        })
        .collect();
    Scored { label, confidence, scores }
}

/// Raw record bytes and encoded summary bytes for `BANDWIDTH_RECORDS` records through the
/// agent's summary windows.
fn bandwidth(
    model: &ModelRef,
    window_records: u64,
    hard_examples: usize,
    latency: Duration,
) -> serde_json::Value {
    let config =
        WindowConfig { window: Duration::from_secs(3600), max_records: Some(window_records), hard_examples };
    let mut window = Window::new("edge-bench-0001".to_string(), config);
    let mut generator = Generator::new(GenConfig::base(SEED + 1));
    let (mut raw, mut summary_bytes, mut summaries) = (0u64, 0u64, 0u64);
    let mut close = |window: &mut Window, raw: &mut u64| {
        if let Some(s) = window.close(None).summary {
            *raw += s.raw_bytes;
            summary_bytes += s.encoded_len() as u64;
            summaries += 1;
        }
    };
    for i in 0..BANDWIDTH_RECORDS {
        let (record, _) = generator.next_labelled();
        let line = record.to_json();
        window.set_model(model.clone());
        window.add_decision(line.len() + 1, latency, &record_text(&record), &rules_scored(&record, i));
        if window.is_full() {
            close(&mut window, &mut raw);
        }
    }
    close(&mut window, &mut raw);
    serde_json::json!({
        "records": BANDWIDTH_RECORDS,
        "window_records": window_records,
        "hard_examples": hard_examples,
        "summaries": summaries,
        "raw_bytes": raw,
        "summary_bytes": summary_bytes,
        "ratio": raw as f64 / summary_bytes.max(1) as f64,
    })
}

/// Best wall time of `repeats` runs of `f`, in ms, after one warm-up run.
fn best_ms(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// Times the parts of one batch with the model API directly and prints them on stderr.
fn profile(model: &Llama, prompt: &ClassifierPrompt, prefix: &Prefix, records: &[Vec<u32>], repeats: usize) {
    let candidates = prompt.candidates();
    let first_only: Vec<Vec<u32>> = candidates.iter().map(|c| vec![c[0]]).collect();
    eprintln!(
        "profile: prefix {} tokens; candidates {:?} tokens",
        prompt.prefix_ids().len(),
        candidates.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let lens: Vec<usize> = records.iter().map(Vec::len).collect();
    eprintln!(
        "profile: record part tokens min {} mean {:.1} max {}",
        lens.iter().min().unwrap_or(&0),
        lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64,
        lens.iter().max().unwrap_or(&0)
    );
    for b in BATCHES {
        let rows: Vec<Vec<u32>> = records.iter().take(b).cloned().collect();
        let real: usize = rows.iter().map(Vec::len).sum();
        let padded = rows.iter().map(Vec::len).max().unwrap_or(0) * rows.len();
        let full: Vec<Vec<u32>> =
            rows.iter().map(|r| prompt.prefix_ids().iter().chain(r).copied().collect()).collect();
        let score = best_ms(repeats, || drop(model.score(Some(prefix), &rows, candidates).expect("score")));
        let prefill =
            best_ms(repeats, || drop(model.score(Some(prefix), &rows, &first_only).expect("score")));
        let no_prefix = best_ms(repeats, || drop(model.score(None, &full, &first_only).expect("score")));
        eprintln!(
            "profile b={b:>2}: score {score:7.1} ms = prefill(+first logits) {prefill:7.1} ms + candidates {:6.1} ms \
             ({:.1} ms/record); without cached prefix the prefill takes {no_prefix:7.1} ms; \
             padding: {real} real of {padded} computed tokens ({:.0}% waste)",
            score - prefill,
            score / b as f64,
            100.0 * (padded - real) as f64 / padded.max(1) as f64,
        );
    }
}

/// Times the stages of [`Llama::score`] that can be run on their own: copying the prefix's
/// cache to every row (part of every score call), then the whole call, whose rest is one
/// forward step over the records and all their candidates (no per-candidate cache copy).
fn stages(
    model: &Llama,
    prompt: &ClassifierPrompt,
    prefix: &Prefix,
    records: &[Vec<u32>],
    b: usize,
    repeats: usize,
) {
    let _guard = tch::no_grad_guard();
    let rows: Vec<Vec<u32>> = records.iter().take(b).cloned().collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(0)
        + prompt.candidates().iter().map(|k| k.len() - 1).sum::<usize>();
    let mut single = model.new_cache(1, prompt.prefix_ids().len()).expect("cache");
    let _ = model.forward_cached(&mut single, &[prompt.prefix_ids()], Padding::Left).expect("prefix");
    let copy_prefix = best_ms(repeats, || drop(single.select_rows(&vec![0; b], width).expect("select")));
    let score =
        best_ms(repeats, || drop(model.score(Some(prefix), &rows, prompt.candidates()).expect("score")));
    eprintln!(
        "stages b={b:>2}: copy prefix cache to {b} rows {copy_prefix:7.1} ms; one step over records and \
         candidates ({width} slots a row) {:8.1} ms",
        score - copy_prefix
    );
}

fn main() {
    let args = parse_args();
    tch::set_num_threads(args.threads);
    let device = Device::cuda_if_available();

    let t = Instant::now();
    let (mut llama, tokenizer) = llmchain_model::load_pretrained(&args.gguf, device).expect("load the model");
    let tokenizer: Tokenizer = tokenizer.expect("the GGUF carries its tokenizer");
    let load_s = t.elapsed().as_secs_f64();
    if let Some(n) = args.small_step_threads {
        llama.set_small_step_threads(n);
    }
    let labels: Vec<&str> = Label::ALL.iter().map(|l| l.as_str()).collect();
    // The engine builds the same prompt from the same inputs; built here too to export its ids.
    let prompt = ClassifierPrompt::new(&tokenizer, INSTRUCTIONS, &labels).expect("the prompt");

    let mut generator = Generator::new(GenConfig::base(SEED));
    let (texts, truth): (Vec<String>, Vec<Label>) = (0..args.records)
        .map(|_| {
            let (record, label) = generator.next_labelled();
            (record_text(&record), label)
        })
        .unzip();
    let record_ids: Vec<Vec<u32>> =
        texts.iter().map(|t| prompt.record_ids(&tokenizer, t).expect("tokenize")).collect();

    if args.profile {
        let prefix = llama.prefix(prompt.prefix_ids()).expect("prefix");
        profile(&llama, &prompt, &prefix, &record_ids, args.repeats);
        for b in BATCHES {
            stages(&llama, &prompt, &prefix, &record_ids, b, args.repeats);
        }
    }

    let id =
        ModelRef { model: ModelName::parse("model", "smollm2-135m-instruct").expect("a name"), version: 1 };
    let t = Instant::now();
    let model = LoadedModel::from_parts(id.clone(), llama, tokenizer).expect("the loaded model");
    let prefix_ms = t.elapsed().as_secs_f64() * 1e3;

    let mut per_batch = serde_json::Map::new();
    let mut decided: Vec<Scored> = Vec::new();
    let mut p50_b32 = Duration::from_millis(100);
    for b in BATCHES {
        // Warm-up: one batch of this shape (allocator, thread pool, kernel choice).
        let _ = model.score(&texts[..b]).expect("warm-up");
        let best = (0..args.repeats)
            .map(|_| pass(&model, &texts, b))
            .max_by(|a, c| a.decisions_per_s.total_cmp(&c.decisions_per_s))
            .expect("at least one pass");
        let agree_truth = best.scored.iter().zip(&truth).filter(|(s, t)| s.label == **t).count();
        eprintln!(
            "ours b={b:>2}: {:7.2} decisions/s, p50 {:7.1} ms, p99 {:7.1} ms ({} records, best of {}; accuracy vs rules {:.1}%)",
            best.decisions_per_s,
            best.p50_ms,
            best.p99_ms,
            texts.len(),
            args.repeats,
            100.0 * agree_truth as f64 / texts.len() as f64
        );
        let same_as_b1 = if decided.is_empty() {
            1.0
        } else {
            decided.iter().zip(&best.scored).filter(|(a, c)| a.label == c.label).count() as f64
                / texts.len() as f64
        };
        per_batch.insert(
            b.to_string(),
            serde_json::json!({
                "decisions_per_s": best.decisions_per_s,
                "p50_ms": best.p50_ms,
                "p99_ms": best.p99_ms,
                "accuracy_vs_rules": agree_truth as f64 / texts.len() as f64,
                "same_label_as_batch_1": same_as_b1,
            }),
        );
        if b == 32 {
            p50_b32 = Duration::from_secs_f64(best.p50_ms / 1e3);
        }
        if decided.is_empty() {
            decided = best.scored;
        }
    }

    let bandwidth_main = bandwidth(&id, args.window_records, args.hard_examples, p50_b32);
    let sweep: Vec<serde_json::Value> = [(1000, 0), (1000, 4), (1000, 8), (10_000, 8), (100, 8)]
        .into_iter()
        .map(|(w, h)| bandwidth(&id, w, h, p50_b32))
        .collect();
    eprintln!(
        "bandwidth: {} records, windows of {} records with {} hard examples: raw {} B / summaries {} B = {:.1}x",
        BANDWIDTH_RECORDS,
        args.window_records,
        args.hard_examples,
        bandwidth_main["raw_bytes"],
        bandwidth_main["summary_bytes"],
        bandwidth_main["ratio"].as_f64().unwrap_or(f64::NAN)
    );

    if let Some(path) = &args.export {
        let export = serde_json::json!({
            "prefix_ids": prompt.prefix_ids(),
            "candidate_ids": prompt.candidates(),
            "labels": labels,
            "records": record_ids,
            "truth": truth.iter().map(|l| l.as_str()).collect::<Vec<_>>(),
            "ours_batch_1": decided.iter().map(|s| s.label.as_str()).collect::<Vec<_>>(),
            "ours_batch_1_logprobs": decided.iter().map(|s| s.scores.iter().map(|x| x.1).collect::<Vec<_>>()).collect::<Vec<_>>(),
        });
        std::fs::write(path, export.to_string()).expect("write the export");
    }

    let result = serde_json::json!({
        "runtime": "llmchain (tch)",
        "device": format!("{device:?}"),
        "threads": args.threads,
        "small_step_threads": args.small_step_threads,
        "load_s": load_s,
        "prefix_ms": prefix_ms,
        "prefix_tokens": prompt.prefix_ids().len(),
        "records": texts.len(),
        "repeats": args.repeats,
        "seed": SEED,
        "batches": per_batch,
        "bandwidth": bandwidth_main,
        "bandwidth_sweep": sweep,
        "bandwidth_decider": "label rules (llmchain_task::rules) with deterministic confidences; bytes do not depend on the decider",
    });
    println!("{result}");
}
