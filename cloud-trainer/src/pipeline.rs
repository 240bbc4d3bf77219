//! The steps a training command chains: load the starting model, tokenise, evaluate, train,
//! evaluate again, write reports and plots, and build the version to publish.

use std::{collections::HashMap, path::Path};

use llmchain_artifact::{Architecture, BlobDir, BlobSource, Manifest, Metric, ModelRef, TrainingMetadata};
use llmchain_model::{
    Llama, SaveDtype, prompt::ClassifierPrompt, tokenizer::Tokenizer, version::load_version,
};
use serde::Serialize;
use tch::Device;

use crate::{
    Error, Result,
    data::Dataset,
    eval::{self, EvalReport, KeptEval, evaluate_with},
    plot,
    train::{Mode, TokenExample, TokenSet, TrainReport},
    version::{self, VersionBuild},
};

/// Loads `manifest` for further training. Unlike the agent's path, LoRA adapters are *not*
/// merged: the base tensors load as published and the adapters come back as adapters, so a
/// LoRA round on a LoRA version changes only adapter tensors (its delta stays small).
pub fn load_for_training(
    manifest: &Manifest,
    source: &dyn BlobSource,
    device: Device,
) -> Result<(Llama, Tokenizer)> {
    let rank = manifest.architecture.lora_rank;
    if rank == 0 {
        return Ok(load_version(manifest, source, device)?);
    }
    let mut base = manifest.clone();
    base.architecture = Architecture { lora_rank: 0, lora_alpha: 0.0, ..manifest.architecture.clone() };
    base.tensors.retain(|t| !t.name.contains(".lora_"));
    let (mut model, tokenizer) = load_version(&base, source, device)?;
    model.add_lora(rank as usize, manifest.architecture.lora_alpha)?;
    let adapters: HashMap<&str, &llmchain_artifact::TensorInfo> =
        manifest.tensors.iter().filter(|t| t.name.contains(".lora_")).map(|t| (t.name.as_str(), t)).collect();
    for (name, t) in model.named_tensors() {
        if !name.contains(".lora_") {
            continue;
        }
        let info = adapters
            .get(name.as_str())
            .ok_or_else(|| Error::Invalid(format!("{name} missing from {}", manifest.id)))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut source.open(&info.digest).map_err(|e| Error::Invalid(format!("{name}: {e}")))?,
            &mut bytes,
        )
        .map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
        if llmchain_artifact::digest_bytes(&bytes) != info.digest {
            return Err(Error::Invalid(format!("{name}: blob does not match its digest")));
        }
        let kind = match info.dtype {
            llmchain_artifact::DType::F32 => tch::Kind::Float,
            llmchain_artifact::DType::F16 => tch::Kind::Half,
            llmchain_artifact::DType::Bf16 => tch::Kind::BFloat16,
        };
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let value = tch::Tensor::from_data_size(&bytes, &shape, kind).to_kind(tch::Kind::Float);
        tch::no_grad(|| t.shallow_clone().copy_(&value));
    }
    Ok((model, tokenizer))
}

/// Tokenises `data` with the agent's prompt layout.
pub fn tokenize(tokenizer: &Tokenizer, data: &Dataset) -> Result<(ClassifierPrompt, TokenSet)> {
    let labels: Vec<&str> = data.labels.iter().map(String::as_str).collect();
    let prompt = ClassifierPrompt::new(tokenizer, &data.instructions, &labels)?;
    let indices = data.label_indices()?;
    let examples = data
        .examples
        .iter()
        .zip(indices)
        .map(|(e, label)| Ok(TokenExample { ids: prompt.record_ids(tokenizer, &e.text)?, label }))
        .collect::<Result<Vec<_>>>()?;
    let set =
        TokenSet { prefix: prompt.prefix_ids().to_vec(), candidates: prompt.candidates().to_vec(), examples };
    Ok((prompt, set))
}

