//! The image queue on the tiny pipeline: a job cancelled mid-denoising
//! stops at its next step, a job whose caller left is never started, and
//! the worker goes on serving.

use hanlin_image::queue::{Job, Queue};
use hanlin_image::{ImageError, Pipeline, Request};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

fn job(
    steps_seen: Arc<AtomicUsize>,
    stop_after: usize,
    alive: bool,
) -> (Job, mpsc::Receiver<Result<hanlin_image::Image, ImageError>>) {
    let (tx, rx) = mpsc::channel();
    let mut r = Request::new("a red circle on a blue background");
    (r.width, r.height, r.steps) = (32, 32, 4);
    (
        Job {
            request: r,
            on_step: Box::new(move |p| {
                steps_seen.fetch_add(1, Ordering::SeqCst);
                p.step < stop_after
            }),
            alive: Box::new(move || alive),
            done: Box::new(move |res| {
                let _ = tx.send(res);
            }),
        },
        rx,
    )
}

#[test]
fn cancelled_jobs_stop_and_the_worker_goes_on() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-sd");
    let q = Queue::new(Arc::new(Pipeline::load(&dir, 2).expect("tiny pipeline")));
    let seen = Arc::new(AtomicUsize::new(0));

    let (j, rx) = job(seen.clone(), 2, true);
    assert!(q.submit(j, 0).is_ok());
    assert!(matches!(
        rx.recv().expect("a result"),
        Err(ImageError::Cancelled)
    ));
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "stopped after the second of four steps"
    );

    let gone = Arc::new(AtomicUsize::new(0));
    let (j, rx) = job(gone.clone(), 99, false);
    assert!(q.submit(j, 0).is_ok());
    assert!(matches!(
        rx.recv().expect("a result"),
        Err(ImageError::Cancelled)
    ));
    assert_eq!(
        gone.load(Ordering::SeqCst),
        0,
        "a job whose caller left never runs"
    );

    let done = Arc::new(AtomicUsize::new(0));
    let (j, rx) = job(done.clone(), 99, true);
    assert!(q.submit(j, 0).is_ok());
    let img = rx.recv().expect("a result").expect("an image");
    assert_eq!(
        (img.width, img.height, done.load(Ordering::SeqCst)),
        (32, 32, 4)
    );
}
