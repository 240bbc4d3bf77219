//! The tonic adapter of the registry: converts wire types to domain types (validating them
//! once), calls [`RegistryApi`], and maps errors through `ApiError` to `tonic::Status`.
//!
//! `FetchBlob` responses skip tonic's encoder ([`RegistryService`]): the encoder copies every
//! message into its own buffer, and that copy was the largest part of the CPU FetchBlob spends
//! beyond a raw TCP copy in `make bench-transfer`. Each chunk goes out as two HTTP/2 DATA
//! frames instead, a few bytes of gRPC and protobuf header and then the blob's own buffer.
//! The bytes on the wire are an ordinary gRPC message (protobuf allows fields in any order;
//! `data` comes last), so every gRPC client reads them as before.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt, future::BoxFuture};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use llmchain_proto::{
    ApiError,
    // FETCH_BLOB_PATH: the one method `RegistryService` answers itself.
    fetch::{FETCH_BLOB_PATH, GRPC_PREFIX_BYTES},
    model::{
        BlobRange, DeltaQuery, MAX_CHUNK_BYTES, MissingBlobsQuery, ModelName, SignedManifest, UploadHeader,
    },
    pb::{self, registry_server::RegistryServer},
};
use prost::Message;
use tonic::{Request, Response, Status, Streaming, server::NamedService};

use super::{ModelSummary, PublishedVersion, RegistryApi};
use crate::{Error, auth::Caller};

/// Largest message the registry accepts: a 16 MiB signed manifest plus framing.
pub const MAX_DECODING_MESSAGE_BYTES: usize = 17 << 20;
/// Largest message the registry sends: `GetManifest` carries the manifest twice (signed bytes
/// and decoded), plus framing.
pub const MAX_ENCODING_MESSAGE_BYTES: usize = 34 << 20;

/// HTTP/2 frame size the server and clients should allow (`max_frame_size`; a sender uses the
/// size its peer allows). The default 16 KiB splits every 1 MiB chunk into 64 frames, which
/// cost FetchBlob about 40% of its CPU in `make bench-transfer`. A default 1 MiB chunk is a
/// message of 1 MiB plus 17 bytes (gRPC and protobuf headers); the spare 16 KiB keeps it in
/// one frame, where exactly 1 MiB split it into two and made the receiver grow (copy) its
/// decode buffer for every message.
pub const H2_MAX_FRAME_BYTES: u32 = (1 << 20) + (16 << 10);
/// HTTP/2 stream and connection windows the server and clients should use, so flow control
/// never stalls a blob stream on a round trip.
pub const H2_WINDOW_BYTES: u32 = 16 << 20;

/// The registry's gRPC service around `registry`, with the registry's message-size limits set.
///
/// Deadlines and concurrency limits are layers of the shared server (`crate::server`).
pub fn service<R: RegistryApi>(registry: Arc<R>) -> RegistryService<R> {
    let generated = RegistryServer::new(RegistryGrpc(Arc::clone(&registry)))
        .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_ENCODING_MESSAGE_BYTES);
    RegistryService { generated, registry }
}

impl<R> RegistryService<R> {
    /// Replaces the largest request message the generated methods accept (`FetchBlob`
    /// requests have their own, smaller limit).
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.generated = self.generated.max_decoding_message_size(limit);
        self
    }
}

/// Largest `FetchBlob` request body accepted (a digest and three integers need under 100 bytes).
const MAX_FETCH_REQUEST_BYTES: usize = 64 << 10;

/// The generated registry server, except that `FetchBlob` responses are written without
/// copying the blob's bytes (see the module docs).
pub struct RegistryService<R> {
    generated: RegistryServer<RegistryGrpc<R>>,
    registry: Arc<R>,
}

impl<R> Clone for RegistryService<R> {
    fn clone(&self) -> Self {
        RegistryService { generated: self.generated.clone(), registry: Arc::clone(&self.registry) }
    }
}

impl<R> NamedService for RegistryService<R> {
    const NAME: &'static str = pb::registry_server::SERVICE_NAME;
}

impl<R: RegistryApi> tower::Service<http::Request<tonic::body::Body>> for RegistryService<R> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() == FETCH_BLOB_PATH {
            let registry = Arc::clone(&self.registry);
            Box::pin(async move {
                Ok(match fetch_blob_frames(registry, request).await {
                    Ok(frames) => {
                        let mut response =
                            http::Response::new(tonic::body::Body::new(StreamBody::new(frames)));
                        response.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/grpc"),
                        );
                        response
                    }
                    Err(status) => status.into_http(),
                })
            })
        } else {
            Box::pin(self.generated.call(request))
        }
    }
}

