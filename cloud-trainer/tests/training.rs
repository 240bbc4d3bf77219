//! Fine-tuning on tiny random models: every mode learns, frozen tensors stay bit-identical,
//! a LoRA version loads through the agent's path with the adapter model's logits, and a run
//! resumed from a checkpoint ends exactly where an uninterrupted run ends.

use std::collections::HashMap;

use llmchain_artifact::{BlobDir, ModelRef, TrainingMetadata};
use llmchain_cloud_trainer::{
    eval, pipeline,
    train::{self, CheckpointConfig, Mode, Objective, TokenExample, TokenSet, TrainConfig},
    version,
};
use llmchain_model::{Llama, LlamaConfig, SaveDtype, tokenizer::Tokenizer, version::load_version};
use llmchain_proto::model::ModelName;
use tch::{Device, Kind, Tensor};

fn config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        max_position_embeddings: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: Some(0),
        pad_token_id: None,
    }
}

fn tiny(seed: i64) -> Llama {
    // Tensors this small gain nothing from threads; tests run side by side.
    tch::set_num_threads(1);
    tch::manual_seed(seed);
    Llama::from_fetch(config(), Device::Cpu, |name, shape| {
        let t = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.3;
        Ok(if name.ends_with("norm.weight") { t + 1.0 } else { t })
    })
    .unwrap()
}

/// A learnable toy task: the label is the first token's residue mod 3; answers are a label
/// token followed by an end token (0), as the real prompt's `label<|im_end|>`.
fn data(n: usize, seed: u64) -> TokenSet {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = |m: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % m
    };
    let examples = (0..n)
        .map(|_| {
            let key = 20 + next(30) as u32;
            let len = 3 + next(5) as usize;
            let mut ids = vec![key];
            ids.extend((0..len).map(|_| 20 + next(40) as u32));
            TokenExample { ids, label: (key % 3) as usize }
        })
        .collect();
    TokenSet {
        prefix: vec![1, 2, 3, 4, 5],
        candidates: vec![vec![10, 0], vec![11, 0], vec![12, 0]],
        examples,
    }
}

fn cfg(mode: Mode, lr: f64, epochs: usize) -> TrainConfig {
    TrainConfig { lr, epochs, batch_size: 8, warmup_steps: 2, ..TrainConfig::for_mode(mode) }
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len() as f32
}

fn snapshot(model: &Llama) -> HashMap<String, Tensor> {
    model.named_tensors().into_iter().map(|(n, t)| (n, t.detach().copy())).collect()
}

#[test]
fn every_mode_lowers_the_loss() {
    let set = data(32, 1);
    for (mode, lr) in [(Mode::LastLayers(1), 1e-2), (Mode::Lora(4), 2e-2), (Mode::Full, 5e-3)] {
        let mut model = tiny(1);
        train::prepare(&mut model, mode, 7, None).unwrap();
        let report = train::train(&model, &set, &cfg(mode, lr, 8)).unwrap();
        assert_eq!(report.steps_done, report.total_steps);
        let (first, last) = (mean(&report.losses[..6]), mean(&report.losses[report.losses.len() - 6..]));
        assert!(last < 0.6 * first, "{mode}: loss {first} -> {last}");
    }
}

#[test]
fn last_layers_training_leaves_frozen_tensors_bit_identical() {
    let set = data(24, 2);
    let mut model = tiny(2);
    let before = snapshot(&model);
    assert_eq!(train::prepare(&mut model, Mode::LastLayers(1), 0, None).unwrap(), 9 + 1);
    train::train(&model, &set, &cfg(Mode::LastLayers(1), 1e-2, 2)).unwrap();
    for (name, t) in model.named_tensors() {
        let trained = name.starts_with("model.layers.1.") || name == "model.norm.weight";
        let same = t.detach().equal(&before[&name]);
        assert_eq!(same, !trained, "{name}: trained {trained}, unchanged {same}");
    }
}

#[test]
fn the_activation_cache_trains_the_same_model() {
    let set = data(24, 3);
    let run = |cache: bool| {
        let mut model = tiny(3);
        train::prepare(&mut model, Mode::LastLayers(1), 0, None).unwrap();
        let report = train::train(
            &model,
            &set,
            &TrainConfig { activation_cache: cache, ..cfg(Mode::LastLayers(1), 1e-2, 2) },
        )
        .unwrap();
        (snapshot(&model), report.losses)
    };
    let (with, losses_with) = run(true);
    let (without, losses_without) = run(false);
    for (name, t) in &with {
        let diff = (t - &without[name]).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{name} differs by {diff}");
    }
    for (a, b) in losses_with.iter().zip(&losses_without) {
        assert!((a - b).abs() < 1e-5);
    }
}

