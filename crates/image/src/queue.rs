//! One worker thread per loaded pipeline and a queue in front of it:
//! jobs run one at a time, highest priority first, then in arrival order.
//! A job whose caller has gone is skipped while it waits, and stopped at
//! its next step while it runs.

use crate::pipeline::{Image, Pipeline, Progress, Request};
use crate::ImageError;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex};

/// The most jobs waiting before new ones are refused.
pub const MAX_WAITING: usize = 64;

/// The queue refused a job: too many wait.
#[derive(Debug)]
pub struct Full;

pub struct Job {
    pub request: Request,
    /// Called after each step; returning false cancels the job.
    pub on_step: Box<dyn FnMut(&Progress) -> bool + Send>,
    /// Whether the caller still wants the result (checked before it starts).
    pub alive: Box<dyn Fn() -> bool + Send>,
    /// The result, exactly once.
    pub done: Box<dyn FnOnce(Result<Image, ImageError>) + Send>,
}

struct Entry {
    priority: i32,
    seq: u64,
    job: Job,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.priority, self.seq) == (o.priority, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    /// Higher priority first, then earlier arrival.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.priority
            .cmp(&o.priority)
            .then_with(|| o.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct State {
    heap: BinaryHeap<Entry>,
    seq: u64,
    stop: bool,
    running: bool,
}

pub struct Queue {
    shared: Arc<(Mutex<State>, Condvar)>,
    pub pipeline: Arc<Pipeline>,
}

impl Queue {
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        let shared: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let (s, p) = (shared.clone(), pipeline.clone());
        std::thread::Builder::new()
            .name("image-worker".into())
            .spawn(move || worker(&s, &p))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("starting the image worker: {e}"));
        Self { shared, pipeline }
    }

    /// Queue `job`; refused (and dropped, `done` uncalled) when
    /// [`MAX_WAITING`] jobs already wait.
    pub fn submit(&self, job: Job, priority: i32) -> Result<(), Full> {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        if st.heap.len() >= MAX_WAITING || st.stop {
            return Err(Full);
        }
        st.seq += 1;
        let seq = st.seq;
        st.heap.push(Entry { priority, seq, job });
        cv.notify_one();
        Ok(())
    }

    /// Jobs waiting and whether one runs.
    pub fn load(&self) -> (usize, bool) {
        let st = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
        (st.heap.len(), st.running)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_all();
    }
}

fn worker(shared: &(Mutex<State>, Condvar), pipe: &Pipeline) {
    let (lock, cv) = shared;
    loop {
        let entry = {
            let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
            st.running = false;
            loop {
                if st.stop {
                    for e in std::mem::take(&mut st.heap) {
                        (e.job.done)(Err(ImageError::Cancelled));
                    }
                    return;
                }
                if let Some(e) = st.heap.pop() {
                    st.running = true;
                    break e;
                }
                st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let mut job = entry.job;
        if !(job.alive)() {
            (job.done)(Err(ImageError::Cancelled));
            continue;
        }
        let on_step = &mut job.on_step;
        let r = pipe.generate(&job.request, &mut |p| on_step(&p));
        (job.done)(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_then_arrival() {
        let e = |priority, seq| Entry {
            priority,
            seq,
            job: Job {
                request: Request::new("x"),
                on_step: Box::new(|_| true),
                alive: Box::new(|| true),
                done: Box::new(|_| {}),
            },
        };
        let mut h = BinaryHeap::new();
        for (p, s) in [(0, 1), (5, 2), (0, 3), (5, 4)] {
            h.push(e(p, s));
        }
        let order: Vec<u64> = std::iter::from_fn(|| h.pop().map(|e| e.seq)).collect();
        assert_eq!(order, vec![2, 4, 1, 3]);
    }
}
