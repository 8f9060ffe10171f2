//! A persistent thread pool for the engine's parallel kernels. Workers spin
//! briefly between jobs (ops arrive microseconds apart during a forward pass)
//! and then sleep on a condition variable.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    generation: AtomicUsize,
    pending: AtomicUsize,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    job: Mutex<Option<SendJob>>,
    wake: Condvar,
    n_threads: usize,
}

#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the pointed-to closure is `Sync` and outlives every use: `run` does
// not return before all workers have finished with it.
unsafe impl Send for SendJob {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes callers of `run` (the pool runs one job at a time).
    lock: Mutex<()>,
}

/// Spin iterations before a worker sleeps (~100 µs) and before a waiting
/// caller starts yielding its core (matters when the machine is oversubscribed).
const SPIN: usize = 20_000;
const WAIT_SPIN: usize = 2_000;

impl ThreadPool {
    /// A pool of `n_threads` (including the calling thread, which takes part).
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            job: Mutex::new(None),
            wake: Condvar::new(),
            n_threads,
        });
        let workers = (1..n_threads)
            .map(|idx| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("hanlin-worker-{idx}"))
                    .spawn(move || worker(s, idx))
                    .expect("spawning a worker thread")
            })
            .collect();
        Self {
            shared,
            workers,
            lock: Mutex::new(()),
        }
    }

    /// Threads available: physical cores are best for these kernels.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Run `f(thread_index)` on every thread of the pool and wait for all.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        let n = self.shared.n_threads;
        if n == 1 {
            f(0);
            return;
        }
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: erase the lifetime; we wait for `pending == 0` before returning.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(SendJob(job));
        s.pending.store(n - 1, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.job.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        f(0);
        let mut spins = 0usize;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < WAIT_SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Split `0..n` into chunks of `chunk` and hand them out dynamically.
    pub fn for_chunks(&self, n: usize, chunk: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        let chunk = chunk.max(1);
        let next = AtomicUsize::new(0);
        self.run(&|_| loop {
            let start = next.fetch_add(chunk, Ordering::Relaxed);
            if start >= n {
                break;
            }
            f(start..(start + chunk).min(n));
        });
    }
}

impl ThreadPool {
    /// Hand out `0..n` dynamically, as [`ThreadPool::for_chunks`] does, in
    /// chunks that shrink as the work drains: a thread takes a
    /// `2 × threads`-th of what is left, at most `max` and at least `min`
    /// items. Early chunks stay long (a decode step's threads stream their
    /// weights in long runs); the last ones are short, so a thread that
    /// takes the last chunk does not keep the others waiting for long.
    pub fn for_guided(
        &self,
        n: usize,
        min: usize,
        max: usize,
        f: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) {
        let min = min.max(1);
        let max = max.max(min);
        if min == max {
            return self.for_chunks(n, min, f);
        }
        let share = 2 * self.n_threads();
        let next = AtomicUsize::new(0);
        self.run(&|_| {
            let mut start = next.load(Ordering::Relaxed);
            while start < n {
                let end = (start + ((n - start) / share).clamp(min, max)).min(n);
                match next.compare_exchange_weak(start, end, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => {
                        f(start..end);
                        start = next.load(Ordering::Relaxed);
                    }
                    Err(now) => start = now,
                }
            }
        });
    }
}

fn worker(s: Arc<Shared>, idx: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0usize;
        loop {
            let g = s.generation.load(Ordering::SeqCst);
            if g != seen {
                seen = g;
                break;
            }
            if s.shutdown.load(Ordering::SeqCst) {
                return;
            }
            spins += 1;
            if spins < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let guard = s.job.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            let g = s.generation.load(Ordering::SeqCst);
            if g == seen && !s.shutdown.load(Ordering::SeqCst) {
                drop(s.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
            } else {
                drop(guard);
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        }
        let job = s
            .job
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .copied();
        if let Some(SendJob(job)) = job {
            // SAFETY: see `run`: the closure is alive until `pending` reaches 0.
            unsafe { (*job)(idx) };
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _l = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_every_job() {
        let pool = ThreadPool::new(3);
        for round in 0..2000 {
            let hits = AtomicUsize::new(0);
            pool.run(&|i| {
                hits.fetch_add(1 << (8 * i), Ordering::SeqCst);
            });
            assert_eq!(hits.load(Ordering::SeqCst), 0x010101, "round {round}");
            if round % 500 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    #[test]
    fn guided_chunks_cover_the_range_once_and_shrink() {
        let pool = ThreadPool::new(3);
        for (n, min, max) in [
            (1000, 2, 40),
            (7, 2, 40),
            (0, 1, 8),
            (130, 16, 16),
            (55, 4, 3),
        ] {
            let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            let sizes = std::sync::Mutex::new(Vec::new());
            pool.for_guided(n, min, max, &|r| {
                sizes.lock().unwrap().push((r.start, r.len()));
                for i in r {
                    seen[i].fetch_add(1, Ordering::SeqCst);
                }
            });
            assert!(
                seen.iter().all(|c| c.load(Ordering::SeqCst) == 1),
                "{n} {min} {max}"
            );
            let mut sizes = sizes.into_inner().unwrap();
            sizes.sort();
            let max = max.max(min);
            for (i, &(start, len)) in sizes.iter().enumerate() {
                // Every chunk but the very last is within the bounds.
                assert!(len <= max, "{n} {min} {max}: {len}");
                assert!(len >= min || start + len == n, "{n} {min} {max}: {len}");
                if i > 0 && max > min {
                    assert!(len <= sizes[i - 1].1, "chunks shrink: {sizes:?}");
                }
            }
            if n == 1000 {
                assert_eq!(sizes[0].1, 40, "{sizes:?}");
                assert!(sizes[sizes.len() - 1].1 <= 2, "{sizes:?}");
            }
        }
    }

    #[test]
    fn chunks_cover_the_range_once() {
        let pool = ThreadPool::new(2);
        let sum = AtomicUsize::new(0);
        pool.for_chunks(1000, 7, &|r| {
            sum.fetch_add(r.sum::<usize>(), Ordering::SeqCst);
        });
        assert_eq!(sum.load(Ordering::SeqCst), 999 * 1000 / 2);
    }
}

/// A raw pointer to an output buffer that pool threads fill in disjoint
/// ranges.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
// SAFETY: used only for disjoint writes from pool threads.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// # Safety
    /// `[off, off + len)` is in bounds and written by no other thread.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice<'a>(self, off: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}