/// A minimal word-level tokenizer in HF's tokenizer.json form.
fn tokenizer() -> Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..64)
        .map(|i| (if i == 0 { "<|im_end|>".to_string() } else { format!("w{i}") }, i.into()))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<|im_end|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w1"}
    });
    Tokenizer::from_json(&json.to_string()).unwrap()
}

fn meta() -> TrainingMetadata {
    TrainingMetadata {
        mode: "test".into(),
        dataset_digest: None,
        metrics: vec![],
        records: 0,
        note: String::new(),
    }
}

#[test]
fn a_lora_version_ships_only_adapters_and_loads_with_the_adapter_models_logits() {
    let tok = tokenizer();
    let name = ModelName::parse("model", "tiny").unwrap();
    let mut model = tiny(4);
    let parent =
        version::build(&model, &tok, ModelRef { model: name.clone(), version: 1 }, 0, SaveDtype::F32, meta())
            .unwrap();
    train::prepare(&mut model, Mode::Lora(4), 4, Some(8.0)).unwrap();
    train::train(&model, &data(32, 4), &cfg(Mode::Lora(4), 2e-2, 3)).unwrap();
    let build = version::build(&model, &tok, ModelRef { model: name, version: 2 }, 1, SaveDtype::F32, meta())
        .unwrap();
    assert_eq!(build.manifest.architecture.lora_rank, 4);
    assert_eq!(build.manifest.architecture.lora_alpha, 8.0);
    build.manifest.architecture.check_tensors(&build.manifest.tensors).unwrap();
    // The delta is exactly the adapters: every base tensor keeps its digest.
    let adapters: u64 =
        build.manifest.tensors.iter().filter(|t| t.name.contains(".lora_")).map(|t| t.size).sum();
    assert_eq!(llmchain_artifact::delta_bytes_from(&build.manifest, &parent.manifest), adapters);
    assert_eq!(pipeline::delta_bytes(&build, Some(&parent.manifest)), adapters);

    let dir = tempfile::tempdir().unwrap();
    pipeline::save_local(dir.path(), &build).unwrap();
    let blobs = BlobDir(dir.path().join("blobs"));
    let (merged, _) = load_version(&build.manifest, &blobs, Device::Cpu).unwrap();
    assert!(merged.lora().is_none());
    let ids = Tensor::from_slice(&[1i64, 2, 3, 30, 41, 22, 10]).view([1, -1]);
    let want = tch::no_grad(|| model.forward(&ids, None).unwrap());
    let got = tch::no_grad(|| merged.forward(&ids, None).unwrap());
    let diff = (&want - &got).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "merged logits differ by {diff}");
    // The trainer's own load keeps the adapters unmerged, for the next LoRA round.
    let (manifest, blobs) = llmchain_cloud_trainer::remote::local_version(dir.path()).unwrap();
    let (unmerged, _) = pipeline::load_for_training(&manifest, &blobs, Device::Cpu).unwrap();
    assert_eq!(unmerged.lora(), model.lora());
    let again = tch::no_grad(|| unmerged.forward(&ids, None).unwrap());
    assert!((&want - &again).abs().max().double_value(&[]) < 1e-5);
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let set = data(40, 5);
    for mode in [Mode::LastLayers(1), Mode::Lora(2)] {
        let config = cfg(mode, 1e-2, 2); // 5 steps per epoch, 10 in all
        let mut straight = tiny(5);
        train::prepare(&mut straight, mode, 9, None).unwrap();
        let whole = train::train(&straight, &set, &config).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let checkpointed = TrainConfig {
            checkpoint: Some(CheckpointConfig { dir: dir.path().to_path_buf(), every: 3 }),
            ..config
        };
        // Interrupted after step 7 (last checkpoint at 6), then a new process starts over.
        let mut first = tiny(5);
        train::prepare(&mut first, mode, 9, None).unwrap();
        let part =
            train::train(&first, &set, &TrainConfig { stop_after: Some(7), ..checkpointed.clone() }).unwrap();
        assert_eq!(part.steps_done, 7);
        drop(first);
        let mut second = tiny(5);
        train::prepare(&mut second, mode, 9, None).unwrap();
        let rest = train::train(&second, &set, &checkpointed).unwrap();
        assert_eq!(rest.resumed_from, 6, "{mode}");
        assert_eq!(rest.steps_done, 10);
        assert_eq!(rest.losses.len(), whole.losses.len());
        for (a, b) in rest.losses.iter().zip(&whole.losses) {
            assert!((a - b).abs() < 1e-6, "{mode}: losses {a} vs {b}");
        }
        let want = snapshot(&straight);
        for (name, t) in snapshot(&second) {
            let diff = (&t - &want[&name]).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{mode}: {name} differs by {diff}");
        }
        // A checkpoint of another run is refused, not mixed in.
        let mut other = tiny(5);
        train::prepare(&mut other, mode, 9, None).unwrap();
        assert!(train::train(&other, &set, &TrainConfig { epochs: 3, ..checkpointed }).is_err());
    }
}

