//! Domain types of the v1 API, validated once at the wire boundary.
//!
//! Each `TryFrom<pb::X>` checks every field and reports the first bad one as
//! [`ApiError::InvalidArgument`] naming its path, so a client learns exactly what to fix.
//! Types here hold no prost structs; service code works only with them.

use std::{fmt, str::FromStr, time::SystemTime};

use crate::{ApiError, ApiResult, pb};

/// Largest chunk a client may ask for or send in a blob stream.
pub const MAX_CHUNK_BYTES: u64 = 4 << 20;
/// Chunk size used when a client does not ask for one.
pub const DEFAULT_CHUNK_BYTES: u64 = 1 << 20;
/// Most digests one `MissingBlobs` or `PlanDelta` call may carry.
pub const MAX_DIGESTS: usize = 100_000;
/// Most summaries one `ReportSummaries` call may carry.
pub const MAX_SUMMARIES_PER_REPORT: usize = 1_000;
/// Buckets of a summary's confidence histogram.
pub const CONFIDENCE_BUCKETS: usize = 10;

fn check_name(field: &str, value: &str) -> ApiResult<()> {
    if value.is_empty() || value.len() > 64 {
        return Err(ApiError::invalid(field, "must be 1-64 characters"));
    }
    let first_ok = value.as_bytes()[0].is_ascii_lowercase() || value.as_bytes()[0].is_ascii_digit();
    let all_ok = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if !first_ok || !all_ok {
        return Err(ApiError::invalid(
            field,
            format!("{value:?} must be [a-z0-9._-] starting with a letter or digit"),
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` as the given field.
            pub fn parse(field: &str, value: &str) -> ApiResult<Self> {
                check_name(field, value)?;
                Ok(Self(value.to_string()))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = ApiError;
            fn from_str(s: &str) -> ApiResult<Self> {
                Self::parse(stringify!($name), s)
            }
        }
    };
}

name_type!(
    /// A model name: 1-64 characters of `[a-z0-9._-]`, starting with a letter or digit.
    ModelName
);
name_type!(
    /// An identity name (agent, trainer, operator), same rules as a model name.
    AgentId
);
name_type!(
    /// A rollout identifier, same rules as a model name.
    RolloutId
);

/// A sha256 content address, written `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Parses `value` as the given field.
    pub fn parse(field: &str, value: &str) -> ApiResult<Self> {
        let hex = value
            .strip_prefix("sha256:")
            .ok_or_else(|| ApiError::invalid(field, format!("{value:?} must start with \"sha256:\"")))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(ApiError::invalid(field, "must be sha256: and 64 lowercase hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| ApiError::invalid(field, "bad hex"))?;
        }
        Ok(Digest(out))
    }

    /// Lowercase hex of the 32 bytes, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}…", &self.hex()[..12])
    }
}

impl FromStr for Digest {
    type Err = ApiError;
    fn from_str(s: &str) -> ApiResult<Self> {
        Digest::parse("digest", s)
    }
}

fn digests(field: &str, values: &[String]) -> ApiResult<Vec<Digest>> {
    if values.len() > MAX_DIGESTS {
        return Err(ApiError::invalid(field, format!("at most {MAX_DIGESTS} digests")));
    }
    values.iter().enumerate().map(|(i, d)| Digest::parse(&format!("{field}[{i}]"), d)).collect()
}

/// A model name and version number (≥ 1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelRef {
    /// Model name.
    pub model: ModelName,
    /// Version number, ≥ 1.
    pub version: u64,
}

impl TryFrom<pb::ModelRef> for ModelRef {
    type Error = ApiError;
    fn try_from(m: pb::ModelRef) -> ApiResult<Self> {
        let model = ModelName::parse("model", &m.model)?;
        if m.version == 0 {
            return Err(ApiError::invalid("version", "must be at least 1"));
        }
        Ok(ModelRef { model, version: m.version })
    }
}

impl From<ModelRef> for pb::ModelRef {
    fn from(m: ModelRef) -> Self {
        pb::ModelRef { model: m.model.0, version: m.version }
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@v{}", self.model, self.version)
    }
}

/// Converts a required nested message, naming `field` when it is absent or invalid.
fn required<P, D>(field: &str, value: Option<P>) -> ApiResult<D>
where
    D: TryFrom<P, Error = ApiError>,
{
    let value = value.ok_or_else(|| ApiError::invalid(field, "is required"))?;
    D::try_from(value).map_err(|e| e.within(field))
}

/// Element type of a tensor blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 4-byte float.
    F32,
    /// 2-byte IEEE half.
    F16,
    /// 2-byte bfloat16.
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    fn from_wire(field: &str, value: i32) -> ApiResult<Self> {
        match pb::DType::try_from(value) {
            Ok(pb::DType::F32) => Ok(DType::F32),
            Ok(pb::DType::F16) => Ok(DType::F16),
            Ok(pb::DType::Bf16) => Ok(DType::Bf16),
            _ => Err(ApiError::invalid(field, format!("unknown dtype {value}"))),
        }
    }
}

impl From<DType> for pb::DType {
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => pb::DType::F32,
            DType::F16 => pb::DType::F16,
            DType::Bf16 => pb::DType::Bf16,
        }
    }
}

/// One tensor of a version, with its size checked against dtype × shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Hugging Face tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<u64>,
    /// Content address.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
}

