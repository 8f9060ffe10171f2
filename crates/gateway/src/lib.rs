//! The one metered generation path. Every billable call — chat and text
//! completions, embeddings, web replies, grounded answers, searches, and
//! whatever later crates add — goes through it:
//!
//! 1. [`Gateway::admit`] counts the request against the plan's requests per
//!    minute. It is cheap and comes first, before any tokenizing.
//! 2. [`Request::reserve`] reserves the worst-case tokens once the handler
//!    knows them (prompt + max new tokens), so concurrent requests can
//!    never jointly overshoot a limit.
//! 3. [`Request::submit`] hands [`Work`] to a [`Backend`] (today the
//!    engine's continuous-batching [`Scheduler`]).
//! 4. [`Request::next`] yields the backend's typed [`Event`]s. On the way
//!    it counts usage, writes the usage row (when the backend admits the
//!    request, then every [`USAGE_CHECKPOINT`]) and records the latency
//!    metrics that fit the endpoint's kind.
//! 5. [`Request::finish`] — or dropping the request, when its client has
//!    left — settles the reservation and the usage row to what the backend
//!    counted, exactly once.
//!
//! A request with several model steps (an agent loop) submits several
//! times: it stays one request id and one usage row.

pub mod metrics;

pub use metrics::Metrics;

use hanlin_accounts::limits::{LimitError, Limiter, Reservation, SharedLimiter, Spend};
use hanlin_accounts::{AccountError, Caller, Db, Usage, UsageRecord, FULL_PRICE};
use hanlin_engine::{Event, GenerateParams, Job, Scheduler, Sink, SubmitError, TokenConstraint};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Why the gateway refused or could not run a request.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A plan limit: requests per minute, tokens per minute or per day.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The backend's queue is full: retry shortly.
    #[error("The server is busy: too many requests are waiting. Please retry shortly.")]
    Busy,
    /// The backend is not running.
    #[error("The model is not running ({0}).")]
    Unavailable(String),
    #[error(transparent)]
    Db(#[from] AccountError),
}

/// The endpoint a request came through: its name in usage rows and
/// metrics, and which latencies it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Ask,
    Search,
    Web,
    /// A line of a batch (`/v1/batches`), whichever endpoint it names.
    Batch,
    /// A reply to a messaging channel's user (WeChat).
    Channel,
    /// Speech to text (`/v1/audio/transcriptions`).
    Transcriptions,
    /// Speech to English text (`/v1/audio/translations`).
    Translations,
    /// Text to speech (`/v1/audio/speech`).
    Speech,
    /// Text to image (`/v1/images/generations`).
    Images,
    /// The chat model putting an image prompt into English for an
    /// English-only image model.
    ImagePrompt,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Ask => "ask",
            Endpoint::Search => "search",
            Endpoint::Web => "web",
            Endpoint::Batch => "batch",
            Endpoint::Channel => "channel",
            Endpoint::Transcriptions => "transcriptions",
            Endpoint::Translations => "translations",
            Endpoint::Speech => "speech",
            Endpoint::Images => "images",
            Endpoint::ImagePrompt => "image_prompt",
        }
    }

    /// Whether the endpoint produces a token stream (time to first token
    /// and inter-token latency are recorded); every endpoint records its
    /// total duration.
    pub fn streams(self) -> bool {
        matches!(
            self,
            Endpoint::Chat
                | Endpoint::Completions
                | Endpoint::Ask
                | Endpoint::Web
                | Endpoint::Channel
        )
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
            Endpoint::Embeddings => "emb",
            Endpoint::Ask => "ask",
            Endpoint::Search => "search",
            Endpoint::Web => "web",
            Endpoint::Batch => "batch_req",
            Endpoint::Channel => "chan",
            Endpoint::Transcriptions => "trsc",
            Endpoint::Translations => "trsl",
            Endpoint::Speech => "tts",
            Endpoint::Images => "img",
            Endpoint::ImagePrompt => "imgprompt",
        }
    }
}

