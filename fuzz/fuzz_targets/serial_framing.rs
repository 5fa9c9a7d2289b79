//! Serial framing: a framer (delimiter, fixed length or start/end markers, and a bounded
//! frame length) chosen by the first bytes, fed the rest in chunks of input-chosen sizes.
//! Checks the framer's documented bounds on every call.
#![no_main]

use bytes::BytesMut;
use fieldmq::drivers::serial::config::Framing;
use fieldmq::drivers::serial::{FrameCodec, FrameEvent};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

/// Markers as the configuration allows them: 1 to 4 bytes.
fn marker(data: &[u8], len: u8) -> Option<Vec<u8>> {
    let len = usize::from(len % 4) + 1;
    data.get(..len).map(<[u8]>::to_vec)
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let [mode, max, len_a, len_b] = *head;
    let max_frame = usize::from(max) + 1;
    let (framing, rest) = match mode % 3 {
        0 => {
            let Some(delimiter) = marker(rest, len_a) else {
                return;
            };
            let n = delimiter.len();
            (Framing::Delimiter(delimiter), &rest[n..])
        }
        1 => (
            Framing::FixedLength(usize::from(len_a).min(max_frame - 1) + 1),
            rest,
        ),
        _ => {
            let Some(start) = marker(rest, len_a) else {
                return;
            };
            let Some(end) = marker(&rest[start.len()..], len_b) else {
                return;
            };
            let n = start.len() + end.len();
            (Framing::StartEnd { start, end }, &rest[n..])
        }
    };
    let markers = match &framing {
        Framing::Delimiter(d) => d.len(),
        Framing::FixedLength(_) => 0,
        Framing::StartEnd { start, end } => start.len().max(end.len()),
    };
    let mut codec = FrameCodec::new(framing.clone(), max_frame);
    let mut buf = BytesMut::new();
    // The chunk size comes from the mode byte's high bits: 1 to 32 bytes per read.
    let chunk = usize::from(mode >> 3) + 1;
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        // A decode loop as FramedRead runs it, with a bound against a framer that never
        // stops producing.
        for _ in 0..=buf.len() + 1 {
            let before = buf.len();
            match codec.decode(&mut buf).expect("the framer never errors") {
                None => break,
                Some(FrameEvent::Frame(frame)) => {
                    assert!(
                        frame.len() <= max_frame,
                        "frame of {} > {max_frame}",
                        frame.len()
                    );
                    match &framing {
                        Framing::FixedLength(n) => assert_eq!(frame.len(), *n),
                        Framing::Delimiter(d) => {
                            // Empty frames between two delimiters are skipped.
                            assert!(!frame.is_empty());
                            assert!(!frame.windows(d.len()).any(|w| w == &d[..]))
                        }
                        Framing::StartEnd { end, .. } => {
                            assert!(!frame.windows(end.len()).any(|w| w == &end[..]))
                        }
                    }
                }
                Some(FrameEvent::Overlong) => {}
                Some(FrameEvent::Garbled { discarded }) => assert!(discarded > 0),
            }
            assert!(buf.len() <= before, "decode grew the buffer");
        }
        assert!(
            buf.len() <= max_frame + markers,
            "{} bytes buffered, max_frame {max_frame}",
            buf.len()
        );
    }
    let _ = codec.decode_eof(&mut buf);
});
