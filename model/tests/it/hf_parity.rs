//! The real SmolLM2 GGUF against Hugging Face transformers (f32, same GGUF): logits over the
//! full vocabulary, a padded batch, greedy generation, and scoring against full logits.
//!
//! Needs `make setup` (model, libtorch) and `make fixtures` (reference outputs).

use crate::common::{self, int_rows, manifest, max_abs_diff, model, read_f32};
use llmchain_model::tokenizer::ChatMessage;
use llmchain_model::{GenerateOptions, Llama, StopReason};
use tch::{Device, Kind, Tensor};

/// The bound on max |Δ| between our logits and HF's.
const TOLERANCE: f64 = 1e-3;

fn ids_tensor(rows: &[Vec<i64>], device: Device) -> Tensor {
    let width = rows[0].len() as i64;
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, width]).to_device(device)
}

#[test]
fn logits_match_hf_on_single_prompts_at_every_position() {
    let guard = model();
    let (model, _) = &*guard;
    let dir = common::fixtures_dir();
    let cases: Vec<_> =
        manifest()["cases"].as_array().unwrap().iter().filter(|c| c["positions"] == "all").collect();
    assert!(cases.len() >= 5, "the fixtures hold {} single prompts", cases.len());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<i64> = case["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
        let expected = read_f32(&dir.join(case["logits_file"].as_str().unwrap()), &shape);
        let ids = int_rows::<i64>(&case["input_ids"]);
        let ours = tch::no_grad(|| model.forward(&ids_tensor(&ids, model.device()), None)).unwrap().get(0);
        let diff = max_abs_diff(&ours, &expected);
        eprintln!("{name}: {} tokens, max |Δ| = {diff:.2e}", shape[0]);
        assert!(diff <= TOLERANCE, "{name}: max |Δ| = {diff}");
        // The KV-cache path (prefill, then one token at a time) agrees as well.
        let flat: Vec<u32> = ids[0].iter().map(|&i| i as u32).collect();
        let split = flat.len() / 2;
        let mut cache = model.new_cache(1, flat.len()).unwrap();
        let _ = model.forward_cached(&mut cache, &[&flat[..split]], llmchain_model::Padding::Left).unwrap();
        for (k, &id) in flat.iter().enumerate().skip(split) {
            let _ = model.forward_cached(&mut cache, &[&[id]], llmchain_model::Padding::Left).unwrap();
            let step = tch::no_grad(|| model.logits(cache.last_hidden().unwrap())).get(0);
            let diff = max_abs_diff(&step, &expected.get(k as i64));
            assert!(diff <= TOLERANCE, "{name}: cached decode at {k}: max |Δ| = {diff}");
        }
    }
}