/// One unit of work for a backend: today, one engine job.
pub struct Work {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Embed the prompt instead of generating.
    pub embed: bool,
    pub constraint: Option<Box<dyn TokenConstraint>>,
}

impl Work {
    pub fn generate(prompt: Vec<u32>, params: GenerateParams) -> Self {
        Self {
            prompt,
            params,
            embed: false,
            constraint: None,
        }
    }

    pub fn embed(prompt: Vec<u32>) -> Self {
        Self {
            prompt,
            params: GenerateParams::default(),
            embed: true,
            constraint: None,
        }
    }
}

/// What runs the work: the local scheduler today; an image pipeline,
/// speech models or an HTTP upstream later. Events go to `sink` until it
/// returns `false` (the client left).
pub trait Backend: Send + Sync {
    fn submit(&self, work: Work, priority: i32, sink: Sink) -> Result<(), GatewayError>;
}

impl Backend for Scheduler {
    fn submit(&self, work: Work, priority: i32, sink: Sink) -> Result<(), GatewayError> {
        Scheduler::submit(
            self,
            Job {
                prompt: work.prompt,
                params: work.params,
                priority,
                embed: work.embed,
                constraint: work.constraint,
                sink,
            },
        )
        .map_err(|e| match e {
            SubmitError::QueueFull(_) => GatewayError::Busy,
            SubmitError::Stopped => GatewayError::Unavailable(e.to_string()),
        })
    }
}

/// Where the plans' limits are kept.
#[derive(Clone)]
pub enum Limits {
    /// In this process: exact for one server (SQLite, or one replica).
    Local(Limiter),
    /// In the database: exact across every replica on it (PostgreSQL).
    Shared(SharedLimiter),
}

/// The database, the limits and the metrics every request is accounted in.
pub struct Gateway {
    pub db: Db,
    pub limits: Limits,
    pub metrics: Metrics,
}

impl Gateway {
    /// A gateway whose limits live in this process.
    pub fn new(db: Db, metrics: Metrics) -> Arc<Self> {
        Self::with_limits(db, metrics, Limits::Local(Limiter::default()))
    }

    pub fn with_limits(db: Db, metrics: Metrics, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            db,
            limits,
            metrics,
        })
    }

    /// Count a request against the caller's requests per minute, before any
    /// work is done for it.
    pub async fn admit(
        self: &Arc<Self>,
        caller: &Caller,
        endpoint: Endpoint,
        model: &str,
    ) -> Result<Request, GatewayError> {
        match &self.limits {
            Limits::Local(l) => l.count_request(&caller.user.id, &caller.plan)?,
            Limits::Shared(l) => l.count_request(&caller.user.id, &caller.plan).await??,
        }
        let id = format!(
            "{}-{}",
            endpoint.id_prefix(),
            hanlin_accounts::random_token(24)
        );
        Ok(self.request(caller, endpoint, model, id))
    }

    /// Admit one line of a batch: it does not count against the plan's
    /// requests per minute (a running batch must not lock its owner out of
    /// interactive use), its tokens do count against the token limits at
    /// the plan's batch price, and its request id is the line's own, so a
    /// line run again after a restart keeps one usage row.
    pub fn admit_batch_line(
        self: &Arc<Self>,
        caller: &Caller,
        model: &str,
        request_id: &str,
    ) -> Request {
        self.request(caller, Endpoint::Batch, model, request_id.to_string())
            .with_weight(caller.plan.batch_price_milli)
    }

    /// A new request at the plan's price.
    fn request(
        self: &Arc<Self>,
        caller: &Caller,
        endpoint: Endpoint,
        model: &str,
        id: String,
    ) -> Request {
        Request {
            gw: self.clone(),
            id,
            caller: caller.clone(),
            model: model.to_string(),
            endpoint,
            weight_milli: caller.plan.price_milli.max(0),
            created: hanlin_accounts::now(),
            started: Instant::now(),
            reservations: Vec::new(),
            held: false,
            charged: Spend::default(),
            usage: Usage::default(),
            step: Vec::new(),
            rx: None,
            writer: None,
            first_token: None,
            last_token: Instant::now(),
            settled: false,
        }
    }
}

