//! Cutting a serial byte stream into frames: a tokio-util [`Decoder`] for delimiter,
//! fixed-length and start/end framing.
//!
//! Invariants:
//! - The buffer never holds more than `max_frame` plus one marker of unframed bytes after
//!   a decode call, whatever the device sends: an over-long frame is discarded as soon as
//!   it passes `max_frame`, and the decoder then skips bytes until the next delimiter (or
//!   start marker) before it frames again (resynchronisation).
//! - Every discarded frame is reported once, as [`FrameEvent::Overlong`] or
//!   [`FrameEvent::Garbled`], so the port task can count it and warn.
//! - Markers are not part of the frame. Empty frames (two delimiters in a row) are skipped.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::config::{find, Framing};

/// What the decoder found in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameEvent {
    /// One frame, markers removed.
    Frame(Bytes),
    /// A frame passed `max_frame` and is being discarded up to the next delimiter / start.
    Overlong,
    /// Bytes that belong to no frame (start/end framing: data outside the markers, or a
    /// frame cut short by a new start marker) were discarded.
    Garbled { discarded: usize },
}

/// The codec of one serial device: frames in, raw bytes out.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    framing: Framing,
    max_frame: usize,
    /// Skipping an over-long frame: drop everything up to the next marker.
    discarding: bool,
    /// Start/end framing: a start marker has been seen and the frame body begins at 0.
    in_frame: bool,
    /// Where the next search for the end marker starts (avoids rescanning).
    searched: usize,
    /// Start/end framing: bytes outside any frame dropped since the last report.
    garbage: usize,
}

impl FrameCodec {
    pub fn new(framing: Framing, max_frame: usize) -> FrameCodec {
        FrameCodec {
            framing,
            max_frame: max_frame.max(1),
            discarding: false,
            in_frame: false,
            searched: 0,
            garbage: 0,
        }
    }

    /// Forgets any partial frame (after the port was reopened).
    pub fn reset(&mut self) {
        self.discarding = false;
        self.in_frame = false;
        self.searched = 0;
        self.garbage = 0;
    }

    fn decode_delimited(&mut self, buf: &mut BytesMut, delimiter: &[u8]) -> Option<FrameEvent> {
        loop {
            let from = self.searched.min(buf.len());
            match find(&buf[from..], delimiter).map(|at| at + from) {
                Some(at) => {
                    self.searched = 0;
                    let frame = buf.split_to(at).freeze();
                    buf.advance(delimiter.len());
                    if self.discarding {
                        // The tail of an over-long frame: already reported.
                        self.discarding = false;
                        continue;
                    }
                    if frame.len() > self.max_frame {
                        return Some(FrameEvent::Overlong);
                    }
                    if frame.is_empty() {
                        continue;
                    }
                    return Some(FrameEvent::Frame(frame));
                }
                None => {
                    // Keep the bytes that may be the start of a split delimiter.
                    let keep = delimiter.len() - 1;
                    if self.discarding {
                        let drop = buf.len().saturating_sub(keep);
                        buf.advance(drop);
                        self.searched = 0;
                        return None;
                    }
                    if buf.len() > self.max_frame + keep {
                        let drop = buf.len() - keep;
                        buf.advance(drop);
                        self.searched = 0;
                        self.discarding = true;
                        return Some(FrameEvent::Overlong);
                    }
                    self.searched = buf.len().saturating_sub(keep);
                    return None;
                }
            }
        }
    }

    fn decode_fixed(&mut self, buf: &mut BytesMut, length: usize) -> Option<FrameEvent> {
        if buf.len() < length {
            buf.reserve(length - buf.len());
            return None;
        }
        Some(FrameEvent::Frame(buf.split_to(length).freeze()))
    }

    /// A new start marker `discarded` bytes into a frame: those bytes are reported as
    /// garbled. A start right after the start (an empty frame cut short) loses nothing and
    /// is not reported: framing simply begins again at the new start.
    fn restarted(
        &mut self,
        buf: &mut BytesMut,
        start: &[u8],
        end: &[u8],
        discarded: usize,
    ) -> Option<FrameEvent> {
        if discarded == 0 {
            return self.decode_start_end(buf, start, end);
        }
        Some(FrameEvent::Garbled { discarded })
    }

