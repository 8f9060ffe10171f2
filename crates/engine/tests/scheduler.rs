//! Continuous batching on the real default model: several requests decoded
//! together give the same greedy text each would get alone, a long prompt is
//! fed in chunks, a shared prefix is reused across requests, priorities
//! order admission and a vanished client frees its sequence.

mod common;

use hanlin_engine::{
    Draft, Event, GenerateParams, Job, LoadedModel, Lookup, SamplerConfig, Scheduler,
    SchedulerConfig, Sink,
};
use hanlin_tokenizer::Message;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

fn greedy(max: usize) -> GenerateParams {
    GenerateParams {
        max_tokens: max,
        sampler: SamplerConfig::greedy(),
        ..Default::default()
    }
}

fn job(prompt: Vec<u32>, max: usize, priority: i32) -> (Job, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    let sink = Box::new(move |e| tx.send(e).is_ok());
    (with_sink(prompt, max, priority, sink), rx)
}

/// Collect one request's events: (text, Started's cached tokens, Done).
fn collect(rx: &mpsc::Receiver<Event>) -> (String, usize, Event) {
    let (pieces, cached, end) = collect_pieces(rx);
    (pieces.concat(), cached, end)
}

/// [`collect`], with the text as its `Token` events gave it, an item an
/// event.
fn collect_pieces(rx: &mpsc::Receiver<Event>) -> (Vec<String>, usize, Event) {
    let mut pieces = Vec::new();
    let mut cached = usize::MAX;
    loop {
        match rx.recv_timeout(Duration::from_secs(300)).expect("event") {
            Event::Started { cached_tokens, .. } => cached = cached_tokens,
            Event::Token { text, .. } => pieces.push(text),
            e @ (Event::Done { .. } | Event::Failed(_)) => return (pieces, cached, e),
            Event::Embedding(_) => panic!("a generation job got an embedding"),
            Event::Queued { .. } | Event::Prefill { .. } => {}
        }
    }
}

fn model() -> Arc<LoadedModel> {
    LoadedModel::load(
        &common::model_path("qwen2.5-coder-0.5b"),
        hanlin_engine::default_threads(),
    )
    .expect("load")
}