impl TryFrom<pb::TensorInfo> for TensorInfo {
    type Error = ApiError;
    fn try_from(t: pb::TensorInfo) -> ApiResult<Self> {
        if t.name.is_empty() || t.name.len() > 256 || !t.name.is_ascii() {
            return Err(ApiError::invalid("name", "must be 1-256 ASCII characters"));
        }
        let dtype = DType::from_wire("dtype", t.dtype)?;
        if t.shape.is_empty() || t.shape.len() > 8 || t.shape.contains(&0) {
            return Err(ApiError::invalid("shape", "must have 1-8 dimensions, each at least 1"));
        }
        let elements = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| ApiError::invalid("shape", "element count overflows"))?;
        let expected = elements
            .checked_mul(dtype.size())
            .ok_or_else(|| ApiError::invalid("shape", "byte size overflows"))?;
        if t.size != expected {
            return Err(ApiError::invalid(
                "size",
                format!("{} bytes disagrees with dtype and shape ({expected} bytes)", t.size),
            ));
        }
        let digest = Digest::parse("digest", &t.digest)?;
        Ok(TensorInfo { name: t.name, dtype, shape: t.shape, digest, size: t.size })
    }
}

impl From<TensorInfo> for pb::TensorInfo {
    fn from(t: TensorInfo) -> Self {
        pb::TensorInfo {
            name: t.name,
            dtype: pb::DType::from(t.dtype) as i32,
            shape: t.shape,
            digest: t.digest.to_string(),
            size: t.size,
        }
    }
}

/// A byte range of a blob to stream (`FetchBlob`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobRange {
    /// The blob.
    pub digest: Digest,
    /// First byte.
    pub offset: u64,
    /// Bytes to send; `None` means to the end.
    pub length: Option<u64>,
    /// Chunk size in bytes.
    pub chunk_size: u64,
}

impl TryFrom<pb::FetchBlobRequest> for BlobRange {
    type Error = ApiError;
    fn try_from(r: pb::FetchBlobRequest) -> ApiResult<Self> {
        let digest = Digest::parse("digest", &r.digest)?;
        let chunk_size = match u64::from(r.chunk_size) {
            0 => DEFAULT_CHUNK_BYTES,
            n if n > MAX_CHUNK_BYTES => {
                return Err(ApiError::invalid("chunk_size", format!("at most {MAX_CHUNK_BYTES} bytes")));
            }
            n => n,
        };
        r.offset
            .checked_add(r.length)
            .ok_or_else(|| ApiError::invalid("length", "offset + length overflows"))?;
        let length = (r.length > 0).then_some(r.length);
        Ok(BlobRange { digest, offset: r.offset, length, chunk_size })
    }
}

/// The first message of an `UploadBlob` stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadHeader {
    /// Digest the uploaded bytes must hash to.
    pub digest: Digest,
    /// Total bytes that will follow.
    pub total_size: u64,
}

impl TryFrom<&pb::UploadBlobRequest> for UploadHeader {
    type Error = ApiError;
    fn try_from(r: &pb::UploadBlobRequest) -> ApiResult<Self> {
        let digest = Digest::parse("digest", &r.digest)?;
        if r.offset != 0 {
            return Err(ApiError::invalid("offset", "the first chunk must start at offset 0"));
        }
        if r.data.len() as u64 > MAX_CHUNK_BYTES {
            return Err(ApiError::invalid("data", format!("chunks are at most {MAX_CHUNK_BYTES} bytes")));
        }
        Ok(UploadHeader { digest, total_size: r.total_size })
    }
}

/// Digests an uploader is about to publish (`MissingBlobs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingBlobsQuery {
    /// Digests in request order.
    pub digests: Vec<Digest>,
}

impl TryFrom<pb::MissingBlobsRequest> for MissingBlobsQuery {
    type Error = ApiError;
    fn try_from(r: pb::MissingBlobsRequest) -> ApiResult<Self> {
        Ok(MissingBlobsQuery { digests: digests("digests", &r.digests)? })
    }
}

/// What a holder of some blobs needs for a version (`PlanDelta`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaQuery {
    /// The version wanted.
    pub target: ModelRef,
    /// Digests held already.
    pub have: Vec<Digest>,
}

impl TryFrom<pb::PlanDeltaRequest> for DeltaQuery {
    type Error = ApiError;
    fn try_from(r: pb::PlanDeltaRequest) -> ApiResult<Self> {
        Ok(DeltaQuery { target: required("target", r.target)?, have: digests("have", &r.have)? })
    }
}

/// A manifest as signed bytes, not yet trusted (`PublishVersion`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    /// Protobuf-encoded `Manifest`, exactly as signed.
    pub manifest: Vec<u8>,
    /// ed25519 signature.
    pub signature: [u8; 64],
    /// Signing key identifier.
    pub key_id: String,
}

impl TryFrom<pb::SignedManifest> for SignedManifest {
    type Error = ApiError;
    fn try_from(s: pb::SignedManifest) -> ApiResult<Self> {
        if s.manifest.is_empty() {
            return Err(ApiError::invalid("manifest", "is empty"));
        }
        if s.manifest.len() > 16 << 20 {
            return Err(ApiError::invalid("manifest", "is larger than 16 MiB"));
        }
        let signature: [u8; 64] = s.signature.as_slice().try_into().map_err(|_| {
            ApiError::invalid("signature", format!("must be 64 bytes, got {}", s.signature.len()))
        })?;
        if !s.key_id.starts_with("ed25519:") || s.key_id.len() != 8 + 16 {
            return Err(ApiError::invalid("key_id", "must be \"ed25519:\" and 16 hex digits"));
        }
        Ok(SignedManifest { manifest: s.manifest, signature, key_id: s.key_id })
    }
}

/// Largest payload of a [`SignedStatement`] (a trust document lists keys; 64 KiB holds ~1,500).
pub const MAX_STATEMENT_BYTES: usize = 64 << 10;

/// A signed trust document or rollback statement, not yet trusted: only its shape is checked
/// here; the artifact crate verifies the signature before decoding the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedStatement {
    /// Protobuf-encoded statement, exactly as signed.
    pub payload: Vec<u8>,
    /// ed25519 signature.
    pub signature: [u8; 64],
    /// Signing key identifier.
    pub key_id: String,
}

