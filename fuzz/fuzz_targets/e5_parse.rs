//! The encoder container parser on arbitrary bytes: it must return an error,
//! never panic or read out of bounds. Seeds: a valid header prefix is
//! reached quickly from "E5S1" plus mutated counts.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = b"E5S1".to_vec();
    bytes.extend_from_slice(data);
    let _ = hanlin_formats::e5::EncoderFile::parse(&bytes);
    let _ = hanlin_formats::e5::EncoderFile::parse(data);
});