/// Per job of the current step: what it has counted so far.
#[derive(Default, Clone)]
struct JobCounts {
    /// Its prompt is another job's of the same step (the `n` choices of one
    /// request share a prompt, which is counted once).
    shares_prompt: bool,
    started: bool,
    prompt: i64,
    cached: i64,
    completion: i64,
}

impl JobCounts {
    /// The backend started the job (first report wins); whether this is it.
    fn start(&mut self, prompt: usize, cached: usize) -> bool {
        if self.started {
            return false;
        }
        self.started = true;
        self.prompt = prompt as i64;
        self.cached = cached as i64;
        true
    }
}

/// One admitted request: reserve, submit, read events, finish.
pub struct Request {
    gw: Arc<Gateway>,
    id: String,
    caller: Caller,
    model: String,
    endpoint: Endpoint,
    weight_milli: i64,
    created: i64,
    started: Instant,
    reservations: Vec<Reservation>,
    /// A hold in the shared limits is to be released once the usage row is
    /// final.
    held: bool,
    /// What settled reservations already charged to the limiter.
    charged: Spend,
    /// Usage of the steps before the current one.
    usage: Usage,
    step: Vec<JobCounts>,
    rx: Option<mpsc::UnboundedReceiver<(usize, Event)>>,
    writer: Option<UsageWriter>,
    first_token: Option<Instant>,
    last_token: Instant,
    settled: bool,
}

impl Request {
    /// The request's id (its usage row's key).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Use `id` as the request id instead of a generated one (a web reply
    /// is keyed by its message).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Charge the request at `weight_milli` thousandths of what its plan
    /// charges (which is itself a fraction of full price).
    pub fn with_weight(mut self, weight_milli: i64) -> Self {
        self.weight_milli =
            (self.caller.plan.price_milli.max(0)).saturating_mul(weight_milli.max(0)) / FULL_PRICE;
        self
    }

    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// Unix time the request arrived.
    pub fn created(&self) -> i64 {
        self.created
    }

    /// Reserve up to `tokens` tokens (prompt + max new tokens, over all
    /// choices) against the plan's token limits. An agent loop reserves
    /// again for each further step.
    pub async fn reserve(&mut self, tokens: usize) -> Result<(), GatewayError> {
        self.reserve_spend(tokens, 0).await
    }

    /// Reserve `images` images against the plan's daily image quota; each
    /// counts once [`Request::record`] records it, and the reservation of
    /// those never drawn (cancelled, failed) is freed when the request ends.
    pub async fn reserve_images(&mut self, images: usize) -> Result<(), GatewayError> {
        self.reserve_spend(0, images).await
    }

    async fn reserve_spend(&mut self, tokens: usize, images: usize) -> Result<(), GatewayError> {
        // A further step: what the steps before reserved and did not use is
        // freed first, so an agent loop holds one step's worst case at a
        // time (plus what it really used), not the sum of all of them.
        if !self.reservations.is_empty() {
            self.end_step();
            let used = self.used_weighted();
            self.settle_reservations(used);
        }
        let gw = self.gw.clone();
        let user = self.caller.user.id.clone();
        let user = &user;
        let needed = Spend {
            tokens: (tokens as i64).saturating_mul(self.weight_milli) / FULL_PRICE,
            images: images as i64,
        };
        match &gw.limits {
            Limits::Local(limiter) => {
                let day = hanlin_accounts::day_of(hanlin_accounts::now());
                let spent = if limiter.knows(user, &day) {
                    Spend::default()
                } else {
                    gw.db.spent_on(user, &day).await?
                };
                let r = limiter.reserve(user, &self.caller.plan, needed, || spent)?;
                self.reservations.push(r);
            }
            Limits::Shared(limiter) => {
                // One hold per request: what it used in earlier steps plus
                // this step's worst case.
                self.end_step();
                let total = self.used_weighted().saturating_add(needed);
                limiter
                    .reserve(&self.id, user, &self.caller.plan, total)
                    .await??;
                self.held = true;
            }
        }
        Ok(())
    }

