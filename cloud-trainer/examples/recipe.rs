//! Exploring the last-layers recipe on the real model without paying the trunk pass per run:
//! the frozen trunk's activations for the training and held-out records are computed once and
//! kept in `--cache-dir`, then each run trains only the top blocks and reports held-out accuracy
//! (first answer token, from the cache) after every epoch.
//!
//! cargo run -p llmchain-cloud-trainer --example recipe -- --train 1000 --epochs 4 --lr 1e-3
//!
//! Other knobs: `--pool N` / `--held N` (sizes of the cached sets), `--batch`, `--warmup`,
//! `--schedule cosine|constant`, `--wd`, `--clip` (global gradient-norm clip, 0 = off),
//! `--objective candidates|vocab`, `--mix`, `--layers N` (train the last N blocks, default 2),
//! `--notes-kept K` (keep one in K of the note-decided training records), `--note-first` (the
//! note line before the readings), `--twins` (each limit-decided training record followed by
//! its twin under the limits), `--limits-after` (the numeric limits restated after every
//! record), `--errors` (print every misread held-out record), `--cache-only`, `--dump FILE`
//! (both sets' token ids, labels, rule steps and texts as JSON, for
//! `scripts/reference/last_layers.py`).
//! Each variant keeps its own cache files; docs/training.md has the figures.

use std::{path::PathBuf, time::Instant};

use anyhow::Context;
use llmchain_cloud_trainer::{
    data::{self, Dataset},
    eval, pipeline,
    train::{self, ActivationCache, Mode, Objective, TrainConfig},
};
use llmchain_model::{Llama, SaveDtype, gguf::Gguf, tokenizer::Tokenizer};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cached(
    model: &Llama,
    set: &train::TokenSet,
    path: PathBuf,
    answers: bool,
    mode: Mode,
) -> anyhow::Result<ActivationCache> {
    if path.exists() {
        return Ok(ActivationCache::load(&path, model.device())?);
    }
    let t0 = Instant::now();
    // The stream entering the trained blocks.
    let trunk_end = mode.trunk_end(model.config().num_hidden_layers);
    let cache = ActivationCache::build(model, set, trunk_end, answers)?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "trunk pass: {} records in {secs:.0} s ({:.3} s/record)",
        set.examples.len(),
        secs / set.examples.len() as f64
    );
    cache.save(&path)?;
    Ok(cache)
}

