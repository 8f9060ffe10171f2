//! Loading work spread over the cores: reading a model file and
//! interleaving its matrices are each a list of independent pieces that
//! one thread would take one after another while the other cores idle.
//! (The engine's own thread pool, `kernels::pool`, is for the forward pass;
//! this runs before one exists, and only while a model loads.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Threads for loading work: the cores this process may use, at most eight
/// (memory bandwidth, not arithmetic, bounds it beyond that).
fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
}

/// Run `f` on every item, on up to [`threads`] threads that take the items
/// in turn (from the back). The first error is returned; after one, no
/// thread takes another item. One item, or one core, runs on the calling
/// thread.
pub fn for_each<T: Send, E: Send>(
    items: Vec<T>,
    f: impl Fn(T) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let n = threads().min(items.len());
    if n <= 1 {
        return items.into_iter().try_for_each(f);
    }
    let queue = Mutex::new(items);
    let failed = AtomicBool::new(false);
    let work = || -> Result<(), E> {
        while !failed.load(Ordering::Relaxed) {
            let Some(item) = queue.lock().ok().and_then(|mut q| q.pop()) else {
                break;
            };
            if let Err(e) = f(item) {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let others: Vec<_> = (1..n).map(|_| s.spawn(work)).collect();
        let mut result = work();
        for t in others {
            // A panic in `f` is the caller's bug: carry it on.
            let r = t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            result = result.and(r);
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_item_once_and_the_first_error_back() {
        let seen: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        let r: Result<(), ()> = for_each((0..1000).collect(), |i: usize| {
            seen[i].fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        assert_eq!(r, Ok(()));
        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));

        let done = AtomicUsize::new(0);
        let r = for_each((0..1000).collect(), |i: usize| {
            done.fetch_add(1, Ordering::Relaxed);
            if i == 990 {
                Err(i)
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err(990));
        // Items are taken from the back, so the error came early and the
        // rest were left.
        assert!(done.load(Ordering::Relaxed) < 1000);
    }
}
