//! The generation path on a scripted backend and a real SQLite database:
//! usage is counted as the engine reports it and recorded exactly once,
//! whether the request finishes or its client leaves.

use hanlin_accounts::{Db, Role};
use hanlin_engine::{Event, FinishReason, Sink};
use hanlin_gateway::{Backend, Endpoint, Gateway, GatewayError, Metrics, Work};
use std::sync::{Arc, Mutex};

/// Answers each job with `Started`, `tokens` single-token events and
/// `Done`, on a thread of its own (like the scheduler); stops sending when
/// the sink says the client left, and remembers that it did.
struct Scripted {
    tokens: usize,
    cached: usize,
    left: Arc<Mutex<usize>>,
    full: bool,
}

impl Backend for Scripted {
    fn submit(&self, work: Work, _priority: i32, mut sink: Sink) -> Result<(), GatewayError> {
        if self.full {
            return Err(GatewayError::Busy);
        }
        let (n, cached, tokens, left) = (
            work.prompt.len(),
            self.cached,
            self.tokens,
            self.left.clone(),
        );
        std::thread::spawn(move || {
            let mut ok = sink(Event::Started {
                prompt_tokens: n,
                cached_tokens: cached,
            });
            for k in 0..tokens {
                if !ok {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
                ok = sink(Event::Token {
                    text: format!("t{k}"),
                    tokens: 1,
                    logprobs: Vec::new(),
                });
            }
            if ok {
                sink(Event::Done {
                    finish: FinishReason::Length,
                    prompt_tokens: n,
                    cached_tokens: cached,
                    completion_tokens: tokens,
                });
            } else if let Ok(mut l) = left.lock() {
                *l += 1;
            }
        });
        Ok(())
    }
}

async fn setup() -> (Arc<Gateway>, hanlin_accounts::Caller, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let db = Db::connect(&format!("sqlite://{}", dir.path().join("g.db").display()))
        .await
        .expect("db");
    let user = db.ensure_user("ann", Role::User, None).await.expect("user");
    let (_, secret) = db
        .create_key(&user.id, &Default::default())
        .await
        .expect("key");
    let caller = db.authenticate(&secret).await.expect("db").expect("caller");
    let gw = Gateway::new(db, Metrics::new().expect("metrics"));
    (gw, caller, dir)
}

fn backend(tokens: usize, cached: usize) -> Scripted {
    Scripted {
        tokens,
        cached,
        left: Arc::new(Mutex::new(0)),
        full: false,
    }
}

async fn row(gw: &Gateway) -> Vec<hanlin_accounts::UsageRow> {
    gw.db.usage(None, None).await.expect("usage")
}

/// The day the (only) request was metered on: a test that reads "today"
/// from the clock fails when it runs across midnight.
async fn recorded_day(gw: &Gateway) -> String {
    let rows = row(gw).await;
    assert_eq!(rows.len(), 1, "one day, one model: {rows:?}");
    rows[0].day.clone()
}

#[tokio::test]
async fn choices_share_their_prompt_and_steps_add_up_in_one_row() {
    let (gw, caller, _dir) = setup().await;
    let mut req = gw.admit(&caller, Endpoint::Chat, "m").await.expect("admit");
    req.reserve(3 * (10 + 5)).await.expect("reserve");
    let b = backend(5, 4);
    // n = 3: one prompt, counted once; 3 × 5 completion tokens.
    let work = (0..3)
        .map(|_| Work::generate(vec![1; 10], Default::default()))
        .collect();
    req.submit(&b, work).expect("submit");
    let mut done = 0;
    while let Some((_, ev)) = req.next().await {
        if matches!(ev, Event::Done { .. }) {
            done += 1;
        }
    }
    assert_eq!(done, 3);
    let u = req.usage();
    assert_eq!(
        (u.prompt_tokens, u.cached_tokens, u.completion_tokens),
        (10, 4, 15)
    );
    // A second model step (an agent loop): a longer prompt.
    req.reserve(12 + 5).await.expect("reserve again");
    req.submit(&b, vec![Work::generate(vec![2; 12], Default::default())])
        .expect("submit");
    while req.next().await.is_some() {}
    req.finish().await;
    let rows = row(&gw).await;
    assert_eq!(rows.len(), 1, "one request, one row: {rows:?}");
    assert_eq!(rows[0].requests, 1);
    assert_eq!(
        (
            rows[0].prompt_tokens,
            rows[0].cached_tokens,
            rows[0].completion_tokens
        ),
        (22, 8, 20)
    );
    // The limiter was settled to the real use: 42 tokens today.
    let day = recorded_day(&gw).await;
    assert_eq!(
        gw.db.tokens_on(&caller.user.id, &day).await.expect("sum"),
        42
    );
}

#[tokio::test]
async fn embeddings_count_every_distinct_prompt() {
    let (gw, caller, _dir) = setup().await;
    let mut req = gw
        .admit(&caller, Endpoint::Embeddings, "e")
        .await
        .expect("admit");
    req.reserve(7).await.expect("reserve");
    let b = backend(0, 0);
    req.submit(
        &b,
        vec![Work::embed(vec![1, 2, 3]), Work::embed(vec![4, 5, 6, 7])],
    )
    .expect("submit");
    while req.next().await.is_some() {}
    assert_eq!(req.usage().prompt_tokens, 7);
    req.finish().await;
    assert_eq!(row(&gw).await[0].prompt_tokens, 7);
}

#[tokio::test]
async fn a_client_that_leaves_is_settled_once_with_what_was_generated() {
    let (gw, caller, _dir) = setup().await;
    let mut req = gw.admit(&caller, Endpoint::Chat, "m").await.expect("admit");
    req.reserve(1000).await.expect("reserve");
    let b = backend(500, 0);
    let left = b.left.clone();
    req.submit(&b, vec![Work::generate(vec![1; 8], Default::default())])
        .expect("submit");
    let mut seen = 0;
    while let Some((_, ev)) = req.next().await {
        if matches!(ev, Event::Token { .. }) {
            seen += 1;
            if seen == 20 {
                break;
            }
        }
    }
    // The client goes away: the request is dropped, not finished.
    drop(req);
    // The backend notices and stops; the row is settled in the background.
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = row(&gw).await;
        if *left.lock().expect("lock") == 1
            && rows.first().is_some_and(|r| r.completion_tokens == 20)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        *left.lock().expect("lock"),
        1,
        "the backend was told to stop"
    );
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].prompt_tokens, rows[0].completion_tokens), (8, 20));
    // The reservation of 1000 was replaced by the 28 tokens used: a request
    // needing the rest of a 1028-token minute budget... fits.
    let mut plan = caller.plan.clone();
    plan.tokens_per_minute = 1028;
    let mut c2 = caller.clone();
    c2.plan = plan;
    let mut r2 = gw.admit(&c2, Endpoint::Chat, "m").await.expect("admit");
    r2.reserve(1000)
        .await
        .expect("the first reservation was settled");
}