impl TryFrom<pb::SignedStatement> for SignedStatement {
    type Error = ApiError;
    fn try_from(s: pb::SignedStatement) -> ApiResult<Self> {
        if s.payload.is_empty() || s.payload.len() > MAX_STATEMENT_BYTES {
            return Err(ApiError::invalid("payload", format!("must be 1-{MAX_STATEMENT_BYTES} bytes")));
        }
        let signature: [u8; 64] = s.signature.as_slice().try_into().map_err(|_| {
            ApiError::invalid("signature", format!("must be 64 bytes, got {}", s.signature.len()))
        })?;
        if !s.key_id.starts_with("ed25519:") || s.key_id.len() != 8 + 16 {
            return Err(ApiError::invalid("key_id", "must be \"ed25519:\" and 16 hex digits"));
        }
        Ok(SignedStatement { payload: s.payload, signature, key_id: s.key_id })
    }
}

impl From<SignedStatement> for pb::SignedStatement {
    fn from(s: SignedStatement) -> Self {
        pb::SignedStatement { payload: s.payload, signature: s.signature.to_vec(), key_id: s.key_id }
    }
}

impl TryFrom<pb::PublishVersionRequest> for SignedManifest {
    type Error = ApiError;
    fn try_from(r: pb::PublishVersionRequest) -> ApiResult<Self> {
        required("signed", r.signed)
    }
}

/// A `key=value` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
}

impl TryFrom<pb::Label> for Label {
    type Error = ApiError;
    fn try_from(l: pb::Label) -> ApiResult<Self> {
        let key_ok = !l.key.is_empty()
            && l.key.len() <= 63
            && l.key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
        if !key_ok {
            return Err(ApiError::invalid(
                "key",
                format!("{:?} must be 1-63 characters of [a-zA-Z0-9._/-]", l.key),
            ));
        }
        if l.value.len() > 63 || l.value.chars().any(|c| c.is_control() || c == ',' || c == '=') {
            return Err(ApiError::invalid(
                "value",
                "must be at most 63 characters, without ',' '=' or controls",
            ));
        }
        Ok(Label { key: l.key, value: l.value })
    }
}

/// A conjunction of `key=value` requirements; empty selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Label>);

impl LabelSelector {
    /// Parses `"k=v,k2=v2"` as the given field.
    pub fn parse(field: &str, s: &str) -> ApiResult<Self> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| ApiError::invalid(field, format!("{part:?} is not key=value")))?;
            let label = Label::try_from(pb::Label { key: key.trim().into(), value: value.trim().into() })
                .map_err(|e| e.within(field))?;
            out.push(label);
        }
        Ok(LabelSelector(out))
    }

    /// Whether a label set satisfies every requirement.
    pub fn matches(&self, labels: &[Label]) -> bool {
        self.0.iter().all(|want| labels.contains(want))
    }
}

fn labels(field: &str, values: Vec<pb::Label>) -> ApiResult<Vec<Label>> {
    if values.len() > 64 {
        return Err(ApiError::invalid(field, "at most 64 labels"));
    }
    values
        .into_iter()
        .enumerate()
        .map(|(i, l)| Label::try_from(l).map_err(|e| e.within(&format!("{field}[{i}]"))))
        .collect()
}

/// An enrollment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    /// Bootstrap token.
    pub token: String,
    /// Requested identity.
    pub name: AgentId,
    /// PEM certificate signing request.
    pub csr_pem: String,
    /// Labels.
    pub labels: Vec<Label>,
}

impl TryFrom<pb::EnrollRequest> for Enrollment {
    type Error = ApiError;
    fn try_from(r: pb::EnrollRequest) -> ApiResult<Self> {
        if r.bootstrap_token.is_empty() || r.bootstrap_token.len() > 256 {
            return Err(ApiError::invalid("bootstrap_token", "must be 1-256 characters"));
        }
        let name = AgentId::parse("name", &r.name)?;
        if !r.csr_pem.contains("-----BEGIN CERTIFICATE REQUEST-----") || r.csr_pem.len() > 16 << 10 {
            return Err(ApiError::invalid(
                "csr_pem",
                "must be one PEM certificate request of at most 16 KiB",
            ));
        }
        Ok(Enrollment {
            token: r.bootstrap_token,
            name,
            csr_pem: r.csr_pem,
            labels: labels("labels", r.labels)?,
        })
    }
}

/// Converts a wire timestamp, naming `field` when it is out of range.
pub fn timestamp(field: &str, t: &prost_types::Timestamp) -> ApiResult<SystemTime> {
    SystemTime::try_from(*t).map_err(|_| ApiError::invalid(field, "timestamp out of range"))
}

/// Score of one label in a hard example.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelScore {
    /// Label.
    pub label: String,
    /// Log-probability.
    pub logprob: f64,
    /// Softmax probability.
    pub probability: f64,
}

/// A low-confidence record reported in a summary.
#[derive(Debug, Clone, PartialEq)]
pub struct HardExample {
    /// Preprocessed text.
    pub text: String,
    /// Chosen label.
    pub decision: String,
    /// Scores of every label.
    pub scores: Vec<LabelScore>,
}

/// A validated decision summary of one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Reporting agent.
    pub agent_id: AgentId,
    /// Sequence number ≥ 1.
    pub seq: u64,
    /// Window start.
    pub window_start: SystemTime,
    /// Window end (not before the start).
    pub window_end: SystemTime,
    /// Version that decided.
    pub model: ModelRef,
    /// Decisions per label.
    pub label_counts: Vec<(String, u64)>,
    /// Confidence histogram, [`CONFIDENCE_BUCKETS`] buckets.
    pub confidence_histogram: Vec<u64>,
    /// Latency percentiles p50, p95, p99 in milliseconds.
    pub latency_ms: [f64; 3],
    /// Records seen.
    pub records: u64,
    /// Raw bytes seen.
    pub raw_bytes: u64,
    /// Bad records skipped.
    pub bad_records: u64,
    /// Hard examples.
    pub hard_examples: Vec<HardExample>,
    /// Summaries dropped by the spool before this one.
    pub spool_dropped: u64,
}

