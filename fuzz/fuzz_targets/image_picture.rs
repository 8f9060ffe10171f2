//! The picture and mask of `/v1/images/edits` on arbitrary bytes: PNG
//! decoding (any colour type, depth, interlacing), the mask read from it,
//! and the resize to the size drawn at. An error, never a panic, and never
//! more than the size limits allow (at most 4096×4096 pixels decoded).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    use hanlin_image::picture::{Picture, Start};
    let Ok(p) = Picture::from_png(data) else {
        return;
    };
    let mask = p.clone();
    if let Ok(s) = Start::new(p, Some(&mask), None) {
        let (w, h) = s.size(8);
        let init = s.init(w.min(64), h.min(64));
        assert_eq!(init.image.rgb.len(), init.image.width * init.image.height * 3);
    }
});
