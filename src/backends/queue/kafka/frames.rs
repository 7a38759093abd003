//! The payload of a response message: one or more frames, each an event of
//! one request. Workers coalesce the frames that are waiting for the same edge
//! into one message, so under load the broker handles a message per batch,
//! not per token; when idle, every frame leaves at once.
//!
//! The layout is in `docs/design.md` ("The Kafka protocol").

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

/// Length of the frame at the start of `bytes`, if one is there whole.
fn frame_len(bytes: &[u8]) -> Option<usize> {
    let id_len = usize::from(u16::from_be_bytes(
        bytes.get(HEADER_LEN - 2..HEADER_LEN)?.try_into().ok()?,
    ));
    let at = HEADER_LEN + id_len;
    let payload_len = u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
    let len = at + 4 + payload_len;
    (bytes.len() >= len).then_some(len)
}

/// A part of a batch of frames, as [`split`] cuts it.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Bytes of the batch to send as one message.
    Message(std::ops::Range<usize>),
    /// A frame longer than any message may be, decoded.
    TooLarge(Frame),
}

impl Piece {
    /// The piece with its byte range moved `by` bytes on (a piece of a part of a batch).
    pub fn offset(self, by: usize) -> Self {
        match self {
            Piece::Message(range) => Piece::Message(range.start + by..range.end + by),
            too_large => too_large,
        }
    }
}

/// Cuts a batch of frames into messages of at most `limit` bytes at frame
/// boundaries, in order; frames longer than `limit` come apart.
pub fn split(batch: &[u8], limit: usize) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let (mut start, mut at) = (0, 0);
    while at < batch.len() {
        let Some(len) = frame_len(&batch[at..]) else {
            break;
        };
        if len > limit || at + len - start > limit {
            if start < at {
                pieces.push(Piece::Message(start..at));
            }
            start = at;
        }
        if len > limit {
            let frame = decode(Bytes::copy_from_slice(&batch[at..at + len]));
            pieces.extend(frame.into_iter().flatten().map(Piece::TooLarge));
            start = at + len;
        }
        at += len;
    }
    if start < batch.len() {
        pieces.push(Piece::Message(start..batch.len()));
    }
    pieces
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

    #[test]
    fn batches_split_at_frame_boundaries_and_oversize_frames_come_apart() {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for (i, size) in [100, 100, 900, 100, 2000, 100].into_iter().enumerate() {
            let id = format!("req-{i}");
            encode(
                &mut buf,
                FrameKind::Chunk,
                1,
                Some(i as u64),
                &id,
                &vec![b'x'; size],
            );
            ends.push(buf.len());
        }
        let pieces = split(&buf, 1000);
        let [
            Piece::Message(first),
            Piece::Message(second),
            Piece::Message(third),
            Piece::TooLarge(frame),
            Piece::Message(last),
        ] = &pieces[..]
        else {
            panic!("{pieces:?}");
        };
        assert_eq!(
            [first, second, third, last],
            [
                &(0..ends[1]),
                &(ends[1]..ends[2]),
                &(ends[2]..ends[3]),
                &(ends[4]..ends[5])
            ],
            "messages stay under the limit, frames whole and in order"
        );
        assert_eq!((frame.request_id.as_str(), frame.seq), ("req-4", Some(4)));
        for range in [first, second, third, last] {
            assert!(decode(Bytes::copy_from_slice(&buf[range.clone()])).is_some());
        }
        assert_eq!(split(&buf, buf.len()), vec![Piece::Message(0..buf.len())]);
        assert_eq!(
            split(&buf[..ends[1]], 1000)
                .into_iter()
                .map(|p| p.offset(7))
                .collect::<Vec<_>>(),
            vec![Piece::Message(7..ends[1] + 7)]
        );
    }
}