#[test]
fn the_training_loss_is_the_decision_the_agent_scores() {
    // Same prompt layout in training and in the agent's scoring: positions, shared prefix and
    // the end token. Step 0's loss (before any update) of a whole-set batch, with and without
    // the cache: for `Vocab`, the mean of −log P(answer) that `Llama::score` gives the true
    // label; for `Candidates`, the softmax over the labels' first tokens, so that plus
    // log Σ_c P(first token of c).
    let set = data(10, 9);
    let model = tiny(9);
    let prefix = model.prefix(&set.prefix).unwrap();
    let prompts: Vec<Vec<u32>> = set.examples.iter().map(|e| e.ids.clone()).collect();
    let scores = model.score(Some(&prefix), &prompts, &set.candidates).unwrap();
    let heads: Vec<Vec<u32>> = set.candidates.iter().map(|c| vec![c[0]]).collect();
    let firsts = model.score(Some(&prefix), &prompts, &heads).unwrap();
    let nll = -set.examples.iter().zip(&scores).map(|(e, s)| f64::from(s[e.label])).sum::<f64>() / 10.0;
    let norm =
        firsts.iter().map(|f| f.iter().map(|&v| f64::from(v).exp()).sum::<f64>().ln()).sum::<f64>() / 10.0;
    for (objective, expected) in [(Objective::Vocab, nll), (Objective::Candidates, nll + norm)] {
        for cache in [true, false] {
            let mut model = tiny(9);
            train::prepare(&mut model, Mode::LastLayers(1), 0, None).unwrap();
            let cfg = TrainConfig {
                batch_size: 10,
                activation_cache: cache,
                stop_after: Some(1),
                objective,
                ..cfg(Mode::LastLayers(1), 1e-3, 1)
            };
            let report = train::train(&model, &set, &cfg).unwrap();
            let loss = f64::from(report.losses[0]);
            assert!(
                (loss - expected).abs() < 1e-4 * expected.abs().max(1.0),
                "{objective:?}, cache {cache}: {loss} vs {expected}"
            );
            assert_eq!(report.first_token_losses.len(), 1);
            assert!(f64::from(report.first_token_losses[0]) <= nll);
        }
    }
}

#[test]
fn the_last_block_at_chosen_positions_equals_the_whole_span() {
    let model = tiny(10);
    let h = config().hidden_size as i64;
    let x = tch::no_grad(|| Tensor::randn([3, 7, h], (Kind::Float, Device::Cpu)));
    let prefix = tch::no_grad(|| Tensor::randn([1, 4, h], (Kind::Float, Device::Cpu)));
    let at = Tensor::from_slice(&[0i64, 6, 6, 2, 3, 4, 5, 1, 1]).view([3, 3]);
    for p in [Some(&prefix), None] {
        for layers in [0..2, 1..2] {
            let (_, whole) = model.run_span(p, &x, layers.clone()).unwrap();
            let want = whole.gather(1, &at.view([3, 3, 1]).expand([3, 3, h], false), false);
            let got = model.run_span_at(p, &x, layers.clone(), &at).unwrap();
            let diff = (&want - &got).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "prefix {}, blocks {layers:?}: {diff}", p.is_some());
        }
    }
    assert!(model.run_span_at(None, &x, 0..2, &Tensor::from_slice(&[7i64, 0, 0]).view([3, 1])).is_err());
    // Blocks beyond the model's are an error, not a panic.
    assert!(model.run_span_at(None, &x, 1..3, &at).is_err());
}