/// Decodes a unary request body: one uncompressed length-prefixed message.
fn decode_request(body: &[u8]) -> Result<pb::FetchBlobRequest, Status> {
    let invalid = |reason: &str| Status::from(ApiError::invalid("request", reason));
    let (prefix, message) = body
        .split_at_checked(GRPC_PREFIX_BYTES)
        .ok_or_else(|| invalid("the body is shorter than a grpc message prefix"))?;
    if prefix[0] != 0 {
        return Err(invalid("compressed FetchBlob requests are not supported"));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if message.len() != len {
        return Err(invalid("the body is not exactly one message"));
    }
    pb::FetchBlobRequest::decode(message).map_err(|e| invalid(&format!("undecodable message: {e}")))
}

/// Everything of one `FetchBlobResponse` message but the bytes of `data`: the gRPC prefix,
/// `offset` and `total_size`, then the key and length of `data`, whose bytes follow.
fn message_head(offset: u64, total_size: u64, data_len: usize) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let fields = pb::FetchBlobResponse { offset, data: Bytes::new(), total_size };
    // Like prost, an empty `data` is left out.
    let data_key_len = if data_len > 0 { key_len(2) + encoded_len_varint(data_len as u64) } else { 0 };
    let head_len = fields.encoded_len() + data_key_len;
    let mut head = BytesMut::with_capacity(GRPC_PREFIX_BYTES + head_len);
    head.put_u8(0);
    // At most MAX_CHUNK_BYTES of data plus a few header bytes: it fits a u32.
    head.put_u32((head_len + data_len) as u32);
    fields.encode_raw(&mut head);
    if data_len > 0 {
        encode_key(2, WireType::LengthDelimited, &mut head);
        encode_varint(data_len as u64, &mut head);
    }
    head.freeze()
}

/// The HTTP/2 trailers that end a gRPC response with `status`.
fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if let Err(e) = status.add_header(&mut map) {
        // Only a message that is not a valid header value fails; say so with the code kept.
        map.clear();
        let fallback = Status::new(status.code(), format!("unencodable error message ({e})"));
        let _ = fallback.add_header(&mut map);
    }
    map
}

/// `FetchBlob` as the generated adapter does it (same checks, same errors), answered with
/// response frames instead of messages.
async fn fetch_blob_frames<R: RegistryApi>(
    registry: Arc<R>,
    request: http::Request<tonic::body::Body>,
) -> Result<impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static, Status> {
    let (parts, body) = request.into_parts();
    let caller = parts.extensions.get::<Caller>().cloned().unwrap_or_default();
    let body = Limited::new(body, MAX_FETCH_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| Status::from(ApiError::invalid("request", format!("unreadable body: {e}"))))?
        .to_bytes();
    let range = BlobRange::try_from(decode_request(&body)?)?;
    caller.require_blob(&range.digest).await.map_err(status)?;
    let fetch = registry.fetch_blob(range).await.map_err(status)?;
    let (total_size, mut chunks) = (fetch.total_size, fetch.chunks);
    Ok(async_stream::stream! {
        let mut end = Status::ok("");
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(c) => {
                    yield Ok(Frame::data(message_head(c.offset, total_size, c.data.len())));
                    yield Ok(Frame::data(c.data));
                }
                Err(e) => {
                    end = status(e);
                    break;
                }
            }
        }
        yield Ok(Frame::trailers(trailers(&end)));
    })
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

    /// Used when the generated server is served directly; [`service`] answers `FetchBlob`
    /// itself, without copying each chunk into a message.
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
                .map(|c| pb::FetchBlobResponse { offset: c.offset, data: c.data, total_size })
                .map_err(status)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_framed_chunk_is_the_message_prost_would_send() {
        for (offset, total_size, len) in
            [(0, 0, 0), (0, 5, 5), (1 << 20, 600 << 20, 1 << 20), (u64::MAX, 1, 4 << 20)]
        {
            let data: Bytes = (0..len).map(|i| (i * 7) as u8).collect();
            let mut wire = message_head(offset, total_size, data.len()).to_vec();
            wire.extend_from_slice(&data);
            let expected = pb::FetchBlobResponse { offset, data, total_size };
            assert_eq!(wire[0], 0, "uncompressed");
            let len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]) as usize;
            assert_eq!(len, expected.encoded_len());
            assert_eq!(wire.len(), GRPC_PREFIX_BYTES + len);
            assert_eq!(pb::FetchBlobResponse::decode(&wire[GRPC_PREFIX_BYTES..]).unwrap(), expected);
        }
    }

    #[test]
    fn requests_must_be_one_uncompressed_message() {
        let req = pb::FetchBlobRequest { digest: "sha256:00".into(), offset: 3, length: 4, chunk_size: 5 };
        let mut body = vec![0];
        body.extend_from_slice(&(req.encoded_len() as u32).to_be_bytes());
        body.extend_from_slice(&req.encode_to_vec());
        assert_eq!(decode_request(&body).unwrap(), req);
        let mut compressed = body.clone();
        compressed[0] = 1;
        let mut trailing = body.clone();
        trailing.push(0);
        for (bad, why) in
            [(&compressed[..], "compressed"), (&trailing[..], "one message"), (&body[..3], "prefix")]
        {
            let status = decode_request(bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains(why), "{}", status.message());
        }
    }
}
