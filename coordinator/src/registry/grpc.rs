//! The tonic adapter of the registry: converts wire types to domain types (validating them
//! once), calls [`RegistryApi`], and maps errors through `ApiError` to `tonic::Status`.

use std::{pin::Pin, sync::Arc};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use llmchain_proto::{
    ApiError,
    model::{
        BlobRange, DeltaQuery, MAX_CHUNK_BYTES, MissingBlobsQuery, ModelName, SignedManifest, UploadHeader,
    },
    pb::{self, registry_server::RegistryServer},
};
use tonic::{Request, Response, Status, Streaming};

use super::{ModelSummary, PublishedVersion, RegistryApi};
use crate::{Error, auth::Caller};

/// Largest message the registry accepts: a 16 MiB signed manifest plus framing.
pub const MAX_DECODING_MESSAGE_BYTES: usize = 17 << 20;
/// Largest message the registry sends: `GetManifest` carries the manifest twice (signed bytes
/// and decoded), plus framing.
pub const MAX_ENCODING_MESSAGE_BYTES: usize = 34 << 20;

/// HTTP/2 frame size the server and clients should allow (`max_frame_size`): the default
/// 16 KiB splits every 1 MiB chunk into 64 frames, which costs FetchBlob about 40% of its
/// CPU in `make bench-transfer`.
pub const H2_MAX_FRAME_BYTES: u32 = 1 << 20;
/// HTTP/2 stream and connection windows the server and clients should use, so flow control
/// never stalls a blob stream on a round trip.
pub const H2_WINDOW_BYTES: u32 = 16 << 20;

/// The generated server around `registry`, with the registry's message-size limits set.
///
/// Deadlines and concurrency limits are layers of the shared server (`crate::server`).
pub fn service<R: RegistryApi>(registry: Arc<R>) -> RegistryServer<RegistryGrpc<R>> {
    RegistryServer::new(RegistryGrpc(registry))
        .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_ENCODING_MESSAGE_BYTES)
}

/// Implements the generated `Registry` trait on any [`RegistryApi`].
pub struct RegistryGrpc<R>(
    /// The registry the adapter serves.
    pub Arc<R>,
);

fn status(e: Error) -> Status {
    Status::from(ApiError::from(e))
}

fn summary(v: &PublishedVersion) -> pb::VersionSummary {
    let training = &v.manifest.training;
    pb::VersionSummary {
        version: v.manifest.id.version,
        parent_version: v.manifest.parent_version,
        mode: training.mode.clone(),
        total_bytes: v.total_bytes,
        delta_bytes: v.delta_bytes,
        metrics: training
            .metrics
            .iter()
            .map(|m| pb::Metric { name: m.name.clone(), value: m.value })
            .collect(),
        published_at: Some(v.published_at.into()),
        key_id: v.signed.key_id.clone(),
    }
}

fn signed_to_wire(s: SignedManifest) -> pb::SignedManifest {
    pb::SignedManifest { manifest: s.manifest, signature: s.signature.to_vec(), key_id: s.key_id }
}

type FetchStream = Pin<Box<dyn Stream<Item = Result<pb::FetchBlobResponse, Status>> + Send>>;

/// Turns the rest of an upload stream into chunks, checking that offsets are contiguous.
fn upload_chunks(
    first: Bytes,
    mut rest: Streaming<pb::UploadBlobRequest>,
) -> futures::stream::BoxStream<'static, crate::Result<Bytes>> {
    async_stream::try_stream! {
        let mut offset = first.len() as u64;
        if !first.is_empty() {
            yield first;
        }
        while let Some(msg) = rest.message().await.map_err(|s| Error::Api(ApiError::from(s)))? {
            if msg.offset != offset {
                Err(Error::Api(ApiError::invalid(
                    "offset",
                    format!("chunk at {} does not follow the previous one (expected {offset})", msg.offset),
                )))?;
            }
            if msg.data.len() as u64 > MAX_CHUNK_BYTES {
                Err(Error::Api(ApiError::invalid("data", format!("chunks are at most {MAX_CHUNK_BYTES} bytes"))))?;
            }
            offset += msg.data.len() as u64;
            yield Bytes::from(msg.data);
        }
    }
    .boxed()
}