impl TryFrom<pb::Summary> for Summary {
    type Error = ApiError;
    fn try_from(s: pb::Summary) -> ApiResult<Self> {
        let agent_id = AgentId::parse("agent_id", &s.agent_id)?;
        if s.seq == 0 {
            return Err(ApiError::invalid("seq", "must be at least 1"));
        }
        let window_start = timestamp(
            "window_start",
            s.window_start.as_ref().ok_or_else(|| ApiError::invalid("window_start", "is required"))?,
        )?;
        let window_end = timestamp(
            "window_end",
            s.window_end.as_ref().ok_or_else(|| ApiError::invalid("window_end", "is required"))?,
        )?;
        if window_end < window_start {
            return Err(ApiError::invalid("window_end", "is before window_start"));
        }
        let model = required("model", s.model)?;
        if s.label_counts.len() > 64 {
            return Err(ApiError::invalid("label_counts", "at most 64 labels"));
        }
        let mut label_counts = Vec::with_capacity(s.label_counts.len());
        for (i, c) in s.label_counts.into_iter().enumerate() {
            if c.label.is_empty() || c.label.len() > 64 {
                return Err(ApiError::invalid(format!("label_counts[{i}].label"), "must be 1-64 characters"));
            }
            label_counts.push((c.label, c.count));
        }
        if s.confidence_histogram.len() != CONFIDENCE_BUCKETS {
            return Err(ApiError::invalid(
                "confidence_histogram",
                format!("must have {CONFIDENCE_BUCKETS} buckets, got {}", s.confidence_histogram.len()),
            ));
        }
        let latency_ms = [s.latency_p50_ms, s.latency_p95_ms, s.latency_p99_ms];
        for (name, v) in ["latency_p50_ms", "latency_p95_ms", "latency_p99_ms"].iter().zip(latency_ms) {
            if !v.is_finite() || v < 0.0 {
                return Err(ApiError::invalid(*name, "must be a finite, non-negative number"));
            }
        }
        if s.bad_records > s.records {
            return Err(ApiError::invalid("bad_records", "exceeds records"));
        }
        if s.hard_examples.len() > 100 {
            return Err(ApiError::invalid("hard_examples", "at most 100"));
        }
        let mut hard_examples = Vec::with_capacity(s.hard_examples.len());
        for (i, h) in s.hard_examples.into_iter().enumerate() {
            if h.text.len() > 4096 {
                return Err(ApiError::invalid(format!("hard_examples[{i}].text"), "at most 4 KiB"));
            }
            let scores = h
                .scores
                .into_iter()
                .map(|sc| LabelScore { label: sc.label, logprob: sc.logprob, probability: sc.probability })
                .collect();
            hard_examples.push(HardExample { text: h.text, decision: h.decision, scores });
        }
        Ok(Summary {
            agent_id,
            seq: s.seq,
            window_start,
            window_end,
            model,
            label_counts,
            confidence_histogram: s.confidence_histogram,
            latency_ms,
            records: s.records,
            raw_bytes: s.raw_bytes,
            bad_records: s.bad_records,
            hard_examples,
            spool_dropped: s.spool_dropped,
        })
    }
}

/// Summaries reported by one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryReport {
    /// Reporting agent.
    pub agent_id: AgentId,
    /// Summaries, each reported by `agent_id`.
    pub summaries: Vec<Summary>,
}

impl TryFrom<pb::ReportSummariesRequest> for SummaryReport {
    type Error = ApiError;
    fn try_from(r: pb::ReportSummariesRequest) -> ApiResult<Self> {
        let agent_id = AgentId::parse("agent_id", &r.agent_id)?;
        if r.summaries.len() > MAX_SUMMARIES_PER_REPORT {
            return Err(ApiError::invalid("summaries", format!("at most {MAX_SUMMARIES_PER_REPORT}")));
        }
        let mut summaries = Vec::with_capacity(r.summaries.len());
        for (i, s) in r.summaries.into_iter().enumerate() {
            let s = Summary::try_from(s).map_err(|e| e.within(&format!("summaries[{i}]")))?;
            if s.agent_id != agent_id {
                return Err(ApiError::invalid(format!("summaries[{i}].agent_id"), "differs from agent_id"));
            }
            summaries.push(s);
        }
        Ok(SummaryReport { agent_id, summaries })
    }
}

/// How many agents a rollout step covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepSize {
    /// An absolute number of agents.
    Agents(u32),
    /// A percentage (1-100) of the selected agents, rounded up.
    Percent(u32),
}

/// One validated rollout step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Agents covered after the step.
    pub size: StepSize,
    /// Soak time in seconds.
    pub soak_seconds: u32,
    /// Extra soak time in milliseconds.
    pub soak_ms: u32,
}

impl Step {
    /// The whole soak time: `soak_seconds` plus `soak_ms`.
    pub fn soak(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.soak_seconds.into())
            + std::time::Duration::from_millis(self.soak_ms.into())
    }

    /// Agents on the target after this step, out of `selected` (percentages round up; never
    /// more than `selected`).
    pub fn covered(&self, selected: usize) -> usize {
        match self.size {
            StepSize::Agents(n) => (n as usize).min(selected),
            StepSize::Percent(p) => (selected * p as usize).div_ceil(100).min(selected),
        }
    }
}

/// Which agents a rollout targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// Explicit agent ids.
    Agents(Vec<AgentId>),
    /// A label selector (empty: every agent).
    Selector(LabelSelector),
}

