//! A hostile file cannot make the parsers reserve memory out of proportion to
//! its size: counts are checked against the bytes present and reservations
//! are capped. A counting allocator measures the peak while parsing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The tests measure one at a time (the counters are process-wide).
static SERIAL: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Bytes allocated at the peak of `f`, above what was live before it.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - base
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// A 4 MiB GGUF whose one metadata value is an array of arrays claiming as
/// many elements as the bytes left could hold; its first element is already
/// invalid. Reserving the claimed count would take 512 Ki × size_of::<Value>()
/// (16 MiB).
#[test]
fn gguf_array_count_does_not_reserve_memory_ahead() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const SIZE: usize = 4 << 20;
    let mut b = Vec::with_capacity(SIZE + 64);
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    put_str(&mut b, "x");
    b.extend_from_slice(&9u32.to_le_bytes()); // array
    b.extend_from_slice(&9u32.to_le_bytes()); // of arrays
    let n_at = b.len();
    b.extend_from_slice(&0u64.to_le_bytes());
    // First element: an array of u8 with an impossible count.
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    b.resize(SIZE, 0);
    // An array takes at least 8 bytes, so this count passes the size check.
    let left = ((SIZE - n_at - 8) / 8) as u64;
    b[n_at..n_at + 8].copy_from_slice(&left.to_le_bytes());

    let mut result = None;
    let peak = peak_during(|| result = Some(hanlin_formats::gguf::parse(&b)));
    let err = match result {
        Some(Err(e)) => e.to_string(),
        other => panic!("a hostile file parsed: {other:?}"),
    };
    assert!(err.contains("impossible"), "unexpected error: {err}");
    assert!(
        peak < 1 << 20,
        "parsing a 4 MiB file reserved {peak} bytes at its peak"
    );
}