/// Evaluates and logs the text table; with `trunk`, keeps or reuses the frozen trunk's
/// streams (see [`eval::Trunk`]). `groups` (e.g. [`crate::data::rule_steps`]) adds the
/// accuracy per group.
pub fn evaluate_named(
    model: &Llama,
    data: &TokenSet,
    labels: &[String],
    groups: Option<&[String]>,
    title: &str,
    trunk: eval::Trunk<'_>,
) -> Result<(EvalReport, Option<KeptEval>)> {
    let (report, kept) = evaluate_with(model, data, labels, groups, trunk)?;
    eprint!("{}", report.table(title));
    Ok((report, kept))
}

/// The block below which `mode` leaves a model unchanged, when that is more than the
/// embeddings: evaluations before training keep the stream entering it, and those after
/// training run only the blocks from it on.
pub fn frozen_trunk(model: &Llama, mode: Mode) -> Option<usize> {
    Some(mode.trunk_end(model.config().num_hidden_layers)).filter(|&l| l > 0)
}

/// Everything a run reports, written as `report.json`.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// Training mode.
    pub mode: String,
    /// Training examples.
    pub train_examples: usize,
    /// Data set digest.
    pub dataset_digest: String,
    /// Training figures.
    pub train: TrainReport,
    /// Held-out evaluations, by name (`before`, `after`, `old_before`, …).
    pub eval: Vec<(String, EvalReport)>,
    /// Wall-clock seconds of the whole command.
    pub seconds: f64,
    /// The published version, its size and delta, once published.
    pub published: Option<serde_json::Value>,
}

/// Writes `report.json`, `report.txt`, `loss.png` and `confusion.png` into `dir`.
pub fn write_reports(dir: &Path, report: &RunReport) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Invalid(format!("{}: {e}", dir.display())))?;
    let json = serde_json::to_string_pretty(report).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(dir.join("report.json"), json).map_err(|e| Error::Invalid(e.to_string()))?;
    let text: String = report.eval.iter().map(|(name, r)| r.table(name)).collect();
    std::fs::write(dir.join("report.txt"), text).map_err(|e| Error::Invalid(e.to_string()))?;
    plot::loss_curve(&dir.join("loss.png"), &report.train.losses, &format!("{} training loss", report.mode))?;
    let panels: Vec<(&str, &EvalReport)> = report.eval.iter().map(|(n, r)| (n.as_str(), r)).collect();
    if !panels.is_empty() {
        plot::confusion(&dir.join("confusion.png"), &panels)?;
    }
    Ok(())
}

/// Builds the version that follows `parent_version` from the trained model.
#[allow(clippy::too_many_arguments)]
pub fn build_version(
    model: &Llama,
    tokenizer: &Tokenizer,
    id: ModelRef,
    parent_version: u64,
    dtype: SaveDtype,
    mode: &str,
    data: &Dataset,
    metrics: Vec<Metric>,
    note: String,
) -> Result<VersionBuild> {
    let training = TrainingMetadata {
        mode: mode.to_string(),
        dataset_digest: Some(data.digest()),
        metrics,
        records: data.examples.len() as u64,
        note,
    };
    version::build(model, tokenizer, id, parent_version, dtype, training)
}

/// Writes a version locally (`manifest.pb` and `blobs/`), for runs without a coordinator and
/// for [`crate::remote::local_version`].
pub fn save_local(dir: &Path, build: &VersionBuild) -> Result<()> {
    let blobs = BlobDir(dir.join("blobs"));
    for (digest, bytes) in &build.blobs {
        let path = blobs.path(digest);
        if path.exists() {
            continue;
        }
        std::fs::create_dir_all(path.parent().expect("blob paths have a parent"))
            .and_then(|()| std::fs::write(&path, bytes))
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    }
    std::fs::write(dir.join("manifest.pb"), build.manifest.canonical_bytes())
        .map_err(|e| Error::Invalid(format!("{}: {e}", dir.display())))?;
    Ok(())
}

/// Bytes of the tensors of `build` whose digests `parent` does not list: what an agent running
/// the parent downloads.
pub fn delta_bytes(build: &VersionBuild, parent: Option<&Manifest>) -> u64 {
    match parent {
        Some(p) => llmchain_artifact::delta_bytes_from(&build.manifest, p),
        None => build.manifest.total_bytes(),
    }
}