/// A validated `CreateRollout` request.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSpec {
    /// Target version.
    pub target: ModelRef,
    /// Agents.
    pub targets: Targets,
    /// Steps; the last reaches 100%.
    pub steps: Vec<Step>,
    /// Gates (the wire message; its ranges are checked).
    pub gates: pb::RolloutGates,
    /// Pre-fetch before activation.
    pub prefetch: bool,
    /// Probe set: raw record JSON and expected label.
    pub probe: Vec<(String, String)>,
    /// Create paused.
    pub paused: bool,
}

impl TryFrom<pb::CreateRolloutRequest> for RolloutSpec {
    type Error = ApiError;
    fn try_from(r: pb::CreateRolloutRequest) -> ApiResult<Self> {
        let target = required("target", r.target)?;
        let targets = if r.agent_ids.is_empty() {
            Targets::Selector(LabelSelector::parse("selector", &r.selector)?)
        } else {
            if !r.selector.is_empty() {
                return Err(ApiError::invalid("selector", "give agent_ids or a selector, not both"));
            }
            let ids = r
                .agent_ids
                .iter()
                .enumerate()
                .map(|(i, a)| AgentId::parse(&format!("agent_ids[{i}]"), a))
                .collect::<ApiResult<Vec<_>>>()?;
            Targets::Agents(ids)
        };
        if r.steps.is_empty() || r.steps.len() > 32 {
            return Err(ApiError::invalid("steps", "must have 1-32 steps"));
        }
        let mut steps = Vec::with_capacity(r.steps.len());
        for (i, s) in r.steps.iter().enumerate() {
            let size = match (s.agents, s.percent) {
                (0, p @ 1..=100) => StepSize::Percent(p),
                (n, 0) if n > 0 => StepSize::Agents(n),
                _ => {
                    return Err(ApiError::invalid(
                        format!("steps[{i}]"),
                        "set either agents (> 0) or percent (1-100)",
                    ));
                }
            };
            steps.push(Step { size, soak_seconds: s.soak_seconds, soak_ms: s.soak_ms });
        }
        if !matches!(steps.last().map(|s| s.size), Some(StepSize::Percent(100))) {
            return Err(ApiError::invalid(
                format!("steps[{}]", steps.len() - 1),
                "the last step must be percent 100",
            ));
        }
        let gates = r.gates.unwrap_or_default();
        for (name, v) in [
            ("gates.max_bad_record_rate", gates.max_bad_record_rate),
            ("gates.max_decision_drift", gates.max_decision_drift),
            ("gates.min_probe_accuracy", gates.min_probe_accuracy),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(ApiError::invalid(name, "must be between 0 and 1"));
            }
        }
        if !gates.max_latency_p99_ms.is_finite() || gates.max_latency_p99_ms < 0.0 {
            return Err(ApiError::invalid(
                "gates.max_latency_p99_ms",
                "must be a finite, non-negative number",
            ));
        }
        if r.probe.len() > 1000 {
            return Err(ApiError::invalid("probe", "at most 1000 records"));
        }
        let probe = r
            .probe
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                if p.record_json.is_empty() || p.label.is_empty() {
                    Err(ApiError::invalid(format!("probe[{i}]"), "needs record_json and label"))
                } else {
                    Ok((p.record_json, p.label))
                }
            })
            .collect::<ApiResult<_>>()?;
        Ok(RolloutSpec { target, targets, steps, gates, prefetch: r.prefetch, probe, paused: r.paused })
    }
}

/// A validated `PauseRollout`, `ResumeRollout` or `RollbackRollout` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutAction {
    /// The rollout.
    pub id: RolloutId,
    /// Why, for the history (at most 1 KiB).
    pub reason: String,
    /// Rollback only: a trainer-signed rollback statement relayed to the agents.
    pub rollback_statement: Option<SignedStatement>,
}

impl TryFrom<pb::RolloutAction> for RolloutAction {
    type Error = ApiError;
    fn try_from(a: pb::RolloutAction) -> ApiResult<Self> {
        let id = RolloutId::parse("id", &a.id)?;
        check_text("reason", &a.reason, 1024)?;
        if a.reason.chars().any(char::is_control) {
            return Err(ApiError::invalid("reason", "must not contain control characters"));
        }
        let rollback_statement = a
            .rollback_statement
            .map(SignedStatement::try_from)
            .transpose()
            .map_err(|e| e.within("rollback_statement"))?;
        Ok(RolloutAction { id, reason: a.reason, rollback_statement })
    }
}

/// A validated bootstrap token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// Role of the enrolled identity.
    pub role: pb::Role,
    /// Identity name it is for, if fixed.
    pub name: Option<AgentId>,
    /// Lifetime in seconds.
    pub ttl_seconds: u32,
}

impl TryFrom<pb::CreateBootstrapTokenRequest> for TokenRequest {
    type Error = ApiError;
    fn try_from(r: pb::CreateBootstrapTokenRequest) -> ApiResult<Self> {
        let role = match pb::Role::try_from(r.role) {
            Ok(role) if role != pb::Role::Unspecified => role,
            _ => return Err(ApiError::invalid("role", "must be agent, trainer or operator")),
        };
        let name = (!r.name.is_empty()).then(|| AgentId::parse("name", &r.name)).transpose()?;
        let ttl_seconds = match r.ttl_seconds {
            0 => 3600,
            t if t > 7 * 24 * 3600 => return Err(ApiError::invalid("ttl_seconds", "at most 7 days")),
            t => t,
        };
        Ok(TokenRequest { role, name, ttl_seconds })
    }
}

/// Most agent ids one `Assign` call may name.
pub const MAX_ASSIGN_AGENTS: usize = 10_000;
/// Summaries `ListSummaries` returns when the request sets no limit.
pub const DEFAULT_SUMMARY_LIMIT: usize = 1_000;

impl From<Label> for pb::Label {
    fn from(l: Label) -> Self {
        pb::Label { key: l.key, value: l.value }
    }
}

