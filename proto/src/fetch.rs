//! A `FetchBlob` client that hands out each chunk's `data` as a slice of the HTTP/2 DATA frame
//! it arrived in.
//!
//! tonic's `Streaming` copies every DATA frame into its own decode buffer before decoding, a
//! copy of every blob byte on top of the socket read; in `make bench-transfer` it was about 6%
//! of a FetchBlob client's CPU. The registry sends each chunk as two frames, the gRPC and
//! protobuf headers and then the blob's bytes (coordinator `registry::grpc`), so here a
//! message whose `data` lies within one received frame decodes without copying it. Any other
//! framing (several messages per frame, a message split over many frames, as tonic's own
//! encoder sends) still decodes, with a copy. Everything else follows tonic's client: the same
//! request headers, the same limits and the same `Status` for each failure.

use std::{collections::VecDeque, future::poll_fn};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderValue, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use prost::Message;
use tonic::{Code, Status, client::GrpcService};

use crate::pb;

/// Path of the `FetchBlob` method.
pub const FETCH_BLOB_PATH: &str = "/llmchain.v1.Registry/FetchBlob";
/// Length of the gRPC message prefix: a compression flag and a big-endian u32 length.
pub const GRPC_PREFIX_BYTES: usize = 5;

/// Starts a `FetchBlob` call through `service` (a channel, or a channel wrapped in layers such
/// as an interceptor) and returns its chunks once the response headers arrived.
///
/// `max_message` is the largest message accepted, like tonic's `max_decoding_message_size`.
pub async fn fetch_blob<T>(
    service: &mut T,
    request: pb::FetchBlobRequest,
    max_message: usize,
) -> Result<BlobChunks<T::ResponseBody>, Status>
where
    T: GrpcService<tonic::body::Body>,
    T::ResponseBody: Body<Data = Bytes> + Unpin,
    <T::ResponseBody as Body>::Error: Into<tonic::codegen::StdError>,
{
    let mut body = BytesMut::with_capacity(GRPC_PREFIX_BYTES + request.encoded_len());
    body.put_u8(0);
    // A digest and three integers: far below u32::MAX.
    body.put_u32(request.encoded_len() as u32);
    request.encode_raw(&mut body);
    let mut http = http::Request::new(tonic::body::Body::new(Full::new(body.freeze())));
    *http.method_mut() = http::Method::POST;
    *http.uri_mut() = http::Uri::from_static(FETCH_BLOB_PATH);
    *http.version_mut() = http::Version::HTTP_2;
    http.headers_mut().insert(header::TE, HeaderValue::from_static("trailers"));
    http.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));

    poll_fn(|cx| service.poll_ready(cx)).await.map_err(|e| Status::from_error(e.into()))?;
    let response = service.call(http).await.map_err(|e| Status::from_error(e.into()))?;
    // A trailers-only response carries its status in the headers.
    let early = Status::from_header_map(response.headers());
    if let Some(status) = &early
        && status.code() != Code::Ok
    {
        return Err(status.clone());
    }
    let (parts, body) = response.into_parts();
    let mut chunks = BlobChunks::new(parts.status, body, max_message);
    chunks.finished = early.is_some();
    Ok(chunks)
}

/// The response stream of one `FetchBlob` call.
pub struct BlobChunks<B> {
    body: B,
    /// Received bytes not yet decoded, in the frames they arrived in.
    frames: Frames,
    /// Length of the message whose prefix has been read, while its bytes are awaited.
    pending: Option<usize>,
    max_message: usize,
    /// HTTP status of the response, for a status when trailers are missing.
    http_status: StatusCode,
    /// The stream ended (trailers, end of body, or an error already returned).
    finished: bool,
}

