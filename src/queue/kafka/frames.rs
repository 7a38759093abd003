//! The payload of a response message: one or more frames, each an event of
//! one request. Workers coalesce the frames that are waiting for the same edge
//! into one message, so under load the broker handles a message per batch,
//! not per token; when idle, every frame leaves at once.
//!
//! Frame layout (big-endian): kind `u8`, attempt `u32`, sequence `u64`
//! (`u64::MAX` for none), request-id length `u16`, request id, payload length
//! `u32`, payload.

use bytes::{Buf, Bytes};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Accepted = 1,
    Chunk = 2,
    Error = 3,
    Done = 4,
    Heartbeat = 5,
}

impl FrameKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Accepted,
            2 => Self::Chunk,
            3 => Self::Error,
            4 => Self::Done,
            5 => Self::Heartbeat,
            _ => return None,
        })
    }
}

/// A decoded frame; `payload` shares the message's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub attempt: u32,
    pub seq: Option<u64>,
    pub request_id: String,
    pub payload: Bytes,
}

const HEADER_LEN: usize = 1 + 4 + 8 + 2;

pub fn encode(
    out: &mut Vec<u8>,
    kind: FrameKind,
    attempt: u32,
    seq: Option<u64>,
    request_id: &str,
    payload: &[u8],
) {
    let id = request_id.as_bytes();
    let id_len = u16::try_from(id.len()).unwrap_or(u16::MAX);
    let payload_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.reserve(HEADER_LEN + id.len() + 4 + payload.len());
    out.push(kind as u8);
    out.extend_from_slice(&attempt.to_be_bytes());
    out.extend_from_slice(&seq.unwrap_or(u64::MAX).to_be_bytes());
    out.extend_from_slice(&id_len.to_be_bytes());
    out.extend_from_slice(&id[..usize::from(id_len)]);
    out.extend_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&payload[..payload_len as usize]);
}

/// Decodes every frame of a message; `None` if any part is malformed.
pub fn decode(mut bytes: Bytes) -> Option<Vec<Frame>> {
    let mut frames = Vec::new();
    while bytes.has_remaining() {
        if bytes.remaining() < HEADER_LEN {
            return None;
        }
        let kind = FrameKind::from_u8(bytes.get_u8())?;
        let attempt = bytes.get_u32();
        let seq = Some(bytes.get_u64()).filter(|s| *s != u64::MAX);
        let id_len = usize::from(bytes.get_u16());
        if bytes.remaining() < id_len + 4 {
            return None;
        }
        let request_id = String::from_utf8(bytes.split_to(id_len).to_vec()).ok()?;
        let payload_len = bytes.get_u32() as usize;
        if bytes.remaining() < payload_len {
            return None;
        }
        let payload = bytes.split_to(payload_len);
        frames.push(Frame {
            kind,
            attempt,
            seq,
            request_id,
            payload,
        });
    }
    (!frames.is_empty()).then_some(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_rejected() {
        let mut buf = Vec::new();
        encode(&mut buf, FrameKind::Accepted, 1, Some(0), "req-a", b"");
        encode(
            &mut buf,
            FrameKind::Chunk,
            2,
            Some(7),
            "req-b",
            b"data: {}\n\n",
        );
        encode(&mut buf, FrameKind::Heartbeat, 1, None, "req-a", b"");
        let frames = decode(Bytes::from(buf.clone())).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[1].request_id, "req-b");
        assert_eq!(frames[1].seq, Some(7));
        assert_eq!(frames[1].payload.as_ref(), b"data: {}\n\n");
        assert_eq!(frames[2].seq, None);
        assert!(decode(Bytes::from(buf[..buf.len() - 3].to_vec())).is_none());
        assert!(decode(Bytes::from_static(b"\x00\xffnot a sluice message")).is_none());
        assert!(decode(Bytes::new()).is_none());
    }
}