#[tokio::test]
async fn refusals_release_what_they_reserved() {
    let (gw, mut caller, _dir) = setup().await;
    caller.plan.requests_per_minute = 2;
    caller.plan.tokens_per_minute = 100;
    let full = Scripted {
        full: true,
        ..backend(1, 0)
    };
    let mut req = gw.admit(&caller, Endpoint::Chat, "m").await.expect("admit");
    req.reserve(100).await.expect("reserve");
    assert!(matches!(
        req.submit(&full, vec![Work::generate(vec![1], Default::default())]),
        Err(GatewayError::Busy)
    ));
    drop(req);
    // Nothing ran: no usage row, and the 100 tokens are free again.
    assert!(row(&gw).await.is_empty());
    let mut req = gw
        .admit(&caller, Endpoint::Chat, "m")
        .await
        .expect("second request");
    req.reserve(100).await.expect("tokens released");
    // Requests per minute count before any work: the third is refused.
    assert!(matches!(
        gw.admit(&caller, Endpoint::Chat, "m").await,
        Err(GatewayError::Limit(_))
    ));
}

/// A plan's price and a request's weight multiply: on a half-price plan a
/// request at 40 % of the plan's price counts 20 % of its tokens against
/// the daily limit (the usage row keeps the real token counts).
#[tokio::test]
async fn plan_price_and_request_weight_scale_what_counts_against_limits() {
    let (gw, mut caller, _dir) = setup().await;
    let mut plan = gw.db.plan(&caller.plan.name).await.expect("plan");
    plan.price_milli = 500;
    gw.db.put_plan(&plan).await.expect("put plan");
    caller.plan = gw.db.plan(&plan.name).await.expect("plan again");
    assert_eq!(caller.plan.price_milli, 500);
    let mut req = gw
        .admit(&caller, Endpoint::Chat, "m")
        .await
        .expect("admit")
        .with_weight(400);
    req.reserve(100 + 50).await.expect("reserve");
    req.submit(
        &backend(50, 0),
        vec![Work::generate(vec![1; 100], Default::default())],
    )
    .expect("submit");
    while req.next().await.is_some() {}
    req.finish().await;
    let rows = row(&gw).await;
    assert_eq!(
        (rows[0].prompt_tokens, rows[0].completion_tokens),
        (100, 50)
    );
    let day = recorded_day(&gw).await;
    assert_eq!(
        gw.db.tokens_on(&caller.user.id, &day).await.expect("sum"),
        30
    );
}

#[tokio::test]
async fn an_agent_loop_holds_one_steps_reservation_at_a_time() {
    let (gw, mut caller, _dir) = setup().await;
    // Each step reserves 1000 and uses 15: five steps fit a 1100-token
    // minute only if each step's unused reservation is freed before the next.
    caller.plan.tokens_per_minute = 1100;
    let b = backend(5, 0);
    let mut req = gw.admit(&caller, Endpoint::Chat, "m").await.expect("admit");
    for step in 0..5 {
        req.reserve(1000)
            .await
            .unwrap_or_else(|e| panic!("step {step}: {e}"));
        req.submit(&b, vec![Work::generate(vec![1; 10], Default::default())])
            .expect("submit");
        while req.next().await.is_some() {}
    }
    req.finish().await;
    // Charged exactly once: 5 × 15 tokens, today and in the minute.
    let day = recorded_day(&gw).await;
    assert_eq!(
        gw.db.tokens_on(&caller.user.id, &day).await.expect("sum"),
        75
    );
    let mut r2 = gw.admit(&caller, Endpoint::Chat, "m").await.expect("admit");
    r2.reserve(1100 - 75)
        .await
        .expect("the minute holds 75 tokens");
    let mut r3 = gw.admit(&caller, Endpoint::Chat, "m").await.expect("admit");
    assert!(r3.reserve(1).await.is_err(), "and no more");
}
