//! Framing: `[u32 big-endian length][JSON payload]`, bounded by a maximum frame size.
//!
//! [`FrameCodec<In, Out>`] decodes `In` and encodes `Out`, so the agent uses
//! `FrameCodec<RequestFrame, ResponseFrame>` and the coordinator the reverse.

use std::marker::PhantomData;

use bytes::{Buf, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Default bound on one frame (a whole `Execute` with its statements and results).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
}

/// Serializes one message, refusing it if it would exceed `max_frame_bytes`. Senders
/// encode in the task that produced the message and hand the bytes to the connection's
/// writer ([`raw_codec`]), so one oversized message is an error for its own request, not
/// a broken connection for everybody sharing it.
pub fn encode_payload<T: Serialize>(item: &T, max_frame_bytes: usize) -> Result<Bytes, CodecError> {
    let payload = serde_json::to_vec(item)?;
    if payload.len() > max_frame_bytes {
        return Err(CodecError::TooLarge {
            len: payload.len(),
            max: max_frame_bytes,
        });
    }
    Ok(Bytes::from(payload))
}

/// The framing alone (`[u32 BE len][payload]`), for payloads from [`encode_payload`].
pub fn raw_codec(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(max_frame_bytes)
        .new_codec()
}

/// Decodes `In` and encodes `Out`. The buffer of a frame being read grows only with the
/// bytes that arrived (the length header reserves nothing), so a peer that announces a
/// large frame and sends little holds little memory; [`FrameCodec::set_max_frame_bytes`]
/// lowers the bound for an unauthenticated peer.
pub struct FrameCodec<In, Out> {
    inner: LengthDelimitedCodec,
    max_frame_bytes: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new(max_frame_bytes: usize) -> Self {
        let inner = raw_codec(max_frame_bytes);
        FrameCodec {
            inner,
            max_frame_bytes,
            _types: PhantomData,
        }
    }

    /// The largest frame decoded (and encoded) from now on.
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: usize) {
        self.max_frame_bytes = max_frame_bytes;
        self.inner.set_max_frame_length(max_frame_bytes);
    }
}

/// Bytes of the length header.
const HEADER_BYTES: usize = 4;

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        let Some(header) = src.get(..HEADER_BYTES) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; HEADER_BYTES];
        len_bytes.copy_from_slice(header);
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > self.max_frame_bytes {
            return Err(CodecError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        if src.len() < HEADER_BYTES + len {
            // Not whole yet; nothing is reserved for the rest (see the type's doc).
            return Ok(None);
        }
        src.advance(HEADER_BYTES);
        let frame = src.split_to(len);
        Ok(Some(serde_json::from_slice(&frame)?))
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        let payload = encode_payload(&item, self.max_frame_bytes)?;
        self.inner.encode(payload, dst)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Request, RequestFrame};

    #[test]
    fn encode_decode_and_partial_frames() {
        let mut enc: FrameCodec<RequestFrame, RequestFrame> = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        for id in 0..3 {
            enc.encode(
                RequestFrame {
                    id,
                    timeout_ms: 1,
                    body: Request::Ping,
                },
                &mut buf,
            )
            .unwrap();
        }
        // Feed byte by byte: nothing decodes until a whole frame is there.
        let all = buf.split().freeze();
        let mut got = vec![];
        let mut feed = BytesMut::new();
        for b in all.iter() {
            feed.extend_from_slice(&[*b]);
            while let Some(f) = enc.decode(&mut feed).unwrap() {
                got.push(f.id);
            }
        }
        assert_eq!(got, vec![0, 1, 2]);
    }

    #[test]
    fn oversized_frame_is_an_error_not_an_allocation() {
        let mut dec: FrameCodec<RequestFrame, RequestFrame> = FrameCodec::new(64);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(1u32 << 31).to_be_bytes());
        buf.extend_from_slice(b"xx");
        assert!(dec.decode(&mut buf).is_err());
        let big = RequestFrame {
            id: 1,
            timeout_ms: 1,
            body: Request::ListPrepared {
                gid_prefix: "x".repeat(100),
            },
        };
        assert!(matches!(
            dec.encode(big, &mut BytesMut::new()),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_frame_announced_large_reserves_nothing_until_its_bytes_arrive() {
        let mut dec: FrameCodec<RequestFrame, RequestFrame> = FrameCodec::new(1 << 30);
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(&(1u32 << 29).to_be_bytes());
        buf.extend_from_slice(b"{\"id\"");
        assert!(dec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() < 4096, "reserved {} bytes", buf.capacity());
        // A lowered bound refuses what the old one allowed.
        dec.set_max_frame_bytes(1024);
        assert!(matches!(
            dec.decode(&mut buf),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_payload_is_malformed() {
        let mut dec: FrameCodec<RequestFrame, RequestFrame> = FrameCodec::new(64);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&3u32.to_be_bytes());
        buf.extend_from_slice(b"{x}");
        assert!(matches!(
            dec.decode(&mut buf),
            Err(CodecError::Malformed(_))
        ));
    }
}