impl fmt::Display for LabelSelector {
    /// The `k=v,k2=v2` form [`LabelSelector::parse`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}={}", l.key, l.value)?;
        }
        Ok(())
    }
}

/// A version field documented as optional: absent or version 0 means none.
fn optional_model_ref(field: &str, m: Option<pb::ModelRef>) -> ApiResult<Option<ModelRef>> {
    match m {
        None => Ok(None),
        Some(m) if m.version == 0 && m.model.is_empty() => Ok(None),
        Some(m) if m.version == 0 => {
            ModelName::parse(&format!("{field}.model"), &m.model)?;
            Ok(None)
        }
        Some(m) => ModelRef::try_from(m).map(Some).map_err(|e| e.within(field)),
    }
}

fn optional_model_to_wire(m: Option<ModelRef>) -> Option<pb::ModelRef> {
    Some(m.map(Into::into).unwrap_or_default())
}

fn check_text(field: &str, value: &str, max: usize) -> ApiResult<()> {
    if value.len() > max {
        return Err(ApiError::invalid(field, format!("at most {max} bytes")));
    }
    Ok(())
}

/// What an agent reports it is doing (`Hello.status`, `Heartbeat.status`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentStatus {
    /// Version serving decisions, if any.
    pub running: Option<ModelRef>,
    /// Version being fetched or loaded, if any.
    pub pending: Option<ModelRef>,
    /// Bytes of the pending version downloaded so far.
    pub download_done_bytes: u64,
    /// Bytes of the pending version in all.
    pub download_total_bytes: u64,
    /// Decisions per second over the last window (finite, ≥ 0).
    pub decisions_per_second: f64,
    /// Raw record bytes seen since the agent started.
    pub raw_bytes: u64,
    /// Summary bytes sent since the agent started.
    pub summary_bytes: u64,
    /// Last error, empty when healthy (at most 4 KiB).
    pub last_error: String,
    /// Summaries waiting in the offline spool.
    pub spool_depth: u64,
}

impl TryFrom<pb::AgentStatus> for AgentStatus {
    type Error = ApiError;
    fn try_from(s: pb::AgentStatus) -> ApiResult<Self> {
        let running = optional_model_ref("running", s.running)?;
        let pending = optional_model_ref("pending", s.pending)?;
        if !s.decisions_per_second.is_finite() || s.decisions_per_second < 0.0 {
            return Err(ApiError::invalid("decisions_per_second", "must be a finite, non-negative number"));
        }
        check_text("last_error", &s.last_error, 4096)?;
        Ok(AgentStatus {
            running,
            pending,
            download_done_bytes: s.download_done_bytes,
            download_total_bytes: s.download_total_bytes,
            decisions_per_second: s.decisions_per_second,
            raw_bytes: s.raw_bytes,
            summary_bytes: s.summary_bytes,
            last_error: s.last_error,
            spool_depth: s.spool_depth,
        })
    }
}

impl From<AgentStatus> for pb::AgentStatus {
    fn from(s: AgentStatus) -> Self {
        pb::AgentStatus {
            running: optional_model_to_wire(s.running),
            pending: optional_model_to_wire(s.pending),
            download_done_bytes: s.download_done_bytes,
            download_total_bytes: s.download_total_bytes,
            decisions_per_second: s.decisions_per_second,
            raw_bytes: s.raw_bytes,
            summary_bytes: s.summary_bytes,
            last_error: s.last_error,
            spool_depth: s.spool_depth,
        }
    }
}

/// A status that may be absent on the wire (an agent that has nothing to say yet).
fn status_or_default(field: &str, s: Option<pb::AgentStatus>) -> ApiResult<AgentStatus> {
    s.map(AgentStatus::try_from).transpose().map_err(|e| e.within(field)).map(Option::unwrap_or_default)
}

/// The first message of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    /// Agent identity.
    pub agent_id: AgentId,
    /// Labels the agent reports.
    pub labels: Vec<Label>,
    /// Current status.
    pub status: AgentStatus,
    /// Agent software version (at most 64 bytes).
    pub agent_version: String,
}

impl TryFrom<pb::Hello> for Hello {
    type Error = ApiError;
    fn try_from(h: pb::Hello) -> ApiResult<Self> {
        let agent_id = AgentId::parse("agent_id", &h.agent_id)?;
        let labels = labels("labels", h.labels)?;
        let status = status_or_default("status", h.status)?;
        check_text("agent_version", &h.agent_version, 64)?;
        Ok(Hello { agent_id, labels, status, agent_version: h.agent_version })
    }
}

/// A periodic heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    /// Sequence number within the session.
    pub seq: u64,
    /// Agent clock at send time, if given.
    pub sent_at: Option<SystemTime>,
    /// Current status.
    pub status: AgentStatus,
}

impl TryFrom<pb::Heartbeat> for Heartbeat {
    type Error = ApiError;
    fn try_from(h: pb::Heartbeat) -> ApiResult<Self> {
        let sent_at = h.sent_at.as_ref().map(|t| timestamp("sent_at", t)).transpose()?;
        let status = status_or_default("status", h.status)?;
        Ok(Heartbeat { seq: h.seq, sent_at, status })
    }
}

/// Outcome of an assignment on an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AssignmentOutcome {
    /// Downloaded and verified, not activated.
    Prefetched,
    /// Loaded, self-tested and swapped in.
    Activated,
    /// Download or verification failed.
    FetchFailed,
    /// Loading or the self-test failed.
    LoadFailed,
    /// Refused by the agent.
    Refused,
}

