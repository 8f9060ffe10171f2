//! CTranslate2's `model.bin` parser on arbitrary bytes, then every
//! variable read as floats: errors, never a panic or a read out of bounds.
//! The version prefix lets the fuzzer reach the variable table at once;
//! the audio decoder gets the same bytes as an upload.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = 6u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(data);
    for b in [&bytes[..], data] {
        if let Ok(f) = hanlin_formats::ct2::Ct2File::parse(b) {
            for name in f.vars.keys() {
                let _ = f.floats(b, name);
            }
        }
    }
    let _ = hanlin_speech::audio::decode(data.to_vec(), Some("wav"), 5.0);
});