#[test]
fn logits_match_hf_on_a_left_padded_batch_of_mixed_lengths() {
    let guard = model();
    let (model, _) = &*guard;
    let case = manifest()["cases"].as_array().unwrap().iter().find(|c| c["name"] == "batch").unwrap();
    let shape: Vec<i64> = case["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
    let expected = read_f32(&common::fixtures_dir().join(case["logits_file"].as_str().unwrap()), &shape);
    let ids = int_rows::<i64>(&case["input_ids"]);
    let mask = int_rows::<i64>(&case["attention_mask"]);
    let lengths: Vec<usize> = mask.iter().map(|m| m.iter().filter(|&&x| x == 1).count()).collect();
    assert!(lengths.iter().min() < lengths.iter().max(), "the batch must mix lengths: {lengths:?}");

    // 1. The training-style forward with HF's padded ids and mask.
    let device = model.device();
    let logits =
        tch::no_grad(|| model.forward(&ids_tensor(&ids, device), Some(&ids_tensor(&mask, device)))).unwrap();
    let last = logits.select(1, -1);
    let diff = max_abs_diff(&last, &expected);
    eprintln!("padded forward: lengths {lengths:?}, max |Δ| = {diff:.2e}");
    assert!(diff <= TOLERANCE, "padded forward: max |Δ| = {diff}");

    // 2. The inference path, which pads by itself (from the unpadded rows).
    let rows: Vec<Vec<u32>> = ids
        .iter()
        .zip(&mask)
        .map(|(r, m)| r.iter().zip(m).filter(|(_, m)| **m == 1).map(|(&i, _)| i as u32).collect())
        .collect();
    let next = model.next_token_logits(&rows).unwrap();
    let diff = max_abs_diff(&next, &expected);
    eprintln!("next_token_logits: max |Δ| = {diff:.2e}");
    assert!(diff <= TOLERANCE, "next_token_logits: max |Δ| = {diff}");
}

#[test]
fn greedy_generation_of_the_france_chat_equals_hf() {
    let guard = model();
    let (model, tokenizer) = &*guard;
    let generation = &manifest()["generation"];
    let hf_prompt: Vec<u32> =
        generation["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let hf_output: Vec<u32> =
        generation["output_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let hf_text = generation["text"].as_str().unwrap();

    // Our tokenizer renders the chat to HF's ids.
    let messages = [ChatMessage { role: "user".into(), content: "What is the capital of France?".into() }];
    let prompt = tokenizer.encode(&tokenizer.apply_chat_template(&messages, true)).unwrap();
    assert_eq!(prompt, hf_prompt);

    let options = GenerateOptions {
        max_tokens: generation["max_new_tokens"].as_u64().unwrap() as usize,
        stop_ids: tokenizer.im_end_id().into_iter().collect(),
        ..GenerateOptions::default()
    };
    let out = model.generate(&prompt, &options).unwrap();
    // HF keeps the EOS it stopped at in its output; we report it as the stop reason.
    let mut ours = out.ids.clone();
    if let StopReason::Stop(id) = out.stop {
        ours.push(id);
    }
    assert_eq!(ours, hf_output);
    let text = tokenizer.decode(&out.ids).unwrap();
    eprintln!("generated: {text:?}");
    assert_eq!(text.trim(), hf_text.trim());
}

/// log P(candidate | prompt) from one full forward pass over `prompt ++ candidate`.
fn full_logit_score(model: &Llama, prompt: &[u32], candidate: &[u32]) -> f64 {
    let seq: Vec<i64> = prompt.iter().chain(candidate).map(|&i| i64::from(i)).collect();
    let logits = tch::no_grad(|| model.forward(&ids_tensor(&[seq], model.device()), None)).unwrap().get(0);
    let logp = logits.log_softmax(-1, Kind::Double);
    candidate
        .iter()
        .enumerate()
        .map(|(k, &id)| logp.double_value(&[(prompt.len() + k - 1) as i64, i64::from(id)]))
        .sum()
}

#[test]
fn score_agrees_with_full_logits_for_a_batch_of_mixed_lengths() {
    let guard = model();
    let (model, tokenizer) = &*guard;
    let instructions = "<|im_start|>system\nClassify the machine state as normal, inspect, throttle or shutdown.<|im_end|>\n<|im_start|>user\n";
    let records = [
        "pump temperature 61 C steady, vibration 2.2 mm/s, note: none",
        "motor smoke seen near the terminal box",
        "fan vibration 12.5 mm/s and rising fast, operator reports grinding",
        "compressor",
    ];
    // Answers of different token lengths, closed by `<|im_end|>` as a chat answer would be.
    let labels = ["normal", "inspect soon", "throttle", "shutdown now"];
    let prefix_ids = tokenizer.encode(instructions).unwrap();
    let suffixes: Vec<Vec<u32>> = records
        .iter()
        .map(|r| tokenizer.encode(&format!("{r}<|im_end|>\n<|im_start|>assistant\n")).unwrap())
        .collect();
    let candidates: Vec<Vec<u32>> =
        labels.iter().map(|l| tokenizer.encode(&format!("{l}<|im_end|>")).unwrap()).collect();
    let lens: Vec<usize> = candidates.iter().map(Vec::len).collect();
    assert!(lens.iter().any(|&n| n > 1), "some label must span several tokens: {lens:?}");
    let full_prompts: Vec<Vec<u32>> =
        suffixes.iter().map(|s| [prefix_ids.clone(), s.clone()].concat()).collect();

    let plain = model.score(None, &full_prompts, &candidates).unwrap();
    let prefix = model.prefix(&prefix_ids).unwrap();
    let shared = model.score(Some(&prefix), &suffixes, &candidates).unwrap();
    let argmax = |row: &[f32]| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    for (p, prompt) in full_prompts.iter().enumerate() {
        let reference: Vec<f64> = candidates.iter().map(|c| full_logit_score(model, prompt, c)).collect();
        eprintln!("prompt {p}: reference {reference:?}, score {:?}", plain[p]);
        for c in 0..candidates.len() {
            assert!((f64::from(plain[p][c]) - reference[c]).abs() < 1e-3, "prompt {p} candidate {c}");
            assert!(
                (f64::from(shared[p][c]) - reference[c]).abs() < 1e-3,
                "prefix: prompt {p} candidate {c}"
            );
        }
        let best = reference.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(argmax(&plain[p]), best);
        assert_eq!(argmax(&shared[p]), best);
    }
}

#[test]
fn sampling_is_reproducible_and_bad_requests_are_errors() {
    let guard = model();
    let (model, tokenizer) = &*guard;
    let prompt = tokenizer.encode("Once upon a time").unwrap();
    let options =
        GenerateOptions { max_tokens: 12, temperature: 0.9, top_p: 0.9, seed: 11, ..Default::default() };
    let a = model.generate(&prompt, &options).unwrap();
    let b = model.generate(&prompt, &options).unwrap();
    assert_eq!(a, b);
    assert!(!a.ids.is_empty());
    let vocab = model.config().vocab_size as u32;
    assert!(model.generate(&[vocab], &options).is_err());
    assert!(model.generate(&[], &options).is_err());
    assert!(model.generate(&prompt, &GenerateOptions { top_p: 0.0, ..options.clone() }).is_err());
    assert!(model.score(None, std::slice::from_ref(&prompt), &[vec![]]).is_err());
    assert!(model.score(None, &[vec![]], &[vec![1]]).is_err());
    assert!(model.score(None, &[prompt], &[vec![vocab]]).is_err());
}