#[tonic::async_trait]
impl<R: RegistryApi> pb::registry_server::Registry for RegistryGrpc<R> {
    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self.0.list_models().await.map_err(status)?;
        let models = models
            .into_iter()
            .map(|m: ModelSummary| pb::ModelSummary {
                model: m.model.to_string(),
                latest_version: m.latest_version,
                version_count: m.version_count,
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn list_versions(
        &self,
        request: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        let model = ModelName::parse("model", &request.get_ref().model)?;
        let versions = self.0.list_versions(&model).await.map_err(status)?;
        Ok(Response::new(pb::ListVersionsResponse { versions: versions.iter().map(summary).collect() }))
    }

    async fn get_manifest(
        &self,
        request: Request<pb::GetManifestRequest>,
    ) -> Result<Response<pb::GetManifestResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let model = ModelName::parse("model", &req.model)?;
        let version = (req.version > 0).then_some(req.version);
        if let Some(version) = version {
            // Before the lookup, so an agent cannot probe which versions exist.
            let wanted = llmchain_proto::model::ModelRef { model: model.clone(), version };
            caller.require_version(&wanted).await.map_err(status)?;
        }
        let v = self.0.get_manifest(&model, version).await.map_err(status)?;
        // Also on the resolved version, so "latest" is no way around it.
        caller.require_version(&v.manifest.id).await.map_err(status)?;
        Ok(Response::new(pb::GetManifestResponse {
            manifest: Some(v.manifest.into()),
            signed: Some(signed_to_wire(v.signed)),
        }))
    }

    async fn missing_blobs(
        &self,
        request: Request<pb::MissingBlobsRequest>,
    ) -> Result<Response<pb::MissingBlobsResponse>, Status> {
        let query = MissingBlobsQuery::try_from(request.into_inner())?;
        let missing = self.0.missing_blobs(query).await.map_err(status)?;
        Ok(Response::new(pb::MissingBlobsResponse {
            missing: missing.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn plan_delta(
        &self,
        request: Request<pb::PlanDeltaRequest>,
    ) -> Result<Response<pb::PlanDeltaResponse>, Status> {
        let caller = Caller::of(&request);
        let query = DeltaQuery::try_from(request.into_inner())?;
        caller.require_version(&query.target).await.map_err(status)?;
        let plan = self.0.plan_delta(query).await.map_err(status)?;
        Ok(Response::new(pb::PlanDeltaResponse {
            needed: plan.needed.into_iter().map(Into::into).collect(),
            delta_bytes: plan.delta_bytes,
            total_bytes: plan.total_bytes,
        }))
    }

    async fn upload_blob(
        &self,
        request: Request<Streaming<pb::UploadBlobRequest>>,
    ) -> Result<Response<pb::UploadBlobResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| ApiError::invalid("stream", "an upload needs at least one message"))?;
        let header = UploadHeader::try_from(&first)?;
        let chunks = upload_chunks(Bytes::from(first.data), stream);
        let out = self.0.upload_blob(header, chunks).await.map_err(status)?;
        Ok(Response::new(pb::UploadBlobResponse {
            digest: out.digest.to_string(),
            size: out.size,
            already_present: out.already_present,
        }))
    }

    async fn publish_version(
        &self,
        request: Request<pb::PublishVersionRequest>,
    ) -> Result<Response<pb::PublishVersionResponse>, Status> {
        let signed = SignedManifest::try_from(request.into_inner())?;
        let v = self.0.publish(signed).await.map_err(status)?;
        Ok(Response::new(pb::PublishVersionResponse {
            id: Some(v.manifest.id.into()),
            total_bytes: v.total_bytes,
            delta_bytes: v.delta_bytes,
        }))
    }

    async fn publish_trust_document(
        &self,
        request: Request<pb::PublishTrustDocumentRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let signed =
            request.into_inner().document.ok_or_else(|| ApiError::invalid("document", "is required"))?;
        let signed =
            llmchain_proto::model::SignedStatement::try_from(signed).map_err(|e| e.within("document"))?;
        self.0.publish_trust_document(signed).await.map_err(status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_trust_document(
        &self,
        _request: Request<pb::GetTrustDocumentRequest>,
    ) -> Result<Response<pb::GetTrustDocumentResponse>, Status> {
        let document = self.0.trust_document().await.map_err(status)?.map(Into::into);
        Ok(Response::new(pb::GetTrustDocumentResponse { document }))
    }

    type FetchBlobStream = FetchStream;

    async fn fetch_blob(
        &self,
        request: Request<pb::FetchBlobRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        let caller = Caller::of(&request);
        let range = BlobRange::try_from(request.into_inner())?;
        caller.require_blob(&range.digest).await.map_err(status)?;
        let fetch = self.0.fetch_blob(range).await.map_err(status)?;
        let total_size = fetch.total_size;
        let stream = fetch.chunks.map(move |chunk| {
            chunk
                .map(|c| pb::FetchBlobResponse { offset: c.offset, data: Vec::from(c.data), total_size })
                .map_err(status)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