    /// Start a step: each of `work` runs on `backend`; their events come
    /// out of [`Request::next`] numbered by their place in `work`. A step
    /// must end (every job `Done` or `Failed`) before the next is submitted.
    pub fn submit(&mut self, backend: &dyn Backend, work: Vec<Work>) -> Result<(), GatewayError> {
        self.end_step();
        let (tx, rx) = mpsc::unbounded_channel();
        self.step = work
            .iter()
            .enumerate()
            .map(|(i, w)| JobCounts {
                shares_prompt: work[..i].iter().any(|o| o.prompt == w.prompt),
                ..Default::default()
            })
            .collect();
        let priority = self.caller.plan.priority as i32;
        for (i, w) in work.into_iter().enumerate() {
            let tx = tx.clone();
            backend.submit(w, priority, Box::new(move |e| tx.send((i, e)).is_ok()))?;
        }
        self.rx = Some(rx);
        Ok(())
    }

    /// Fold the current step's counts into the request's usage.
    /// What was used so far as it counts against the plan's limits.
    fn used_weighted(&self) -> Spend {
        if self.writer.is_some() {
            Spend {
                tokens: self.usage.tokens().saturating_mul(self.weight_milli) / FULL_PRICE,
                images: self.usage.images,
            }
        } else {
            Spend::default()
        }
    }

    /// Replace the reservations held by the use not yet charged (`used`
    /// in all, less what earlier settlements charged).
    fn settle_reservations(&mut self, used: Spend) {
        let Limits::Local(limiter) = &self.gw.limits else {
            return;
        };
        let mut rs = std::mem::take(&mut self.reservations).into_iter();
        if let Some(first) = rs.next() {
            limiter.settle(first, used - self.charged);
            self.charged = used;
        }
        for r in rs {
            limiter.settle(r, Spend::default());
        }
    }

    fn end_step(&mut self) {
        let s = self.step_usage();
        self.usage.add(&s);
        self.step.clear();
    }

    fn step_usage(&self) -> Usage {
        let mut u = Usage::default();
        for j in &self.step {
            if !j.shares_prompt {
                u.prompt_tokens += j.prompt;
                u.cached_tokens += j.cached;
            }
            u.completion_tokens += j.completion;
        }
        u
    }

    /// Everything used so far.
    pub fn usage(&self) -> Usage {
        let mut u = self.usage;
        u.add(&self.step_usage());
        u
    }

    /// Add units a backend measures outside the token stream (audio,
    /// images).
    pub fn add_usage(&mut self, extra: &Usage) {
        self.usage.add(extra);
    }

    /// Whether the backend admitted any of the request's work.
    pub fn admitted(&self) -> bool {
        self.writer.is_some()
    }

    /// The next event of the current step (`None` once every job of it has
    /// ended), metered on the way.
    pub async fn next(&mut self) -> Option<(usize, Event)> {
        let (i, ev) = self.rx.as_mut()?.recv().await?;
        self.observe(i, &ev);
        Some((i, ev))
    }

