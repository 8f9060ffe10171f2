//! An upstream server's event stream, in arbitrary pieces: the parser
//! never panics, never holds more than its line limit, and gives the same
//! events however the bytes were split.
#![no_main]

use hanlin_upstream::sse::{SseEvent, SseParser, MAX_LINE};
use libfuzzer_sys::fuzz_target;

fn events(pieces: &[&[u8]]) -> Result<Vec<SseEvent>, ()> {
    let mut p = SseParser::default();
    let mut out = Vec::new();
    for piece in pieces {
        p.push(piece).map_err(|_| ())?;
        while let Some(e) = p.next_event() {
            out.push(e);
        }
    }
    while let Some(e) = p.finish() {
        out.push(e);
    }
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let cut = data[0] as usize % data.len();
    let whole = events(&[&data[1..]]);
    let split = events(&[&data[1..1 + cut.saturating_sub(1).min(data.len() - 1)], &data[1 + cut.saturating_sub(1).min(data.len() - 1)..]]);
    if data.len() < MAX_LINE {
        assert_eq!(whole, split);
    }
});