    fn decode_start_end(
        &mut self,
        buf: &mut BytesMut,
        start: &[u8],
        end: &[u8],
    ) -> Option<FrameEvent> {
        if !self.in_frame {
            match find(buf, start) {
                Some(at) => {
                    buf.advance(at + start.len());
                    let garbage = std::mem::take(&mut self.garbage) + at;
                    let was_discarding = std::mem::replace(&mut self.discarding, false);
                    self.in_frame = true;
                    self.searched = 0;
                    if garbage > 0 && !was_discarding {
                        return Some(FrameEvent::Garbled { discarded: garbage });
                    }
                }
                None => {
                    let keep = start.len() - 1;
                    let drop = buf.len().saturating_sub(keep);
                    buf.advance(drop);
                    if self.discarding {
                        return None; // the tail of an over-long frame: reported already
                    }
                    self.garbage += drop;
                    // A run of noise longer than a frame is reported now, not at the
                    // next start, and the rest of it goes quietly.
                    if self.garbage > self.max_frame {
                        let discarded = std::mem::take(&mut self.garbage);
                        self.discarding = true;
                        return Some(FrameEvent::Garbled { discarded });
                    }
                    return None;
                }
            }
        }
        // Inside a frame: look for the end marker, and for a new start that would mean
        // this frame lost its end.
        let from = self.searched.min(buf.len());
        let end_at = find(&buf[from..], end).map(|at| at + from);
        let restart_at = if start != end {
            find(&buf[from..], start).map(|at| at + from)
        } else {
            None
        };
        match (end_at, restart_at) {
            (Some(e), Some(s)) if s < e => {
                buf.advance(s);
                self.in_frame = false;
                self.searched = 0;
                self.restarted(buf, start, end, s)
            }
            (Some(e), _) => {
                let frame = buf.split_to(e).freeze();
                buf.advance(end.len());
                self.in_frame = false;
                self.searched = 0;
                if frame.len() > self.max_frame {
                    return Some(FrameEvent::Overlong);
                }
                Some(FrameEvent::Frame(frame))
            }
            (None, Some(s)) => {
                buf.advance(s);
                self.in_frame = false;
                self.searched = 0;
                self.restarted(buf, start, end, s)
            }
            (None, None) => {
                let keep = end.len().max(start.len()) - 1;
                if buf.len() > self.max_frame + keep {
                    let drop = buf.len() - keep;
                    buf.advance(drop);
                    self.in_frame = false;
                    self.discarding = true;
                    self.searched = 0;
                    return Some(FrameEvent::Overlong);
                }
                self.searched = buf.len().saturating_sub(keep);
                None
            }
        }
    }
}

impl Decoder for FrameCodec {
    type Item = FrameEvent;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<FrameEvent>, std::io::Error> {
        // The framing is cloned out so the helpers can borrow self mutably; markers are
        // a few bytes.
        let event = match self.framing.clone() {
            Framing::Delimiter(delimiter) => self.decode_delimited(buf, &delimiter),
            Framing::FixedLength(length) => self.decode_fixed(buf, length),
            Framing::StartEnd { start, end } => self.decode_start_end(buf, &start, &end),
        };
        Ok(event)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<FrameEvent>, std::io::Error> {
        match self.decode(buf)? {
            Some(event) => Ok(Some(event)),
            None => {
                // A partial frame when the port closes is lost with the port.
                buf.clear();
                self.reset();
                Ok(None)
            }
        }
    }
}

/// Writes are raw bytes (requests and rendered write templates).
impl Encoder<Bytes> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(codec: &mut FrameCodec, buf: &mut BytesMut) -> Vec<FrameEvent> {
        let mut out = Vec::new();
        while let Some(event) = codec.decode(buf).expect("decode") {
            out.push(event);
        }
        out
    }