#[test]
fn batched_requests_match_single_sequence_generation() {
    let m = model();
    let questions = [
        "用中文介绍一下长城",
        "What is the capital of France?",
        "写一个Python函数计算斐波那契数列",
        "Explain what a hash map is in one sentence.",
    ];
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| m.chat_prompt(&[Message::new("user", *q)]).expect("prompt"))
        .collect();
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            let mut s = m.new_session(1024);
            s.generate(p, &greedy(24), |_| true).expect("generate").text
        })
        .collect();
    // A small prefill chunk forces prompts to be fed over several steps,
    // interleaved with the other sequences' decoding.
    let sched = Scheduler::start(
        m.clone(),
        SchedulerConfig {
            prefill_chunk: 16,
            ..Default::default()
        },
    );
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (j, rx) = job(p.clone(), 24, 0);
            sched.submit(j).expect("submit");
            rx
        })
        .collect();
    for (i, rx) in rxs.iter().enumerate() {
        let (text, _, done) = collect(rx);
        assert!(
            matches!(done, Event::Done { completion_tokens, .. } if completion_tokens > 0),
            "{done:?}"
        );
        assert_eq!(text, alone[i], "request {i} ({})", questions[i]);
    }
    assert!(sched.stats.steps.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

#[test]
fn second_turn_reuses_the_cached_prefix() {
    let m = model();
    let sched = Scheduler::start(m.clone(), SchedulerConfig::default());
    let mut history = vec![
        Message::new("system", "你是一个乐于助人的助手。"),
        Message::new("user", "用一句话介绍北京。"),
    ];
    let p1 = m.chat_prompt(&history).expect("prompt");
    let (j, rx) = job(p1.clone(), 16, 0);
    sched.submit(j).expect("submit");
    let (answer, cached1, done) = collect(&rx);
    assert_eq!(cached1, 0);
    assert!(matches!(done, Event::Done { .. }));
    history.push(Message::new("assistant", &answer));
    history.push(Message::new("user", "再介绍一下上海。"));
    let p2 = m.chat_prompt(&history).expect("prompt");
    let (j, rx) = job(p2.clone(), 8, 0);
    sched.submit(j).expect("submit");
    let (_, cached2, _) = collect(&rx);
    // Everything up to the first answer's end is reused (the template may
    // render the closed assistant turn slightly differently from the
    // generated tokens, so allow a few).
    assert!(
        cached2 + 8 >= p1.len() && cached2 < p2.len(),
        "cached {cached2} of {} (first prompt {})",
        p2.len(),
        p1.len()
    );
}

/// A scheduler with one slot, held by a long request until the returned flag
/// is set (its client then "goes away"); also its prompt, for more requests.
fn one_busy_slot() -> (Scheduler, Vec<u32>, Arc<AtomicBool>) {
    let m = model();
    let sched = Scheduler::start(
        m.clone(),
        SchedulerConfig {
            max_batch: 1,
            ..Default::default()
        },
    );
    let p = m
        .chat_prompt(&[Message::new("user", "Count from 1 to 100.")])
        .expect("prompt");
    let gone = Arc::new(AtomicBool::new(false));
    let (tx, started) = mpsc::channel::<()>();
    let g = gone.clone();
    let sink = Box::new(move |e: Event| {
        if matches!(e, Event::Started { .. }) {
            let _ = tx.send(());
        }
        !g.load(Ordering::SeqCst)
    });
    sched
        .submit(endless(&m, p.clone(), 0, sink))
        .expect("submit");
    started
        .recv_timeout(Duration::from_secs(60))
        .expect("the long request starts");
    (sched, p, gone)
}

/// Masks the model's end tokens: a job that runs until its sink says stop
/// (counting to 100 may end before a test is done on a fast machine).
struct NoEnd(Vec<u32>);

impl hanlin_engine::TokenConstraint for NoEnd {
    fn mask(&mut self, logits: &mut [f32]) -> bool {
        for &id in &self.0 {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        true
    }
    fn accept(&mut self, _: u32) {}
}

/// A job on `prompt` that does not end until its sink returns false.
fn endless(m: &LoadedModel, prompt: Vec<u32>, priority: i32, sink: Sink) -> Job {
    let mut j = with_sink(prompt, 100_000, priority, sink);
    j.constraint = Some(Box::new(NoEnd(m.tokenizer.eog.to_vec())));
    j
}

fn with_sink(prompt: Vec<u32>, max: usize, priority: i32, sink: Sink) -> Job {
    Job {
        prompt,
        params: greedy(max),
        priority,
        embed: false,
        constraint: None,
        sink,
    }
}

#[test]
fn priority_admits_first_and_dropped_clients_are_freed() {
    let (sched, p, gone) = one_busy_slot();
    // Two more wait for the slot; what happens to them goes into one log.
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    for (name, priority) in [("low", 0), ("high", 10)] {
        let (log, done_tx) = (log.clone(), done_tx.clone());
        let sink = Box::new(move |e: Event| {
            let what = match e {
                Event::Started { .. } => "start",
                Event::Done { .. } | Event::Failed(_) => "done",
                _ => return true,
            };
            log.lock().expect("log").push(format!("{name} {what}"));
            if what == "done" {
                let _ = done_tx.send(());
            }
            true
        });
        sched
            .submit(with_sink(p.clone(), 4, priority, sink))
            .expect("submit");
    }
    // Let both reach the queue, then the first client leaves: its sequence
    // is freed and the high-priority request runs before the low one.
    std::thread::sleep(Duration::from_millis(300));
    gone.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        done_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("both finish");
    }
    let log = log.lock().expect("log").clone();
    assert_eq!(
        log,
        ["high start", "high done", "low start", "low done"],
        "admission order"
    );
}

#[test]
fn a_client_that_leaves_while_queued_is_dropped_from_the_queue() {
    let (sched, p, release) = one_busy_slot();
    // This one's client is already gone: it answers every event with false.
    let (tx, rx) = mpsc::channel::<Event>();
    let sink = Box::new(move |e| {
        let _ = tx.send(e);
        false
    });
    sched.submit(with_sink(p, 4, 0, sink)).expect("submit");
    let first = rx.recv_timeout(Duration::from_secs(30)).expect("probed");
    assert!(matches!(first, Event::Queued { ahead: 0 }), "{first:?}");
    // Dropped while the first request still runs, never started.
    let mut dropped = false;
    for _ in 0..100 {
        if sched.stats.queued.load(Ordering::Relaxed) == 0 {
            dropped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dropped, "the abandoned request is still queued");
    assert_eq!(sched.stats.active.load(Ordering::Relaxed), 1);
    release.store(true, Ordering::SeqCst);
    assert!(
        rx.recv_timeout(Duration::from_secs(2)).is_err(),
        "it never started"
    );
}

#[test]
fn overlong_prompt_fails_cleanly_and_full_queue_refuses() {
    let m = model();
    let sched = Scheduler::start(
        m.clone(),
        SchedulerConfig {
            ctx: 64,
            max_queue: 0,
            ..Default::default()
        },
    );
    let (j, _rx) = job(vec![1; 10], 4, 0);
    assert!(matches!(
        sched.submit(j),
        Err(hanlin_engine::SubmitError::QueueFull(0))
    ));
    let sched = Scheduler::start(
        m,
        SchedulerConfig {
            ctx: 64,
            ..Default::default()
        },
    );
    let (j, rx) = job(vec![1; 100], 4, 0);
    sched.submit(j).expect("submit");
    let (_, _, e) = collect(&rx);
    assert!(
        matches!(&e, Event::Failed(msg) if msg.contains("100 tokens")),
        "{e:?}"
    );
}

#[test]
fn a_client_that_leaves_during_a_long_prefill_is_freed_before_it_ends() {
    let m = model();
    let sched = Scheduler::start(
        m.clone(),
        SchedulerConfig {
            prefill_chunk: 64,
            ..Default::default()
        },
    );
    // 1,280 prompt tokens: 20 chunks if it ran to the end.
    let prompt: Vec<u32> = (0..1280u32).map(|i| 1000 + (i * 37) % 20000).collect();
    let (tx, rx) = mpsc::channel::<Event>();
    let sink = Box::new(move |e: Event| {
        // The client leaves as soon as the prompt is being computed.
        let leaving = matches!(e, Event::Prefill { .. });
        let _ = tx.send(e);
        !leaving
    });
    sched.submit(with_sink(prompt, 4, 0, sink)).expect("submit");
    let mut freed = false;
    for _ in 0..500 {
        if sched.stats.active.load(Ordering::Relaxed) == 0
            && sched.stats.steps.load(Ordering::Relaxed) > 0
        {
            freed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(freed, "the abandoned sequence is still running");
    let steps = sched.stats.steps.load(Ordering::Relaxed);
    assert!(
        steps <= 2,
        "{steps} prefill chunks ran for a client that had left"
    );
    let events: Vec<Event> = rx.try_iter().collect();
    assert!(
        matches!(
            events.first(),
            Some(Event::Started {
                prompt_tokens: 1280,
                ..
            })
        ),
        "{events:?}"
    );
    assert!(
        matches!(
            events.get(1),
            Some(Event::Prefill {
                done: 64,
                total: 1280
            })
        ),
        "{events:?}"
    );
    assert_eq!(events.len(), 2, "{events:?}");
}

/// Background jobs (batch lines) filled every slot, so an interactive
/// request waited for one of them to finish.
#[test]
fn background_jobs_leave_the_reserved_slots_to_interactive_ones() {
    let m = model();
    let sched = Scheduler::start(
        m.clone(),
        SchedulerConfig {
            max_batch: 3,
            reserved_slots: 1,
            ..Default::default()
        },
    );
    let p = m
        .chat_prompt(&[Message::new("user", "Count from 1 to 100.")])
        .expect("prompt");
    // Three long background jobs: two run, the third waits.
    let started = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    for i in 0..3 {
        let (started, stop) = (started.clone(), stop.clone());
        let sink = Box::new(move |e: Event| {
            if matches!(e, Event::Started { .. }) {
                started.lock().expect("log").push(format!("batch {i}"));
            }
            !stop.load(Ordering::SeqCst)
        });
        sched
            .submit(endless(&m, p.clone(), -1, sink))
            .expect("submit");
    }
    for _ in 0..600 {
        if started.lock().expect("log").len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        started.lock().expect("log").len(),
        2,
        "two background jobs run"
    );
    // An interactive request starts at once, in the slot kept free.
    let (j, rx) = job(p.clone(), 4, 0);
    sched.submit(j).expect("submit");
    let (text, _, done) = collect(&rx);
    assert!(matches!(done, Event::Done { .. }) && !text.is_empty());
    assert_eq!(
        started.lock().expect("log").len(),
        2,
        "the third background job still waits"
    );
    stop.store(true, Ordering::SeqCst);
}

/// Each prompt twice at once, greedy and sampled with `sampled` (both
/// `sampled.max_tokens` long): the texts in that order, as their events
/// gave them (guesses checked in a round must not change what a reader
/// sees after each event: a tool loop stops reading at a repeated call).
fn greedy_and_sampled(
    sched: &Scheduler,
    prompts: &[Vec<u32>],
    sampled: &GenerateParams,
) -> Vec<Vec<String>> {
    let max = sampled.max_tokens;
    let mut rxs = Vec::new();
    for p in prompts {
        for params in [greedy(max), sampled.clone()] {
            let (tx, rx) = mpsc::channel();
            let mut j = with_sink(p.clone(), max, 0, Box::new(move |e| tx.send(e).is_ok()));
            j.params = params;
            sched.submit(j).expect("submit");
            rxs.push(rx);
        }
    }
    rxs.iter().map(|rx| collect_pieces(rx).0).collect()
}

/// Prompt lookup inside the batch: a reply that quotes its prompt takes
/// several verified tokens per step, and every request's text (greedy, or
/// sampled with a seed) is the one it gets without lookup.
#[test]
fn prompt_lookup_gives_the_same_text_in_fewer_steps() {
    let m = model();
    let code = "def area(width, height):\n    # width times height\n    return width * height\n\nprint(area(3, 4))\n";
    let prompts: Vec<Vec<u32>> = [
        format!("Rename the function to rect_area. Reply with the whole code in a code block.\n\n```python\n{code}```"),
        "用一句话介绍杭州。".to_string(),
    ]
    .iter()
    .map(|q| m.chat_prompt(&[Message::new("user", q)]).expect("prompt"))
    .collect();
    let sampled = GenerateParams {
        max_tokens: 48,
        sampler: SamplerConfig {
            temperature: 0.8,
            seed: 5,
            ..SamplerConfig::default()
        },
        ..Default::default()
    };
    let run = |lookup: Lookup| {
        let sched = Scheduler::start(
            m.clone(),
            SchedulerConfig {
                lookup,
                ..Default::default()
            },
        );
        let texts = greedy_and_sampled(&sched, &prompts, &sampled);
        let st = &sched.stats;
        (
            texts,
            st.steps.load(Ordering::Relaxed),
            st.proposed_tokens.load(Ordering::Relaxed),
            st.accepted_tokens.load(Ordering::Relaxed),
        )
    };
    let (plain, plain_steps, none, _) = run(Lookup::Off);
    assert_eq!(none, 0, "no guesses without lookup");
    assert!(
        plain[0].concat().contains("print(rect_area(3, 4))"),
        "{plain:?}"
    );
    // Always: whether guessing pays depends on the machine's timing.
    let (looked, steps, proposed, accepted) = run(Lookup::Always);
    eprintln!(
        "lookup: {steps} steps (without: {plain_steps}), {accepted} of {proposed} guesses kept"
    );
    assert_eq!(looked, plain);
    assert!(
        accepted >= 20 && accepted <= proposed,
        "{accepted} of {proposed} guesses kept"
    );
    assert!(
        steps < plain_steps,
        "{steps} steps with lookup, {plain_steps} without"
    );
}

/// A draft model inside the batch: requests that do not quote their prompt
/// (where prompt lookup has little to copy) still take several verified
/// tokens per step from the draft's guesses, and every text, greedy or
/// sampled with a seed, is the one they get without guessing. The model
/// drafts for itself here, so its greedy guesses are right until a
/// sampled token differs; the draft's KV caches (catching up on each
/// prompt, cut back after a rejected guess) are what is tested.
#[test]
fn a_draft_model_gives_the_same_text_in_fewer_steps() {
    let m = model();
    let prompts: Vec<Vec<u32>> = [
        "Write a Python function that checks whether a number is prime.",
        "用两句话介绍西湖。",
    ]
    .iter()
    .map(|q| m.chat_prompt(&[Message::new("user", *q)]).expect("prompt"))
    .collect();
    let sampled = GenerateParams {
        max_tokens: 40,
        sampler: SamplerConfig {
            temperature: 0.8,
            seed: 11,
            ..SamplerConfig::default()
        },
        ..Default::default()
    };
    let run = |lookup: Lookup, draft: bool| {
        let draft = draft.then(|| Draft::new(m.clone(), "draft", &m, "target").expect("draft"));
        let sched = Scheduler::start_with_draft(
            m.clone(),
            draft,
            SchedulerConfig {
                lookup,
                // A small chunk: the draft catches up over several steps.
                prefill_chunk: 16,
                ..Default::default()
            },
        );
        let texts = greedy_and_sampled(&sched, &prompts, &sampled);
        let st = &sched.stats;
        (
            texts,
            st.steps.load(Ordering::Relaxed),
            st.generated_tokens.load(Ordering::Relaxed),
            st.accepted_tokens.load(Ordering::Relaxed),
            st.draft_accepted_tokens.load(Ordering::Relaxed),
        )
    };
    let (plain, plain_steps, plain_generated, _, _) = run(Lookup::Off, false);
    let (looked, lookup_steps, _, lookup_kept, none) = run(Lookup::Always, false);
    assert_eq!(none, 0, "no draft, no draft guesses");
    let (drafted, steps, generated, also_looked, kept) = run(Lookup::Always, true);
    // The passes that decoded for some sequence, summed over the
    // sequences: each gives its sampled token and the guesses it kept.
    let passes = generated
        .checked_sub(kept + also_looked)
        .expect("no more guesses kept than tokens generated");
    eprintln!(
        "draft: {steps} steps, {passes} decode passes, {kept} of its guesses kept (and {also_looked} of lookup's); lookup alone: {lookup_steps} steps, {lookup_kept} kept; plain: {plain_steps} steps, {plain_generated} decode passes"
    );
    assert_eq!(looked, plain);
    assert_eq!(drafted, plain);
    assert_eq!(generated, plain_generated, "the same tokens");
    assert!(kept >= 40, "{kept} of the draft's guesses kept");
    // The sequences decode in at most two thirds of the passes (how many a
    // sampled text saves depends on where its draws differ from the greedy
    // guesses). The scheduler's steps also count prefill chunks, and how
    // many there are depends on when the scheduler thread admits each
    // request (two requests of one prompt share its prefill when the second
    // arrives after it): one step more or less between runs, so they are
    // only checked to be fewer.
    assert!(
        passes * 3 <= plain_generated * 2,
        "{passes} decode passes with the draft, {plain_generated} without"
    );
    assert!(
        steps < plain_steps,
        "{steps} steps with the draft, {plain_steps} without"
    );
}

/// A scheduler whose model drafts for itself, with prompt lookup always on.
fn with_self_draft(m: &Arc<LoadedModel>) -> Scheduler {
    let draft = Draft::new(m.clone(), "draft", m, "target").expect("draft");
    Scheduler::start_with_draft(
        m.clone(),
        Some(draft),
        SchedulerConfig {
            lookup: Lookup::Always,
            ..Default::default()
        },
    )
}

/// The draft model's caches are pooled with the target's: the next turn of
/// a conversation (here the same prompt again, and then a longer one that
/// starts with it) does not run the shared history through the draft again.
/// (Before, every request's draft caught up on its whole prompt.)
#[test]
fn the_draft_reuses_its_cache_of_a_shared_prefix() {
    let m = model();
    let sched = with_self_draft(&m);
    let mut history = vec![Message::new(
        "user",
        "Write a Python function that returns the n-th Fibonacci number.",
    )];
    let p1 = m.chat_prompt(&history).expect("prompt");
    let caught_up = || sched.stats.draft_caught_up_tokens.load(Ordering::Relaxed) as usize;
    let ask = |p: &[u32], max: usize| {
        let (j, rx) = job(p.to_vec(), max, 0);
        sched.submit(j).expect("submit");
        collect(&rx)
    };
    let (answer, _, _) = ask(&p1, 24);
    let first = caught_up();
    assert!(
        first >= p1.len() - 1,
        "the first request's draft ran {first} of {} prompt tokens",
        p1.len()
    );
    let (again, cached, _) = ask(&p1, 24);
    assert_eq!(again, answer, "the same greedy answer");
    assert_eq!(cached, p1.len() - 1);
    let second = caught_up() - first;
    assert!(
        second < 24 + 8,
        "the draft ran {second} tokens again for a prompt of {}",
        p1.len()
    );
    history.push(Message::new("assistant", &answer));
    history.push(Message::new("user", "Now make it iterative."));
    let p2 = m.chat_prompt(&history).expect("prompt");
    ask(&p2, 8);
    let third = caught_up() - first - second;
    assert!(
        third + p1.len() / 2 < p2.len(),
        "the draft ran {third} of the next turn's {} tokens (first turn {})",
        p2.len(),
        p1.len()
    );
}

/// A sequence's draft catches up on at most
/// [`DRAFT_WINDOW`](hanlin_engine::speculative::DRAFT_WINDOW) tokens of a
/// long prompt (before, on all of it: a pass of the draft per prefill
/// chunk, each as long as a quarter of the target's), still guesses, and
/// the answer is the one without a draft.
#[test]
fn a_drafts_catch_up_on_a_long_prompt_is_bounded_by_its_window() {
    use hanlin_engine::speculative::DRAFT_WINDOW;
    let m = model();
    let p = common::long_notes_prompt(&m);
    assert!(p.len() > 3 * DRAFT_WINDOW, "{} tokens", p.len());
    let ask = |sched: &Scheduler| {
        let (j, rx) = job(p.clone(), 24, 0);
        sched.submit(j).expect("submit");
        collect(&rx).0
    };
    let plain = ask(&Scheduler::start(
        m.clone(),
        SchedulerConfig {
            lookup: Lookup::Off,
            ..Default::default()
        },
    ));
    let sched = with_self_draft(&m);
    assert_eq!(ask(&sched), plain, "the draft changed the answer");
    let stat = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as usize;
    let caught_up = stat(&sched.stats.draft_caught_up_tokens);
    assert!(
        caught_up > 0 && caught_up <= DRAFT_WINDOW + 24,
        "the draft caught up on {caught_up} tokens of a {}-token prompt",
        p.len()
    );
    assert!(
        stat(&sched.stats.draft_proposed_tokens) > 0,
        "the draft proposed nothing"
    );
}