impl AssignmentOutcome {
    /// Lowercase name, as records and logs write it.
    pub fn as_str(self) -> &'static str {
        match self {
            AssignmentOutcome::Prefetched => "prefetched",
            AssignmentOutcome::Activated => "activated",
            AssignmentOutcome::FetchFailed => "fetch_failed",
            AssignmentOutcome::LoadFailed => "load_failed",
            AssignmentOutcome::Refused => "refused",
        }
    }

    /// The outcome a name from [`AssignmentOutcome::as_str`] stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Prefetched, Self::Activated, Self::FetchFailed, Self::LoadFailed, Self::Refused]
            .into_iter()
            .find(|o| o.as_str() == name)
    }

    fn from_wire(field: &str, value: i32) -> ApiResult<Self> {
        match pb::AssignmentOutcome::try_from(value) {
            Ok(pb::AssignmentOutcome::Prefetched) => Ok(Self::Prefetched),
            Ok(pb::AssignmentOutcome::Activated) => Ok(Self::Activated),
            Ok(pb::AssignmentOutcome::FetchFailed) => Ok(Self::FetchFailed),
            Ok(pb::AssignmentOutcome::LoadFailed) => Ok(Self::LoadFailed),
            Ok(pb::AssignmentOutcome::Refused) => Ok(Self::Refused),
            _ => Err(ApiError::invalid(field, format!("unknown outcome {value}"))),
        }
    }
}

impl From<AssignmentOutcome> for pb::AssignmentOutcome {
    fn from(o: AssignmentOutcome) -> Self {
        match o {
            AssignmentOutcome::Prefetched => pb::AssignmentOutcome::Prefetched,
            AssignmentOutcome::Activated => pb::AssignmentOutcome::Activated,
            AssignmentOutcome::FetchFailed => pb::AssignmentOutcome::FetchFailed,
            AssignmentOutcome::LoadFailed => pb::AssignmentOutcome::LoadFailed,
            AssignmentOutcome::Refused => pb::AssignmentOutcome::Refused,
        }
    }
}

/// What an agent did with an assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignmentResult {
    /// The assignment answered (1-200 bytes).
    pub assignment_id: String,
    /// Outcome.
    pub outcome: AssignmentOutcome,
    /// Details (at most 4 KiB).
    pub message: String,
    /// Version running afterwards, if any.
    pub running: Option<ModelRef>,
}

impl TryFrom<pb::AssignmentResult> for AssignmentResult {
    type Error = ApiError;
    fn try_from(r: pb::AssignmentResult) -> ApiResult<Self> {
        if r.assignment_id.is_empty() {
            return Err(ApiError::invalid("assignment_id", "is required"));
        }
        check_text("assignment_id", &r.assignment_id, 200)?;
        let outcome = AssignmentOutcome::from_wire("outcome", r.outcome)?;
        check_text("message", &r.message, 4096)?;
        let running = optional_model_ref("running", r.running)?;
        Ok(AssignmentResult { assignment_id: r.assignment_id, outcome, message: r.message, running })
    }
}

impl From<AssignmentResult> for pb::AssignmentResult {
    fn from(r: AssignmentResult) -> Self {
        pb::AssignmentResult {
            assignment_id: r.assignment_id,
            outcome: pb::AssignmentOutcome::from(r.outcome) as i32,
            message: r.message,
            running: optional_model_to_wire(r.running),
        }
    }
}

/// One validated message from an agent on its session.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentMessage {
    /// Opens the session.
    Hello(Hello),
    /// Liveness and status.
    Heartbeat(Heartbeat),
    /// Result of an assignment.
    Result(AssignmentResult),
}

impl TryFrom<pb::AgentMessage> for AgentMessage {
    type Error = ApiError;
    fn try_from(m: pb::AgentMessage) -> ApiResult<Self> {
        use pb::agent_message::Kind;
        match m.kind {
            Some(Kind::Hello(h)) => {
                Hello::try_from(h).map(AgentMessage::Hello).map_err(|e| e.within("hello"))
            }
            Some(Kind::Heartbeat(h)) => {
                Heartbeat::try_from(h).map(AgentMessage::Heartbeat).map_err(|e| e.within("heartbeat"))
            }
            Some(Kind::Result(r)) => {
                AssignmentResult::try_from(r).map(AgentMessage::Result).map_err(|e| e.within("result"))
            }
            None => Err(ApiError::invalid("kind", "must be hello, heartbeat or result")),
        }
    }
}

/// W3C trace context carried inside an assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The `traceparent` value.
    pub traceparent: String,
    /// The `tracestate` value, possibly empty.
    pub tracestate: String,
}

/// A version an agent must hold or run, as stored and sent on its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Unique id, echoed in the agent's [`AssignmentResult`].
    pub assignment_id: String,
    /// The version.
    pub target: ModelRef,
    /// Load and switch to it (else pre-fetch only).
    pub activate: bool,
    /// Moves the agent to an older version on purpose.
    pub rollback: bool,
    /// Rollout the assignment belongs to, if any.
    pub rollout_id: Option<String>,
    /// Trace context of whoever assigned it, so the agent's work joins that trace.
    pub trace: Option<TraceContext>,
    /// With `rollback`: the trainer-signed rollback statement the agent verifies.
    pub rollback_statement: Option<SignedStatement>,
}

impl From<Assignment> for pb::Assignment {
    fn from(a: Assignment) -> Self {
        pb::Assignment {
            assignment_id: a.assignment_id,
            target: Some(a.target.into()),
            activate: a.activate,
            rollback: a.rollback,
            rollout_id: a.rollout_id.unwrap_or_default(),
            trace: a.trace.map(|t| pb::TraceContext { traceparent: t.traceparent, tracestate: t.tracestate }),
            rollback_statement: a.rollback_statement.map(Into::into),
        }
    }
}

/// A validated `Assign` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignSpec {
    /// Agents by id (deduplicated, sorted) or by a non-empty selector.
    pub targets: Targets,
    /// The version.
    pub target: ModelRef,
    /// Load and switch to it (else pre-fetch only).
    pub activate: bool,
    /// Moves agents to an older version on purpose.
    pub rollback: bool,
    /// Rollout the assignment belongs to, if any.
    pub rollout_id: Option<String>,
    /// With `rollback`: the trainer-signed rollback statement relayed to the agents.
    pub rollback_statement: Option<SignedStatement>,
}