/// `r` with the readings that make its limit step match moved under the limits (by 1–20%).
fn twin(r: &llmchain_task::Record, k: usize) -> Option<llmchain_task::Record> {
    use llmchain_task::rules::{
        INSPECT_PRESSURE_DROP_BAR, INSPECT_VIBRATION, SHUTDOWN_CURRENT_RATIO, SHUTDOWN_TEMP_C,
        SHUTDOWN_VIBRATION, Step, THROTTLE_CURRENT_RATIO, THROTTLE_PRESSURE_BAR, THROTTLE_TEMP_C, decide,
    };
    let under = [0.01, 0.03, 0.08, 0.2][k % 4];
    let cap = |s: &mut [Option<f64>], limit: f64| {
        for v in s.iter_mut().flatten() {
            if *v >= limit {
                *v = ((limit * (1.0 - under)) * 10.0).floor() / 10.0;
            }
        }
    };
    let mut t = r.clone();
    let rated = t.rated_current_a;
    match decide(r).1 {
        Step::ShutdownLimit => {
            cap(&mut t.temp_c, SHUTDOWN_TEMP_C);
            cap(&mut t.vibration_mm_s, SHUTDOWN_VIBRATION);
            cap(&mut t.current_a, SHUTDOWN_CURRENT_RATIO * rated);
        }
        Step::ThrottleLimit => {
            cap(&mut t.temp_c, THROTTLE_TEMP_C);
            cap(&mut t.current_a, THROTTLE_CURRENT_RATIO * rated);
            if let Some(p) = t.pressure_bar.as_mut() {
                cap(p, THROTTLE_PRESSURE_BAR);
            }
        }
        Step::Inspect => {
            cap(&mut t.vibration_mm_s, INSPECT_VIBRATION);
            if let Some(p) = t.pressure_bar.as_mut() {
                let first = p.iter().flatten().next().copied();
                if let (Some(first), Some(last)) = (first, p.iter_mut().flatten().last())
                    && first - *last >= INSPECT_PRESSURE_DROP_BAR
                {
                    *last = ((first - INSPECT_PRESSURE_DROP_BAR * (1.0 - under)) * 10.0).ceil() / 10.0;
                }
            }
        }
        _ => return None,
    }
    (t != *r).then_some(t)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let gguf: PathBuf = arg(&args, "--gguf", PathBuf::from(".llmchain/smollm2.gguf"));
    let dir: PathBuf = arg(&args, "--cache-dir", PathBuf::from("llmchain-data/recipe"));
    let pool: usize = arg(&args, "--pool", 2000);
    let held_n: usize = arg(&args, "--held", 500);
    let n: usize = arg(&args, "--train", 1000);
    let objective: Objective = arg(&args, "--objective", Objective::Candidates);
    let mix = data::parse_mix(&arg(
        &args,
        "--mix",
        "normal=0.25,inspect=0.25,throttle=0.25,shutdown=0.25".to_string(),
    ))?;
    std::fs::create_dir_all(&dir)?;
    // `--layers N`: train the last N blocks (the cache then holds the stream entering them).
    let mode = Mode::LastLayers(arg(&args, "--layers", 2));
    // Cache files of a variant carry its name: `train-1200-last-layers-6-twins.safetensors`.
    // `variant` changes what both sets' caches hold; `--notes-kept` and `--twins` only the
    // training records.
    let mut variant = match mode {
        Mode::LastLayers(2) => String::new(),
        _ => format!("-{mode}").replace(':', "-"),
    };
    let twins = args.iter().any(|a| a == "--twins");

    let file = Gguf::open(&gguf).context("gguf")?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let mut model = Llama::from_gguf(&file, tch::Device::Cpu)?;
    // Version 1 stores bf16: train from the same numbers.
    model.set_trainable(|_| true);
    train::round_trainable(&model, SaveDtype::Bf16);
    model.set_trainable(|_| false);

    // `--notes-kept K`: keep only one in K of the records a note decides (hazard, maintenance),
    // so that more of the pool is decided by numbers (fewer `shutdown` and `normal` records
    // than the mix asks for, as hazard and maintenance notes decide only those).
    let notes_kept: usize = arg(&args, "--notes-kept", 1).max(1);
    let mut seen_notes = 0usize;
    let records: Vec<_> = data::generate(1, pool * notes_kept, Some(mix), false)
        .into_iter()
        .filter(|(r, _)| {
            use llmchain_task::rules::{Step, decide};
            if !matches!(decide(r).1, Step::Hazard | Step::Maintenance) {
                return true;
            }
            seen_notes += 1;
            (seen_notes - 1).is_multiple_of(notes_kept)
        })
        .take(pool)
        .collect();
    // `--twins`: every record a limit decides is followed by its twin, the same record with
    // the deciding readings moved just under their limits (labels recomputed by the rules), so
    // that the numbers, and nothing else, tell a pair apart (an experiment on the data).
    let records: Vec<_> = if twins {
        records
            .iter()
            .enumerate()
            .flat_map(|(k, (r, l))| {
                let mut out = vec![(r.clone(), *l)];
                if let Some(t) = twin(r, k) {
                    let label = llmchain_task::rules::label(&t);
                    out.push((t, label));
                }
                out
            })
            .take(pool)
            .collect()
    } else {
        records
    };
    let train_all = Dataset::task(data::task_examples(&records));
    let held = Dataset::task(data::task_examples(&data::generate(2, held_n, None, false)));
    // `--note-first`: the note line right after the machine line, so the numbers end the text
    // at nearly fixed distances from the answer position (an experiment on the record layout).
    let note_first = args.iter().any(|a| a == "--note-first");
    // `--limits-after`: the numeric limits restated after every record (an experiment on what
    // the frozen trunk gathers at the answer position; 228 tokens per record instead of 142.5).
    let limits_after = args.iter().any(|a| a == "--limits-after");
    let limits = {
        use llmchain_task::rules::*;
        format!(
            "\nLimits: temperature max {SHUTDOWN_TEMP_C} C, vibration max {SHUTDOWN_VIBRATION} mm/s or current \
             {:.0}% of rated: shutdown; temperature change {THROTTLE_TEMP_RISE_C:+.1} C with max {THROTTLE_TEMP_C} C, \
             current {:.0}% of rated or pressure max {THROTTLE_PRESSURE_BAR:.1} bar: throttle; vibration max \
             {INSPECT_VIBRATION} mm/s or pressure change {:.1} bar: inspect.",
            100.0 * SHUTDOWN_CURRENT_RATIO,
            100.0 * THROTTLE_CURRENT_RATIO,
            -INSPECT_PRESSURE_DROP_BAR,
        )
    };
    if limits_after {
        variant.push_str("-limits-after");
    }
    let layout = |set: &Dataset| {
        let mut set = set.clone();
        if limits_after {
            for e in &mut set.examples {
                e.text.push_str(&limits);
            }
        }
        if note_first {
            for e in &mut set.examples {
                let mut lines: Vec<&str> = e.text.lines().collect();
                if let Some(i) = lines.iter().position(|l| l.starts_with("note: ")) {
                    let note = lines.remove(i);
                    lines.insert(1, note);
                }
                e.text = lines.join("\n");
            }
        }
        set
    };
    if note_first {
        variant.push_str("-note-first");
    }
    let (train_text, held_text) = (layout(&train_all), layout(&held));
    let (_, mut train_set) = pipeline::tokenize(&tokenizer, &train_text)?;
    let (_, held_set) = pipeline::tokenize(&tokenizer, &held_text)?;
    let tokens: usize = train_set.examples.iter().map(|e| e.ids.len()).sum();
    eprintln!(
        "prefix {} tokens, records {:.1} tokens on average",
        train_set.prefix.len(),
        tokens as f64 / pool as f64
    );
    // `--dump FILE`: the token ids, labels, rule steps and texts of both sets as JSON, so
    // that another implementation can train on the same cache files.
    if let Some(i) = args.iter().position(|a| a == "--dump") {
        // The rule step is the record's (read from its own text), the text what the model read.
        let set_json = |set: &train::TokenSet, records: &Dataset, text: &Dataset| {
            let steps = data::rule_steps(records).unwrap_or_default();
            serde_json::Value::Array(
                set.examples
                    .iter()
                    .zip(&text.examples)
                    .enumerate()
                    .map(|(k, (e, d))| {
                        serde_json::json!({"ids": e.ids, "label": e.label, "text": d.text,
                            "step": steps.get(k)})
                    })
                    .collect(),
            )
        };
        let out = serde_json::json!({
            "prefix": train_set.prefix, "candidates": train_set.candidates, "labels": held.labels,
            "train": set_json(&train_set, &train_all, &train_text), "held": set_json(&held_set, &held, &held_text),
        });
        std::fs::write(args.get(i + 1).context("--dump FILE")?, out.to_string())?;
    }
    let train_cache = cached(
        &model,
        &train_set,
        dir.join(format!(
            "train-{pool}{}{variant}{}.safetensors",
            if notes_kept == 1 { String::new() } else { format!("-notes-kept-{notes_kept}") },
            if twins { "-twins" } else { "" }
        )),
        true,
        mode,
    )?;
    let held_cache =
        cached(&model, &held_set, dir.join(format!("held-{held_n}{variant}.safetensors")), false, mode)?;
    if args.iter().any(|a| a == "--cache-only") {
        return Ok(());
    }
    // The first n of the pool are the records a run on n generated records sees.
    train_set.examples.truncate(n);
    let train_cache = train_cache.truncated(n);

    train::prepare(&mut model, mode, 0, None)?;
    let cfg = TrainConfig {
        lr: arg(&args, "--lr", 1e-3),
        epochs: arg(&args, "--epochs", 4),
        batch_size: arg(&args, "--batch", 8),
        warmup_steps: arg(&args, "--warmup", 20),
        schedule: arg(&args, "--schedule", train::Schedule::Cosine),
        weight_decay: arg(&args, "--wd", 0.01),
        clip_norm: arg(&args, "--clip", 1.0),
        objective,
        ..TrainConfig::for_mode(mode)
    };
    eprintln!("{cfg:?} on {n} records");
    let labels = held.labels.clone();
    let truth: Vec<usize> = held_set.examples.iter().map(|e| e.label).collect();
    let train_truth: Vec<usize> = train_set.examples.iter().map(|e| e.label).collect();
    let t0 = Instant::now();
    let mut last = None;
    let report = train::train_with(&model, &train_set, &cfg, Some(&train_cache), &mut |epoch, m| {
        let probs = train::cached_first_token_probabilities(m, &held_set, &held_cache, 32)?;
        let r = eval::metrics(&probs, &truth, &labels);
        let seen = train::cached_first_token_probabilities(m, &train_set, &train_cache, 32)?;
        let seen = eval::metrics(&seen, &train_truth, &labels);
        eprintln!(
            "epoch {epoch}: held-out {:.2}%, training records {:.2}% at {:.0} s",
            100.0 * r.accuracy,
            100.0 * seen.accuracy,
            t0.elapsed().as_secs_f64()
        );
        last = Some((r, probs));
        Ok(())
    })?;
    let norms = &report.grad_norms;
    let median = {
        let mut n = norms.clone();
        n.sort_by(f32::total_cmp);
        n.get(n.len() / 2).copied().unwrap_or(0.0)
    };
    eprintln!(
        "{} steps in {:.0} s; gradient norm median {median:.2}, {} of {} steps clipped at {}",
        report.steps_done,
        report.train_seconds,
        report.clipped_steps(cfg.clip_norm),
        norms.len(),
        cfg.clip_norm
    );
    let (mut r, probs) = last.expect("at least one epoch");
    // Right per rule step that decides the label, as the trainer's evaluations report it.
    if let Some(steps) = data::rule_steps(&held) {
        r.by_group = eval::accuracy_by_group(&probs, &truth, &steps);
    }
    eprint!("{}", r.table("held-out"));
    // How much of the error is the training mix's prior: the same probabilities reweighted by
    // (held-out generator's default mix / training mix), per label.
    let natural = llmchain_task::generate::GenConfig::base(2).mix;
    let (ts, ns) = (mix.iter().sum::<f64>(), natural.iter().sum::<f64>());
    let reweighted: Vec<Vec<f64>> = probs
        .iter()
        .map(|p| {
            p.iter().enumerate().map(|(l, &x)| x * (natural[l] / ns) / (mix[l] / ts).max(1e-9)).collect()
        })
        .collect();
    let rw = eval::metrics(&reweighted, &truth, &labels);
    eprintln!("with the held-out prior instead of the training mix: {:.2}%", 100.0 * rw.accuracy);
    if args.iter().any(|a| a == "--errors") {
        for ((e, p), ex) in held_set.examples.iter().zip(&probs).zip(&held.examples) {
            let said = (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(0);
            if said != e.label {
                eprintln!("--- true {} said {} ({:.2})\n{}", labels[e.label], labels[said], p[said], ex.text);
            }
        }
    }
    Ok(())
}