    fn frame(text: &str) -> FrameEvent {
        FrameEvent::Frame(Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn a_frame_split_over_many_writes_is_framed_once_complete() {
        let mut codec = FrameCodec::new(Framing::Delimiter(b"\r\n".to_vec()), 64);
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        for byte in b"$GPRMC,1,2,3*00\r\nnext\r" {
            buf.extend_from_slice(&[*byte]);
            seen.extend(frames(&mut codec, &mut buf));
        }
        assert_eq!(seen, vec![frame("$GPRMC,1,2,3*00")]);
        buf.extend_from_slice(b"\n");
        assert_eq!(frames(&mut codec, &mut buf), vec![frame("next")]);
        assert!(buf.is_empty());
    }

    #[test]
    fn several_frames_in_one_write_come_out_in_order() {
        let mut codec = FrameCodec::new(Framing::Delimiter(b"\n".to_vec()), 64);
        let mut buf = BytesMut::from(&b"a\nbb\n\nccc\nd"[..]);
        assert_eq!(
            frames(&mut codec, &mut buf),
            vec![frame("a"), frame("bb"), frame("ccc")]
        );
        assert_eq!(&buf[..], b"d");
    }

    #[test]
    fn an_endless_stream_without_delimiter_stays_bounded_and_recovers() {
        let max = 100;
        let mut codec = FrameCodec::new(Framing::Delimiter(b"\r\n".to_vec()), max);
        let mut buf = BytesMut::new();
        let mut overlong = 0;
        for _ in 0..10_000 {
            buf.extend_from_slice(b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r");
            for event in frames(&mut codec, &mut buf) {
                assert_eq!(event, FrameEvent::Overlong);
                overlong += 1;
            }
            assert!(buf.len() <= max + 2, "buffer grew to {}", buf.len());
        }
        assert_eq!(overlong, 1, "one over-long frame, reported once");
        buf.extend_from_slice(b"\nok\r\n");
        assert_eq!(frames(&mut codec, &mut buf), vec![frame("ok")]);
    }

    #[test]
    fn a_long_frame_that_arrives_whole_is_dropped_and_the_next_kept() {
        let mut codec = FrameCodec::new(Framing::Delimiter(b"\n".to_vec()), 4);
        let mut buf = BytesMut::from(&b"12345\nabcd\n"[..]);
        assert_eq!(
            frames(&mut codec, &mut buf),
            vec![FrameEvent::Overlong, frame("abcd")]
        );
    }

    #[test]
    fn a_delimiter_of_any_bytes_works() {
        let mut codec = FrameCodec::new(Framing::Delimiter(vec![0x03]), 16);
        let mut buf = BytesMut::from(&b"abc\x03def\x03"[..]);
        assert_eq!(
            frames(&mut codec, &mut buf),
            vec![frame("abc"), frame("def")]
        );
    }

    #[test]
    fn fixed_length_frames_ignore_content() {
        let mut codec = FrameCodec::new(Framing::FixedLength(3), 3);
        let mut buf = BytesMut::from(&b"ab"[..]);
        assert!(frames(&mut codec, &mut buf).is_empty());
        buf.extend_from_slice(b"\ncdefg");
        assert_eq!(
            frames(&mut codec, &mut buf),
            vec![frame("ab\n"), frame("cde")]
        );
    }

    #[test]
    fn start_end_frames_skip_noise_and_resync_at_the_next_start() {
        let framing = Framing::StartEnd {
            start: vec![0x02],
            end: vec![0x03],
        };
        let mut codec = FrameCodec::new(framing, 8);
        let mut buf = BytesMut::from(&b"\x02one\x03zz\x02lost\x02two\x03"[..]);
        assert_eq!(
            frames(&mut codec, &mut buf),
            vec![
                frame("one"),
                FrameEvent::Garbled { discarded: 2 },
                FrameEvent::Garbled { discarded: 4 },
                frame("two"),
            ]
        );
        // Over-long: no end within max_frame; the next start resynchronises.
        let mut buf = BytesMut::from(&b"\x02aaaaaaaaaaaaaaaaaaaa"[..]);
        assert_eq!(frames(&mut codec, &mut buf), vec![FrameEvent::Overlong]);
        assert!(buf.len() <= 8);
        buf.extend_from_slice(b"aaaa\x03\x02ok\x03");
        assert_eq!(frames(&mut codec, &mut buf), vec![frame("ok")]);
    }

    /// Found by fuzzing: a start marker right after a start marker was reported as a
    /// garbled frame with nothing discarded.
    #[test]
    fn a_repeated_start_marker_is_not_reported_as_garbled() {
        let framing = Framing::StartEnd {
            start: b"\x02".to_vec(),
            end: b"\x03".to_vec(),
        };
        let mut codec = FrameCodec::new(framing, 32);
        let mut buf = BytesMut::from(&b"\x02\x02\x02ok\x03\x02\x02"[..]);
        assert_eq!(frames(&mut codec, &mut buf), vec![frame("ok")]);
        buf.extend_from_slice(b"again\x03");
        assert_eq!(frames(&mut codec, &mut buf), vec![frame("again")]);
        // A frame cut short by a new start still reports what it lost.
        buf.extend_from_slice(b"\x02lost\x02kept\x03");
        assert_eq!(
            frames(&mut codec, &mut buf),
            vec![FrameEvent::Garbled { discarded: 4 }, frame("kept")]
        );
    }
}