impl<B> BlobChunks<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    fn new(http_status: StatusCode, body: B, max_message: usize) -> Self {
        BlobChunks {
            body,
            frames: Frames::default(),
            pending: None,
            max_message,
            http_status,
            finished: false,
        }
    }

    /// The next chunk, `None` once the call ended with an OK status, or the call's error status
    /// (once; `None` after it).
    pub async fn message(&mut self) -> Result<Option<pb::FetchBlobResponse>, Status> {
        let next = self.next_message().await;
        if next.is_err() {
            self.finished = true;
        }
        next
    }

    async fn next_message(&mut self) -> Result<Option<pb::FetchBlobResponse>, Status> {
        loop {
            if let Some(message) = self.decode()? {
                return Ok(Some(message));
            }
            if self.finished {
                return Ok(None);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.frames.push(data),
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.finished = true;
                            check_status(Status::from_header_map(&trailers), self.http_status)?;
                        }
                    }
                },
                Some(Err(e)) => return Err(Status::from_error(e.into())),
                None => {
                    self.finished = true;
                    if self.frames.remaining() > 0 || self.pending.is_some() {
                        return Err(Status::internal("unexpected eof decoding stream"));
                    }
                    check_status(None, self.http_status)?;
                }
            }
        }
    }

    /// Decodes one message from the received bytes, if they hold a whole one.
    fn decode(&mut self) -> Result<Option<pb::FetchBlobResponse>, Status> {
        let len = match self.pending {
            Some(len) => len,
            None if self.frames.remaining() >= GRPC_PREFIX_BYTES => {
                if self.frames.get_u8() != 0 {
                    return Err(Status::internal("compressed FetchBlob messages are not supported"));
                }
                let len = self.frames.get_u32() as usize;
                if len > self.max_message {
                    return Err(Status::out_of_range(format!(
                        "decoded message length too large: found {len} bytes, the limit is: {} bytes",
                        self.max_message
                    )));
                }
                self.pending = Some(len);
                len
            }
            None => return Ok(None),
        };
        if self.frames.remaining() < len {
            return Ok(None);
        }
        self.pending = None;
        let mut message = (&mut self.frames).take(len);
        let decoded = pb::FetchBlobResponse::decode(&mut message)
            .map_err(|e| Status::internal(format!("undecodable FetchBlob message: {e}")))?;
        Ok(Some(decoded))
    }
}

/// The call's outcome from its final status (`None` when the trailers had none), as tonic
/// infers it.
fn check_status(status: Option<Status>, http_status: StatusCode) -> Result<(), Status> {
    match status {
        Some(s) if s.code() == Code::Ok => Ok(()),
        Some(s) => Err(s),
        None if http_status == StatusCode::OK => Err(Status::unknown(
            "protocol error: missing grpc-status trailer, stream was terminated without a final status",
        )),
        None => {
            // https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md
            let code = match http_status {
                StatusCode::BAD_REQUEST => Code::Internal,
                StatusCode::UNAUTHORIZED => Code::Unauthenticated,
                StatusCode::FORBIDDEN => Code::PermissionDenied,
                StatusCode::NOT_FOUND => Code::Unimplemented,
                StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
                _ => Code::Unknown,
            };
            let message =
                format!("grpc-status header missing, mapped from HTTP status code {}", http_status.as_u16());
            Err(Status::new(code, message))
        }
    }
}

/// Received bytes as the frames they arrived in: reading a run of bytes that lies within one
/// frame (`copy_to_bytes`, which prost uses for `bytes` fields) slices that frame.
#[derive(Default)]
struct Frames {
    queue: VecDeque<Bytes>,
    len: usize,
}

impl Frames {
    fn push(&mut self, frame: Bytes) {
        if !frame.is_empty() {
            self.len += frame.len();
            self.queue.push_back(frame);
        }
    }
}