impl TryFrom<pb::AssignRequest> for AssignSpec {
    type Error = ApiError;
    fn try_from(r: pb::AssignRequest) -> ApiResult<Self> {
        let targets = match (r.agent_ids.is_empty(), r.selector.trim().is_empty()) {
            (true, true) => return Err(ApiError::invalid("agent_ids", "give agent_ids or a selector")),
            (false, false) => {
                return Err(ApiError::invalid("selector", "give agent_ids or a selector, not both"));
            }
            (false, true) => {
                if r.agent_ids.len() > MAX_ASSIGN_AGENTS {
                    return Err(ApiError::invalid("agent_ids", format!("at most {MAX_ASSIGN_AGENTS}")));
                }
                let mut ids = r
                    .agent_ids
                    .iter()
                    .enumerate()
                    .map(|(i, a)| AgentId::parse(&format!("agent_ids[{i}]"), a))
                    .collect::<ApiResult<Vec<_>>>()?;
                ids.sort();
                ids.dedup();
                Targets::Agents(ids)
            }
            (true, false) => {
                let selector = LabelSelector::parse("selector", &r.selector)?;
                if selector.0.is_empty() {
                    return Err(ApiError::invalid("selector", "needs at least one key=value"));
                }
                Targets::Selector(selector)
            }
        };
        let target = required("target", r.target)?;
        let rollout_id = match r.rollout_id.as_str() {
            "" => None,
            id if id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(ApiError::invalid(
                    "rollout_id",
                    "must be at most 128 printable ASCII characters",
                ));
            }
            id => Some(id.to_string()),
        };
        let rollback_statement = r
            .rollback_statement
            .map(SignedStatement::try_from)
            .transpose()
            .map_err(|e| e.within("rollback_statement"))?;
        Ok(AssignSpec {
            targets,
            target,
            activate: r.activate,
            rollback: r.rollback,
            rollout_id,
            rollback_statement,
        })
    }
}

impl From<Summary> for pb::Summary {
    fn from(s: Summary) -> Self {
        pb::Summary {
            agent_id: s.agent_id.0,
            seq: s.seq,
            window_start: Some(s.window_start.into()),
            window_end: Some(s.window_end.into()),
            model: Some(s.model.into()),
            label_counts: s
                .label_counts
                .into_iter()
                .map(|(label, count)| pb::LabelCount { label, count })
                .collect(),
            confidence_histogram: s.confidence_histogram,
            latency_p50_ms: s.latency_ms[0],
            latency_p95_ms: s.latency_ms[1],
            latency_p99_ms: s.latency_ms[2],
            records: s.records,
            raw_bytes: s.raw_bytes,
            bad_records: s.bad_records,
            hard_examples: s
                .hard_examples
                .into_iter()
                .map(|h| pb::HardExample {
                    text: h.text,
                    decision: h.decision,
                    scores: h
                        .scores
                        .into_iter()
                        .map(|sc| pb::LabelScore {
                            label: sc.label,
                            logprob: sc.logprob,
                            probability: sc.probability,
                        })
                        .collect(),
                })
                .collect(),
            spool_dropped: s.spool_dropped,
        }
    }
}

/// Which summaries `ListSummaries` and `WatchSummaries` return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryQuery {
    /// Only this agent.
    pub agent_id: Option<AgentId>,
    /// Only this model.
    pub model: Option<ModelName>,
    /// Only this version of `model` (never set without `model`).
    pub version: Option<u64>,
    /// Only windows ending at or after this instant.
    pub window_start: Option<SystemTime>,
    /// Only windows ending before this instant.
    pub window_end: Option<SystemTime>,
    /// At most this many (1-[`DEFAULT_SUMMARY_LIMIT`] when unset).
    pub limit: usize,
}

impl SummaryQuery {
    /// Whether a summary passes every filter (the limit aside).
    pub fn matches(&self, s: &Summary) -> bool {
        self.agent_id.as_ref().is_none_or(|a| *a == s.agent_id)
            && self.model.as_ref().is_none_or(|m| *m == s.model.model)
            && self.version.is_none_or(|v| v == s.model.version)
            && self.window_start.is_none_or(|t| s.window_end >= t)
            && self.window_end.is_none_or(|t| s.window_end < t)
    }
}

impl TryFrom<pb::ListSummariesRequest> for SummaryQuery {
    type Error = ApiError;
    fn try_from(r: pb::ListSummariesRequest) -> ApiResult<Self> {
        let agent_id =
            (!r.agent_id.is_empty()).then(|| AgentId::parse("agent_id", &r.agent_id)).transpose()?;
        let (model, version) = match r.model {
            None => (None, None),
            Some(m) if m.model.is_empty() => {
                if m.version != 0 {
                    return Err(ApiError::invalid("model.model", "is required when a version is given"));
                }
                (None, None)
            }
            Some(m) => {
                (Some(ModelName::parse("model.model", &m.model)?), (m.version != 0).then_some(m.version))
            }
        };
        let window = r.window.unwrap_or_default();
        let window_start = window.start.as_ref().map(|t| timestamp("window.start", t)).transpose()?;
        let window_end = window.end.as_ref().map(|t| timestamp("window.end", t)).transpose()?;
        if let (Some(s), Some(e)) = (window_start, window_end)
            && e < s
        {
            return Err(ApiError::invalid("window.end", "is before window.start"));
        }
        let limit = match r.limit as usize {
            0 => DEFAULT_SUMMARY_LIMIT,
            n => n.min(DEFAULT_SUMMARY_LIMIT),
        };
        Ok(SummaryQuery { agent_id, model, version, window_start, window_end, limit })
    }
}

#[cfg(test)]
mod tests;
