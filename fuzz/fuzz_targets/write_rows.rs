//! `hanlin write`'s row reader on arbitrary bytes, in each format: rows or
//! a clear error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for format in ["csv", "jsonl", "json"] {
        if let Ok(rows) = hanlin_write::rows::parse(data, format, None) {
            for r in &rows {
                let _ = hanlin_write::rows::leaves(&r.fields);
            }
        }
    }
});