impl Buf for Frames {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.queue.front().map_or(&[], |b| b.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end of the received frames");
        self.len -= cnt;
        while cnt > 0 {
            let front = self.queue.front_mut().expect("len counts the queued frames");
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.queue.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.len, "copy_to_bytes past the end of the received frames");
        match self.queue.front_mut() {
            Some(front) if front.len() >= len => {
                let out = front.split_to(len);
                self.len -= len;
                if front.is_empty() {
                    self.queue.pop_front();
                }
                out
            }
            _ => {
                let mut out = BytesMut::with_capacity(len);
                out.put(self.take(len));
                out.freeze()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures::executor::block_on;
    use http_body::Frame;
    use http_body_util::StreamBody;

    use super::*;

    type TestBody = StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    fn body(frames: Vec<Frame<Bytes>>) -> TestBody {
        StreamBody::new(futures::stream::iter(frames.into_iter().map(Ok).collect::<Vec<_>>()))
    }

    fn trailers(code: Code, message: &str) -> Frame<Bytes> {
        let mut map = http::HeaderMap::new();
        Status::new(code, message).add_header(&mut map).unwrap();
        Frame::trailers(map)
    }

    /// A message as tonic's encoder sends it: prefix and message in one buffer.
    fn encoded(m: &pb::FetchBlobResponse) -> Bytes {
        let mut out = BytesMut::new();
        out.put_u8(0);
        out.put_u32(m.encoded_len() as u32);
        m.encode_raw(&mut out);
        out.freeze()
    }

    fn chunk(offset: u64, len: usize) -> pb::FetchBlobResponse {
        let data: Bytes = (0..len).map(|i| (i as u64 * 31 + offset) as u8).collect();
        pb::FetchBlobResponse { offset, data, total_size: 1 << 30 }
    }

    fn read_all(frames: Vec<Frame<Bytes>>) -> (Vec<pb::FetchBlobResponse>, Result<(), Status>) {
        let mut chunks = BlobChunks::new(StatusCode::OK, body(frames), 4 << 20);
        let mut out = Vec::new();
        block_on(async {
            loop {
                match chunks.message().await {
                    Ok(Some(m)) => out.push(m),
                    Ok(None) => return (out, Ok(())),
                    Err(e) => {
                        assert!(matches!(chunks.message().await, Ok(None)), "an error is returned once");
                        return (out, Err(e));
                    }
                }
            }
        })
    }

    #[test]
    fn data_that_arrives_in_its_own_frame_is_not_copied() {
        use prost::encoding::{WireType, encode_key, encode_varint};
        let m = chunk(1 << 20, 300_000);
        // As the registry sends it: the prefix, the other fields and the data's key and length
        // in one frame, then the data's bytes (protobuf allows fields in any order).
        let fields = pb::FetchBlobResponse { data: Bytes::new(), ..m.clone() };
        let mut head = BytesMut::new();
        head.put_u8(0);
        head.put_u32(m.encoded_len() as u32);
        fields.encode_raw(&mut head);
        encode_key(2, WireType::LengthDelimited, &mut head);
        encode_varint(m.data.len() as u64, &mut head);
        let data = m.data.clone();
        let (got, end) =
            read_all(vec![Frame::data(head.freeze()), Frame::data(data.clone()), trailers(Code::Ok, "")]);
        end.unwrap();
        assert_eq!(got, vec![m]);
        assert_eq!(got[0].data.as_ptr(), data.as_ptr(), "data is a slice of the received frame");
    }

    #[test]
    fn any_framing_decodes_to_the_same_messages() {
        let messages: Vec<_> = (0..5).map(|i| chunk(i * 1000, [0, 1, 999, 70_000, 3][i as usize])).collect();
        let wire: Vec<u8> = messages.iter().flat_map(|m| encoded(m).to_vec()).collect();
        for size in [1, 4, 5, 7, 16 << 10, wire.len()] {
            let mut frames: Vec<_> =
                wire.chunks(size).map(|c| Frame::data(Bytes::copy_from_slice(c))).collect();
            frames.push(trailers(Code::Ok, ""));
            let (got, end) = read_all(frames);
            end.unwrap();
            assert_eq!(got, messages, "frames of {size} bytes");
        }
    }

    #[test]
    fn the_final_status_ends_the_stream_with_its_code_and_message() {
        let m = chunk(0, 10);
        let (got, end) =
            read_all(vec![Frame::data(encoded(&m)), trailers(Code::DataLoss, "blob is corrupt")]);
        assert_eq!(got, vec![m]);
        let e = end.unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::DataLoss, "blob is corrupt"));
    }

    #[test]
    fn broken_streams_are_errors() {
        let wire = encoded(&chunk(0, 100));
        let cases = [
            (vec![Frame::data(wire.clone())], Code::Unknown, "missing grpc-status"),
            (vec![Frame::data(wire.slice(..50))], Code::Internal, "unexpected eof"),
            (vec![Frame::data(wire.slice(..3))], Code::Internal, "unexpected eof"),
            (vec![Frame::data(Bytes::from_static(&[1, 0, 0, 0, 0]))], Code::Internal, "compressed"),
            (vec![Frame::data(Bytes::from_static(&[0, 0, 0x50, 0, 1]))], Code::OutOfRange, "too large"),
            (vec![Frame::data(Bytes::from_static(&[0, 0, 0, 0, 2, 0x12, 5]))], Code::Internal, "undecodable"),
        ];
        for (frames, code, why) in cases {
            let e = read_all(frames).1.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
            assert!(e.message().contains(why), "{e:?}");
        }
    }

    #[test]
    fn a_missing_status_maps_from_the_http_status() {
        let mut chunks = BlobChunks::new(StatusCode::SERVICE_UNAVAILABLE, body(vec![]), 1 << 20);
        let e = block_on(chunks.message()).unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("503"), "{e:?}");
    }
}