    fn observe(&mut self, i: usize, ev: &Event) {
        let Some(j) = self.step.get_mut(i) else {
            return;
        };
        match ev {
            Event::Started {
                prompt_tokens,
                cached_tokens,
            } => {
                if j.start(*prompt_tokens, *cached_tokens) {
                    self.checkpoint(true);
                }
            }
            Event::Token { tokens, .. } => {
                j.completion += *tokens as i64;
                self.token_latency(Instant::now());
                self.checkpoint(false);
            }
            Event::Done {
                prompt_tokens,
                cached_tokens,
                completion_tokens,
                ..
            } => {
                // The final counts: an upstream's `Started` is an estimate,
                // its `Done` the node's checked usage.
                j.started = true;
                j.prompt = *prompt_tokens as i64;
                j.cached = *cached_tokens as i64;
                j.completion = *completion_tokens as i64;
            }
            Event::Failed(_)
            | Event::Embedding(_)
            | Event::Queued { .. }
            | Event::Prefill { .. } => {}
        }
    }

    /// Tokens arrived at `now`: time to first token, or between tokens.
    fn token_latency(&mut self, now: Instant) {
        if self.endpoint.streams() {
            let model = [self.model.as_str()];
            let m = &self.gw.metrics;
            match self.first_token {
                None => m
                    .ttft
                    .with_label_values(&model)
                    .observe((now - self.started).as_secs_f64()),
                Some(_) => m
                    .inter_token
                    .with_label_values(&model)
                    .observe((now - self.last_token).as_secs_f64()),
            }
        }
        self.first_token.get_or_insert(now);
        self.last_token = now;
    }

    /// Write the usage row: at once when `now` (the backend admitted the
    /// request: the row exists from then on), else when a checkpoint is due.
    fn checkpoint(&mut self, now: bool) {
        // Called for every token: only a write that is due adds up usage.
        if !now && self.writer.as_ref().is_some_and(|w| !w.due()) {
            return;
        }
        let usage = self.usage();
        match &mut self.writer {
            None => {
                let mut w = UsageWriter::start(
                    &self.gw.db,
                    UsageRecord {
                        request_id: self.id.clone(),
                        key_id: self.caller.key.id.clone(),
                        user_id: self.caller.user.id.clone(),
                        model: self.model.clone(),
                        endpoint: self.endpoint.as_str().to_string(),
                        ts: self.created,
                        usage,
                        weight_milli: self.weight_milli,
                    },
                );
                w.write(usage);
                self.writer = Some(w);
            }
            Some(w) => w.write(usage),
        }
    }

    /// Work done outside a [`Backend`] (an upstream server): `usage` is
    /// everything counted so far, `new_tokens` the tokens that arrived just
    /// now (for the latency metrics). The usage row is written at the
    /// first call and then at checkpoints, as for a backend's events.
    pub fn external(&mut self, usage: Usage, new_tokens: usize) {
        self.step.clear();
        self.usage = usage;
        if new_tokens > 0 {
            self.token_latency(Instant::now());
        }
        let first = self.writer.is_none();
        self.checkpoint(first);
    }

    /// Record a request that runs no backend work (a search): its usage
    /// row is written with what `usage` says.
    pub fn record(&mut self, usage: Usage) {
        self.usage.add(&usage);
        self.checkpoint(true);
    }

    /// End the request: free its backend work (if any still runs), settle
    /// the reservation and the usage row to what was counted, and wait
    /// until the row is in the database.
    pub async fn finish(mut self) {
        if let Some(task) = self.settle() {
            if let Err(e) = task.await {
                tracing::error!("usage writer for {}: {e}", self.id);
            }
        }
    }

    /// Settle once; the returned task finishes the usage row's writes.
    fn settle(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        if self.settled {
            return None;
        }
        self.settled = true;
        // Dropping the receiver makes the sinks fail: the scheduler frees
        // whatever still runs for this request.
        self.rx = None;
        self.end_step();
        let usage = self.usage;
        let used = self.used_weighted();
        self.settle_reservations(used);
        let m = &self.gw.metrics;
        m.duration
            .with_label_values(&[self.endpoint.as_str(), self.model.as_str()])
            .observe(self.started.elapsed().as_secs_f64());
        let hold = match (&self.gw.limits, self.held) {
            (Limits::Shared(l), true) => Some((l.clone(), self.id.clone())),
            _ => None,
        };
        let Some(writer) = self.writer.take() else {
            return hold.and_then(|h| release_after(None, h));
        };
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("cached", usage.cached_tokens),
            ("completion", usage.completion_tokens),
        ] {
            m.tokens
                .with_label_values(&[self.caller.key.id.as_str(), self.model.as_str(), kind])
                .inc_by(n.max(0) as u64);
        }
        let task = writer.settle(usage);
        match hold {
            Some(h) => release_after(Some(task), h),
            None => Some(task),
        }
    }
}