#[test]
fn cached_first_token_probabilities_match_a_full_forward() {
    // The held-out path of a last-layers run: trunk once, top blocks on the cache, softmax over
    // the labels' first tokens, as `Llama::score` with one-token candidates gives it.
    let set = data(9, 11);
    let mut model = tiny(11);
    train::prepare(&mut model, Mode::LastLayers(1), 0, None).unwrap();
    let cache = train::ActivationCache::build(&model, &set, 1, false).unwrap();
    let got = train::cached_first_token_probabilities(&model, &set, &cache, 4).unwrap();
    let prefix = model.prefix(&set.prefix).unwrap();
    let prompts: Vec<Vec<u32>> = set.examples.iter().map(|e| e.ids.clone()).collect();
    let heads: Vec<Vec<u32>> = set.candidates.iter().map(|c| vec![c[0]]).collect();
    let scores = model.score(Some(&prefix), &prompts, &heads).unwrap();
    for (g, s) in got.iter().zip(&scores) {
        for (a, b) in g.iter().zip(llmchain_model::prompt::softmax(s)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
    // A training cache (answers after the prompts) reads the same positions.
    let with_answers = train::ActivationCache::build(&model, &set, 1, true).unwrap();
    let again = train::cached_first_token_probabilities(&model, &set, &with_answers, 4).unwrap();
    for (a, b) in again.iter().flatten().zip(got.iter().flatten()) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn evaluation_scores_like_the_agent() {
    let set = data(12, 6);
    let model = tiny(6);
    let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let report = eval::evaluate(&model, &set, &labels).unwrap();
    assert_eq!(report.examples, 12);
    assert_eq!(report.confusion.iter().flatten().sum::<u64>(), 12);
    assert!((0.0..=1.0).contains(&report.accuracy) && (0.0..=1.0).contains(&report.ece));
    // Probabilities are a softmax over the agent's summed candidate log-probabilities.
    let probs = eval::probabilities(&model, &set, 5).unwrap();
    let prefix = model.prefix(&set.prefix).unwrap();
    let scores = model.score(Some(&prefix), &[set.examples[0].ids.clone()], &set.candidates).unwrap();
    let direct = llmchain_model::prompt::softmax(&scores[0]);
    for (a, b) in probs[0].iter().zip(direct) {
        assert!((a - b).abs() < 1e-6);
    }
}

#[test]
fn evaluating_after_last_layers_training_from_the_kept_trunk_equals_a_full_evaluation() {
    // `train` and `incremental`: the evaluation before keeps the frozen trunk's output, the one
    // after last-layers training runs only the trained blocks on it. Both must be the full
    // evaluation of the trained model, in the order of the data (batches go by length).
    let set = data(13, 4);
    let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let mut model = tiny(4);
    let frozen = pipeline::frozen_trunk(&model, Mode::LastLayers(1));
    assert_eq!(frozen, Some(1));
    assert_eq!(pipeline::frozen_trunk(&model, Mode::Lora(2)), None);
    assert_eq!(pipeline::frozen_trunk(&model, Mode::LastLayers(2)), None, "nothing below but embeddings");
    let one = ["x".to_string()];
    assert!(
        eval::evaluate_with(&model, &set, &labels, Some(&one[..]), eval::Trunk::Run).is_err(),
        "one group for {} examples",
        set.examples.len()
    );
    let (before, kept) = eval::evaluate_with(&model, &set, &labels, None, eval::Trunk::keep(frozen)).unwrap();
    let kept = kept.expect("streams kept");
    assert!(kept.bytes() > 0);
    assert_eq!(
        before,
        eval::EvalReport { seconds: before.seconds, ..eval::evaluate(&model, &set, &labels).unwrap() }
    );
    let probs_before = eval::probabilities(&model, &set, 16).unwrap();
    train::prepare(&mut model, Mode::LastLayers(1), 0, None).unwrap();
    train::train(&model, &set, &cfg(Mode::LastLayers(1), 5e-2, 3)).unwrap();
    let (probs_after, none) = eval::probabilities_with(&model, &set, 16, eval::Trunk::From(&kept)).unwrap();
    assert!(none.is_none());
    let full = eval::probabilities(&model, &set, 16).unwrap();
    let mut moved = 0.0f64;
    for ((a, b), c) in probs_after.iter().zip(&full).zip(&probs_before) {
        for ((x, y), z) in a.iter().zip(b).zip(c) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
            moved = moved.max((y - z).abs());
        }
    }
    assert!(moved > 1e-3, "training changed the probabilities");
    // Streams kept for another batching (or other data) are refused, not misread.
    assert!(eval::probabilities_with(&model, &set, 4, eval::Trunk::From(&kept)).is_err());
}

#[test]
fn reports_and_plots_are_written() {
    let labels: Vec<String> = ["normal", "inspect", "throttle"].map(String::from).to_vec();
    let probs = vec![vec![0.7, 0.2, 0.1], vec![0.2, 0.5, 0.3], vec![0.1, 0.6, 0.3]];
    let r = eval::metrics(&probs, &[0, 1, 2], &labels);
    let dir = tempfile::tempdir().unwrap();
    llmchain_cloud_trainer::plot::confusion(&dir.path().join("c.png"), &[("before", &r), ("after", &r)])
        .unwrap();
    llmchain_cloud_trainer::plot::loss_curve(&dir.path().join("l.png"), &[2.0, 1.5, 1.0, 0.7], "loss")
        .unwrap();
    for f in ["c.png", "l.png"] {
        assert!(std::fs::read(dir.path().join(f)).unwrap().starts_with(b"\x89PNG"));
    }
}
