//! Server-sent events from an upstream, read incrementally and bounded:
//! a line longer than [`MAX_LINE`] is an error, not an allocation.

/// The longest line (one `data:` payload) accepted from an upstream.
pub const MAX_LINE: usize = 4 << 20;

/// One event's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseEvent {
    /// The `data:` lines of one event, joined by newlines.
    Data(String),
    /// `data: [DONE]`: the stream ended as it should.
    Done,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    #[error("a line of the event stream is longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("the event stream is not UTF-8")]
    NotUtf8,
}

/// Bytes in, events out.
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Option<String>,
    ready: std::collections::VecDeque<SseEvent>,
}

impl SseParser {
    /// Feed the next bytes of the stream.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        self.buf.extend_from_slice(bytes);
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
            self.line(&line);
        }
        if self.buf.len() > MAX_LINE {
            return Err(SseError::LineTooLong);
        }
        Ok(())
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            if let Some(d) = self.data.take() {
                self.ready.push_back(if d == "[DONE]" {
                    SseEvent::Done
                } else {
                    SseEvent::Data(d)
                });
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
    }

    /// The next complete event, if one has arrived.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }

    /// The stream ended: an event whose blank line never came is still
    /// delivered.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if !self.buf.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            self.line(rest.trim_end_matches('\r'));
        }
        self.line("");
        self.next_event()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let text = "data: {\"a\":1}\r\n\r\n: comment\nevent: x\ndata: {\"b\":\ndata: 2}\n\ndata: [DONE]\n\n";
        for cut in 0..text.len() {
            let mut p = SseParser::default();
            let mut got = Vec::new();
            for part in [&text.as_bytes()[..cut], &text.as_bytes()[cut..]] {
                p.push(part).expect("push");
                while let Some(e) = p.next_event() {
                    got.push(e);
                }
            }
            assert_eq!(
                got,
                vec![
                    SseEvent::Data("{\"a\":1}".into()),
                    SseEvent::Data("{\"b\":\n2}".into()),
                    SseEvent::Done
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut p = SseParser::default();
        let chunk = vec![b'x'; 1 << 20];
        let mut r = Ok(());
        for _ in 0..5 {
            r = p.push(&chunk);
            if r.is_err() {
                break;
            }
        }
        assert_eq!(r, Err(SseError::LineTooLong));
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_kept() {
        let mut p = SseParser::default();
        p.push(b"data: {\"x\":1}").expect("push");
        assert_eq!(p.next_event(), None);
        assert_eq!(p.finish(), Some(SseEvent::Data("{\"x\":1}".into())));
    }
}
