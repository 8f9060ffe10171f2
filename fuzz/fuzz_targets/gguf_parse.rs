//! Fuzz the GGUF parser: any byte string must give Ok or a FormatError, never
//! a panic, an out-of-bounds read or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = hanlin_formats::gguf::parse(data) {
        // Every tensor the parser accepted must lie inside the buffer.
        for t in &h.tensors {
            assert!(t.offset + t.size <= data.len());
        }
    }
});