/// Release a request's hold in the shared limits once `task` (its usage
/// row's last write) is done, retrying while the database is away: the
/// usage row must count before the hold stops counting. Outside a runtime
/// nothing can run; the hold then lapses with [`MAX_HOLD_MS`] (or with its
/// replica's lease).
///
/// [`MAX_HOLD_MS`]: hanlin_accounts::replicas::MAX_HOLD_MS
fn release_after(
    task: Option<tokio::task::JoinHandle<()>>,
    (limiter, id): (SharedLimiter, String),
) -> Option<tokio::task::JoinHandle<()>> {
    let rt = tokio::runtime::Handle::try_current().ok()?;
    Some(rt.spawn(async move {
        if let Some(t) = task {
            if let Err(e) = t.await {
                tracing::error!("usage writer for {id}: {e}");
            }
        }
        // Retried until the database takes it, as the usage row was.
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0u32;
        while let Err(e) = limiter.release(&id).await {
            attempt += 1;
            tracing::warn!(attempt, "releasing the token hold of {id}: {e}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }))
}

impl Drop for Request {
    /// A request dropped unfinished (its client left, a handler returned
    /// early) is settled all the same; the usage row finishes in the
    /// background.
    fn drop(&mut self) {
        if !self.settled {
            // Outside a runtime the writer task cannot run; settle() then
            // still releases the reservation.
            let _ = self.settle();
        }
    }
}

/// How often a running request's usage row is brought up to date, bounding
/// what a killed process leaves unrecorded.
pub const USAGE_CHECKPOINT: Duration = Duration::from_secs(2);

/// One request's usage row, written in order by its own task: created when
/// the backend admits the request (so even a process killed mid-answer
/// leaves the prompt and the tokens up to the last checkpoint on record),
/// updated every [`USAGE_CHECKPOINT`] and settled at the end. Writes are
/// keyed by the request id (idempotent) and retried until the database
/// accepts them; queued checkpoints are coalesced to the newest.
struct UsageWriter {
    tx: mpsc::UnboundedSender<UsageRecord>,
    task: tokio::task::JoinHandle<()>,
    rec: UsageRecord,
    last: Instant,
}

impl UsageWriter {
    fn start(db: &Db, rec: UsageRecord) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<UsageRecord>();
        let db = db.clone();
        let task = tokio::spawn(async move {
            while let Some(mut rec) = rx.recv().await {
                while let Ok(newer) = rx.try_recv() {
                    rec = newer;
                }
                let mut delay = Duration::from_millis(100);
                let mut attempt = 0u32;
                while let Err(e) = db.record_usage(&rec).await {
                    attempt += 1;
                    tracing::warn!(attempt, "recording usage for {}: {e}", rec.request_id);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        });
        Self {
            tx,
            task,
            rec,
            last: Instant::now(),
        }
    }

    fn write(&mut self, usage: Usage) {
        self.rec.usage = usage;
        self.last = Instant::now();
        // The task lives until this sender is dropped.
        let _ = self.tx.send(self.rec.clone());
    }

    fn due(&self) -> bool {
        self.last.elapsed() >= USAGE_CHECKPOINT
    }

    /// The final counts; the task ends once every write is in the database.
    fn settle(mut self, usage: Usage) -> tokio::task::JoinHandle<()> {
        self.write(usage);
        drop(self.tx);
        self.task
    }
}
