//! Text to image: `POST /v1/images/generations` on a diffusers pipeline
//! (`hanlin_image`). OpenAI's image model names (`dall-e-2`, `dall-e-3`,
//! `gpt-image-1`) mean the server's default image model, so unchanged
//! clients work. The pipeline loads on first use; its queue
//! (`hanlin_image::queue`) runs one image at a time, by the plan's
//! priority, and drops a job whose client has gone. Each finished image is
//! metered (`images`, `image_steps`); `url` answers are absolute links to
//! the image stored as the caller's file (`/v1/files/{id}/content`, owner
//! only: the same key or session), kept for `image_keep`.

use crate::error::ApiError;
use crate::extract::{ApiCaller, Body};
use crate::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use hanlin_accounts::{Caller, Usage};
use hanlin_gateway::Endpoint;
use hanlin_image::picture::{self, Picture, Start};
use hanlin_image::queue::{Job, Queue};
use hanlin_image::{ImageError, Pipeline, Request, Sampler};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

type AppResult<T> = Result<T, ApiError>;

/// OpenAI's image model names, served by the default image model.
pub const ALIASES: [&str; 4] = ["dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini"];
/// The most images one request may ask for (the plan's `max_n` may be less).
pub const MAX_IMAGES: i64 = 10;

/// The image models and the one loaded.
pub struct Images {
    store: hanlin_store::Store,
    threads: usize,
    default: Option<String>,
    loaded: tokio::sync::Mutex<Option<(String, Arc<Queue>)>>,
}

impl Images {
    pub fn new(store: hanlin_store::Store, threads: usize, default: Option<String>) -> Self {
        Self {
            store,
            threads,
            default,
            loaded: tokio::sync::Mutex::new(None),
        }
    }

    /// The image models `/v1/models` lists: the pulled ones, and the
    /// aliases when there is a default.
    pub fn model_names(&self) -> Vec<String> {
        let mut names = hanlin_image::installed(&self.store).unwrap_or_default();
        if let Some(d) = &self.default {
            let d = public_name(d);
            if !names.contains(&d) {
                names.push(d);
            }
        }
        if !names.is_empty() {
            names.extend(ALIASES.iter().map(|s| s.to_string()));
        }
        names
    }

    /// The default image model (as configured: a name or a path), if
    /// there is one.
    fn default_model(&self) -> Option<String> {
        self.default.clone().or_else(|| {
            hanlin_image::installed(&self.store)
                .ok()
                .and_then(|v| v.into_iter().next())
        })
    }

    /// The default image model's name as users see it.
    pub fn default_name(&self) -> Option<String> {
        self.default_model().as_deref().map(public_name)
    }

    /// The model a request's `model` means (`None`: the default).
    fn resolve(&self, requested: Option<&str>) -> AppResult<String> {
        let default = || -> AppResult<String> {
            self.default_model().ok_or_else(|| {
                ApiError::unavailable(
                    "No image model is installed on this server; an administrator can add one with `hanlin pull hf:owner/repo`.",
                )
                .code("model_not_available")
            })
        };
        match requested {
            None => default(),
            Some(m) if ALIASES.contains(&m) => default(),
            Some(m) if self.default.as_deref().is_some_and(|d| public_name(d) == m) => default(),
            Some(m) if self.model_names().iter().any(|n| n == m) => Ok(m.to_string()),
            Some(m) => Err(ApiError::model_not_found(m)),
        }
    }

    /// Whether an image model is loaded.
    pub async fn is_loaded(&self) -> bool {
        self.loaded.lock().await.is_some()
    }

    /// The queue of model `name`, loading it (and letting go of another
    /// model) when needed.
    async fn queue(&self, name: &str) -> AppResult<Arc<Queue>> {
        let mut loaded = self.loaded.lock().await;
        if let Some((n, q)) = loaded.as_ref() {
            if n == name {
                return Ok(q.clone());
            }
        }
        let home = self.store.home().to_path_buf();
        let (threads, model) = (self.threads, name.to_string());
        let pipe = tokio::task::spawn_blocking(move || -> Result<Pipeline, ImageError> {
            let store = hanlin_store::Store::open(home)?;
            hanlin_image::open(&store, Some(&model), threads, false)
        })
        .await
        .map_err(|e| ApiError::internal(format!("loading the image model failed: {e}")))?
        .map_err(|e| {
            tracing::error!("image model {name}: {e}");
            ApiError::unavailable(format!("The image model `{name}` could not be loaded."))
        })?;
        let q = Arc::new(Queue::new(Arc::new(pipe)));
        *loaded = Some((name.to_string(), q.clone()));
        Ok(q)
    }
}

#[derive(Deserialize)]
struct GenerationRequest {
    prompt: String,
    model: Option<String>,
    n: Option<i64>,
    size: Option<String>,
    response_format: Option<String>,
    quality: Option<String>,
    /// Hanlin's extensions: the same seed gives the same image.
    seed: Option<u64>,
    negative_prompt: Option<String>,
    steps: Option<usize>,
    guidance_scale: Option<f32>,
    sampler: Option<String>,
    /// false: a Chinese prompt reaches an English-only model unchanged.
    revise_prompt: Option<bool>,
    #[allow(dead_code)]
    style: Option<String>,
    #[allow(dead_code)]
    user: Option<String>,
    output_format: Option<String>,
}

const GENERATION_FIELDS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "quality",
    "seed",
    "negative_prompt",
    "steps",
    "guidance_scale",
    "sampler",
    "revise_prompt",
    "style",
    "user",
    "output_format",
];

/// The longest prompt taken, in characters (DALL·E 3's limit).
const MAX_PROMPT_CHARS: usize = hanlin_image::pipeline::MAX_PROMPT_CHARS;

/// Set when the handler is dropped (the client left): queued and running
/// jobs see it.
pub(crate) struct Gone(pub(crate) Arc<AtomicBool>);
impl Drop for Gone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn image_error(e: ImageError) -> ApiError {
    match e {
        ImageError::Request(m) => ApiError::bad_request(m),
        ImageError::Cancelled => ApiError::unavailable("The image was cancelled."),
        other => {
            tracing::error!("image generation: {other}");
            ApiError::internal("Generating the image failed.")
        }
    }
}

/// The name users see for an image model: a directory given by path
/// (`--image-model /models/sd15`) is known by its last part, never by
/// where the server keeps it.
pub(crate) fn public_name(model: &str) -> String {
    match std::path::Path::new(model).file_name() {
        Some(n) if model.contains(['/', '\\']) => n.to_string_lossy().into_owned(),
        _ => model.to_string(),
    }
}

/// What a caller asks for, from the API's body or the web app's.
pub(crate) struct Ask {
    pub prompt: String,
    pub negative: Option<String>,
    pub n: i64,
    pub size: Option<String>,
    pub quality: Option<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub sampler: Option<String>,
    pub seed: Option<u64>,
    /// Whether a Chinese prompt for an English-only model goes through
    /// the chat model first.
    pub revise: bool,
    /// A picture to start from (`/v1/images/edits`).
    pub start: Option<Start>,
}

/// A checked, admitted request: the gateway request it is metered on, the
/// model's queue and one pipeline request per image.
pub(crate) struct Prepared {
    pub request: hanlin_gateway::Request,
    pub queue: Arc<Queue>,
    pub model: String,
    pub requests: Vec<Request>,
    /// The prompt the image model was given, when the chat model wrote it.
    pub revised: Option<String>,
}

/// What the chat model is told when it puts a prompt into English.
const REVISE_SYSTEM: &str = "You write prompts for an image generator that understands only English. \
Rewrite the user's request as one English prompt that describes the picture in detail: the subject, \
what it is doing, the setting, the style, the light and the colours. Keep everything the user asked for \
and add nothing that contradicts it. Reply with the prompt only, in at most 60 words.";

/// The chat model's English version of `prompt`: its first non-empty
/// line, without quotes or a "Prompt:" label. `None` when the chat model
/// fails or answers with nothing usable (the prompt is then used as it
/// is); a refusal by the caller's limits is an error.
async fn revise(st: &AppState, caller: &Caller, prompt: &str) -> AppResult<Option<String>> {
    let model = st.config.default_model.clone();
    let request = st.gw.admit(caller, Endpoint::ImagePrompt, &model).await?;
    let text =
        match crate::chat_model::complete(st, request, &model, REVISE_SYSTEM, prompt, 160).await {
            Ok(t) => t,
            Err(e) if e.status == axum::http::StatusCode::TOO_MANY_REQUESTS => return Err(e),
            Err(e) => {
                tracing::warn!("rewriting an image prompt with {model}: {}", e.message);
                return Ok(None);
            }
        };
    Ok(clean_revision(&text))
}

fn clean_revision(text: &str) -> Option<String> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let line = ["Prompt:", "prompt:", "English prompt:", "English:"]
        .iter()
        .find_map(|p| line.strip_prefix(p))
        .unwrap_or(line)
        .trim()
        .trim_matches(|c| matches!(c, '"' | '\'' | '“' | '”' | '`'))
        .trim();
    // No brackets, angle brackets or backticks: the line is shown as
    // Markdown in the web app, where they could make links or markup.
    let line: String = line
        .chars()
        .filter(|c| !matches!(c, '[' | ']' | '<' | '>' | '`'))
        .take(MAX_PROMPT_CHARS)
        .collect();
    let line = line.trim().to_string();
    (!line.is_empty() && !hanlin_image::has_chinese(&line)).then_some(line)
}

/// Check what a request can be refused for without the model, admit it
/// (requests per minute) before any heavy work, load the model, check the
/// size against it, and make the image requests. Nothing is stored yet.
pub(crate) async fn prepare(
    st: &AppState,
    caller: &Caller,
    requested: Option<&str>,
    ask: &Ask,
    endpoint: Endpoint,
) -> AppResult<Prepared> {
    let prompt = ask.prompt.trim();
    if prompt.is_empty() {
        return Err(ApiError::bad_request("'prompt' must not be empty.").param("prompt"));
    }
    for (name, text) in [
        ("prompt", prompt),
        ("negative_prompt", ask.negative.as_deref().unwrap_or("")),
    ] {
        if text.chars().count() > MAX_PROMPT_CHARS {
            return Err(ApiError::bad_request(format!(
                "'{name}' is longer than {MAX_PROMPT_CHARS} characters."
            ))
            .param(name));
        }
    }
    let cap = MAX_IMAGES.min(caller.plan.max_n.max(1));
    if !(1..=cap).contains(&ask.n) {
        return Err(
            ApiError::bad_request(format!("'n' must be from 1 to {cap} on your plan.")).param("n"),
        );
    }
    if requested.is_some_and(|m| !crate::api::visible(caller, m)) {
        return Err(ApiError::model_not_found(requested.unwrap_or_default()));
    }
    let internal = st.images.resolve(requested)?;
    let model = public_name(&internal);
    if !crate::api::visible(caller, &model) && requested.is_none_or(|m| !ALIASES.contains(&m)) {
        return Err(ApiError::model_not_found(&model));
    }
    // Steps named, or the model's default times the quality's fraction
    // (known once the model is loaded).
    enum Steps {
        Named(usize),
        Times(usize, usize),
    }
    let steps = match (ask.steps, ask.quality.as_deref()) {
        (Some(s), _) if (1..=100).contains(&s) => Steps::Named(s),
        (Some(_), _) => {
            return Err(ApiError::bad_request("'steps' must be from 1 to 100.").param("steps"))
        }
        (None, None | Some("standard" | "medium" | "auto")) => Steps::Times(1, 1),
        (None, Some("low")) => Steps::Times(1, 2),
        (None, Some("hd" | "high")) => Steps::Times(3, 2),
        (None, Some(q)) => {
            return Err(ApiError::bad_request(format!(
                "Invalid quality '{q}': use standard, hd, low, medium, high or auto."
            ))
            .param("quality"))
        }
    };
    let sampler = match ask.sampler.as_deref() {
        None => None,
        Some(s) => Some(Sampler::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "Invalid sampler '{s}': use one of {}.",
                Sampler::NAMES.join(", ")
            ))
            .param("sampler")
        })?),
    };
    if ask.guidance.is_some_and(|g| !(0.0..=30.0).contains(&g)) {
        return Err(
            ApiError::bad_request("'guidance_scale' must be from 0 to 30.").param("guidance_scale"),
        );
    }
    let size = ask.size.as_deref().filter(|s| *s != "auto");
    let parsed = match size {
        None => None,
        Some(s) => Some(parse_size(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "Invalid size '{s}': use WIDTHxHEIGHT, e.g. 512x512."
            ))
            .param("size")
        })?),
    };
    let mut request = st.gw.admit(caller, endpoint, &model).await?;
    // The plan's daily images, before the model is loaded for them.
    request.reserve_images(ask.n as usize).await?;
    let queue = st.images.queue(&internal).await?;
    if ask.start.is_some() && !queue.pipeline.edits() {
        return Err(ApiError::bad_request(format!(
            "The image model '{model}' cannot edit pictures (it has no VAE encoder)."
        ))
        .param("model"));
    }
    let defaults = queue.pipeline.defaults;
    let steps = match steps {
        Steps::Named(s) => s,
        Steps::Times(num, den) => (defaults.steps * num / den).clamp(1, 100),
    };
    let guidance = ask.guidance.unwrap_or(defaults.guidance);
    let sampler = sampler.unwrap_or(defaults.sampler);
    let native = queue.pipeline.native_size();
    let m = queue.pipeline.size_multiple();
    // An edit is drawn at about its picture's size.
    let (width, height) = parsed.unwrap_or_else(|| match &ask.start {
        Some(s) => s.size(m),
        None => (native, native),
    });
    if width == 0 || height == 0 || width % m != 0 || height % m != 0 {
        return Err(ApiError::bad_request(format!(
            "Invalid size '{width}x{height}': both sides must be multiples of {m}."
        ))
        .param("size"));
    }
    if width * height > hanlin_image::pipeline::MAX_PIXELS {
        return Err(ApiError::bad_request(format!(
            "The size {width}x{height} is larger than this server makes (at most {} pixels).",
            hanlin_image::pipeline::MAX_PIXELS
        ))
        .param("size"));
    }
    let revised =
        if ask.revise && hanlin_image::has_chinese(prompt) && !queue.pipeline.reads_chinese() {
            revise(st, caller, prompt).await?
        } else {
            None
        };
    let used = revised.as_deref().unwrap_or(prompt);
    let seed = ask.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let init = ask.start.as_ref().map(|s| s.init(width, height));
    let requests = (0..ask.n)
        .map(|i| {
            let mut r = Request::new(used);
            r.negative = ask.negative.clone().unwrap_or_default();
            (r.width, r.height, r.steps, r.guidance, r.sampler) =
                (width, height, steps, guidance, sampler);
            r.seed = seed.wrapping_add(i as u64);
            r.init = init.clone();
            r
        })
        .collect();
    Ok(Prepared {
        request,
        queue,
        model,
        requests,
        revised,
    })
}

/// Run one image through the model's queue at `priority`, meter it on
/// `request` once it is finished, and return it as PNG. `gone` stops it
/// (the caller left); `progress` gets each step (with a small preview:
/// a TAESD's picture when one is pulled, else the latents mapped to RGB).
pub(crate) async fn generate(
    queue: &Queue,
    request: &mut hanlin_gateway::Request,
    priority: i64,
    r: Request,
    gone: &Arc<AtomicBool>,
    progress: Option<tokio::sync::mpsc::Sender<Value>>,
) -> AppResult<Vec<u8>> {
    let steps = r.steps as i64;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (g1, g2) = (gone.clone(), gone.clone());
    let job = Job {
        request: r,
        on_step: Box::new(move |p| {
            if let Some(out) = &progress {
                let png = p.preview().png();
                let url = format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(png)
                );
                let _ = out.try_send(
                    json!({"type": "progress", "step": p.step, "steps": p.steps, "preview": url}),
                );
            }
            !g1.load(Ordering::Relaxed)
        }),
        alive: Box::new(move || !g2.load(Ordering::Relaxed)),
        done: Box::new(move |res| {
            let _ = tx.send(res);
        }),
    };
    if queue
        .submit(job, priority.clamp(i32::MIN as i64, i32::MAX as i64) as i32)
        .is_err()
    {
        return Err(ApiError::new_status(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "The image queue is full; please retry shortly.",
        )
        .code("server_busy"));
    }
    let img = match rx.await {
        Ok(Ok(img)) => img,
        Ok(Err(e)) => return Err(image_error(e)),
        Err(_) => return Err(ApiError::internal("The image worker stopped.")),
    };
    request.record(Usage {
        images: 1,
        image_steps: steps,
        ..Usage::default()
    });
    tokio::task::spawn_blocking(move || img.png())
        .await
        .map_err(|e| ApiError::internal(format!("encoding the image failed: {e}")))
}

/// `POST /v1/images/generations`.
pub async fn generations(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
    headers: axum::http::HeaderMap,
    Body(body): Body,
) -> Response {
    let r = generations_inner(&st, caller, &origin(&headers), &body).await;
    crate::api::finish_response(&st, "images.generations", r)
}

/// The most bytes an edit's form may have: a picture, a mask and fields.
pub const MAX_EDIT_BYTES: usize = 2 * picture::MAX_PICTURE_BYTES + (1 << 20);

/// Fields of `/v1/images/edits` besides `image` and `mask`: OpenAI's, and
/// Hanlin's extensions as for generations plus `strength`.
const EDIT_FIELDS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "quality",
    "user",
    "output_format",
    "seed",
    "negative_prompt",
    "steps",
    "guidance_scale",
    "sampler",
    "strength",
    "revise_prompt",
];

/// `POST /v1/images/edits` (multipart, as OpenAI's): `image` (a PNG) and
/// `prompt`; `mask` (a PNG of the image's size whose fully transparent
/// pixels — or, without alpha, white ones — are where to paint; without
/// one, the image's own transparent pixels, and with neither the whole
/// picture is redrawn); `strength` (how far the picture is noised: default
/// 1 where painting, 0.8 for the whole picture).
pub async fn edits(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
    headers: axum::http::HeaderMap,
    form: axum::extract::Multipart,
) -> Response {
    let r = edits_inner(&st, caller, &origin(&headers), form).await;
    crate::api::finish_response(&st, "images.edits", r)
}

/// A field's value parsed, or an OpenAI-shaped error naming it.
fn field<T: std::str::FromStr>(
    fields: &std::collections::HashMap<String, String>,
    name: &str,
) -> AppResult<Option<T>> {
    fields
        .get(name)
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| ApiError::bad_request(format!("Invalid '{name}': {v:?}.")).param(name))
        })
        .transpose()
}

fn picture_error(e: ImageError, name: &str) -> ApiError {
    let msg = match e {
        ImageError::Request(m) => m,
        other => other.to_string(),
    };
    ApiError::bad_request(format!("'{name}': {msg}.")).param(name)
}

async fn edits_inner(
    st: &Arc<AppState>,
    caller: Caller,
    origin: &str,
    mut form: axum::extract::Multipart,
) -> AppResult<Response> {
    use crate::extract::{bad_form, field_bytes};
    let (mut image, mut mask) = (None::<Vec<u8>>, None::<Vec<u8>>);
    let mut fields = std::collections::HashMap::new();
    while let Some(mut field) = form.next_field().await.map_err(bad_form)? {
        let name = field.name().unwrap_or_default().to_string();
        if matches!(name.as_str(), "image" | "image[]" | "mask") {
            let param = if name == "mask" { "mask" } else { "image" };
            let slot = if name == "mask" {
                &mut mask
            } else {
                &mut image
            };
            if slot.is_some() {
                return Err(ApiError::bad_request(format!("Send one '{param}'.")).param(param));
            }
            let Some(bytes) = field_bytes(&mut field, picture::MAX_PICTURE_BYTES).await? else {
                return Err(ApiError::bad_request(format!(
                    "The '{param}' file is larger than {} MB.",
                    picture::MAX_PICTURE_BYTES >> 20
                ))
                .param(param)
                .code("file_too_large"));
            };
            *slot = Some(bytes);
            continue;
        }
        if !EDIT_FIELDS.contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "Unrecognized request argument supplied: {name}"
            ))
            .param(&name));
        }
        let Some(text) = field_bytes(&mut field, 4 * MAX_PROMPT_CHARS).await? else {
            return Err(ApiError::bad_request(format!("'{name}' is too long.")).param(&name));
        };
        fields.insert(name, String::from_utf8_lossy(&text).into_owned());
    }
    let image = image.ok_or_else(|| {
        ApiError::bad_request("The form has no 'image': send the picture as a file field.")
            .param("image")
    })?;
    let picture = Picture::from_png(&image).map_err(|e| picture_error(e, "image"))?;
    let mask = match mask {
        Some(bytes) => {
            let m = Picture::from_png(&bytes).map_err(|e| picture_error(e, "mask"))?;
            if (m.rgb.width, m.rgb.height) != (picture.rgb.width, picture.rgb.height) {
                return Err(ApiError::bad_request(format!(
                    "The mask is {}x{} but the image is {}x{}: they must be the same size.",
                    m.rgb.width, m.rgb.height, picture.rgb.width, picture.rgb.height
                ))
                .param("mask"));
            }
            Some(m)
        }
        None => None,
    };
    let start = Start::new(picture, mask.as_ref(), field(&fields, "strength")?)
        .map_err(|e| picture_error(e, "strength"))?;
    let requested = fields
        .get("model")
        .map(|m| m.trim())
        .filter(|m| !m.is_empty());
    let b64 = as_base64(
        requested,
        fields.get("response_format").map(|f| f.trim()),
        fields.get("output_format").map(|f| f.trim()),
    )?;
    let ask = Ask {
        prompt: fields.get("prompt").cloned().unwrap_or_default(),
        negative: fields.get("negative_prompt").cloned(),
        n: field(&fields, "n")?.unwrap_or(1),
        size: fields.get("size").cloned(),
        quality: fields.get("quality").cloned(),
        steps: field(&fields, "steps")?,
        guidance: field(&fields, "guidance_scale")?,
        sampler: fields.get("sampler").cloned(),
        seed: field(&fields, "seed")?,
        revise: field(&fields, "revise_prompt")?.unwrap_or(true),
        start: Some(start),
    };
    draw(st, &caller, origin, requested, ask, b64).await
}

/// Whether images are answered as `b64_json` (else as stored files'
/// URLs): as asked, or by default for `gpt-image-*` as OpenAI does; PNG is
/// the only output format.
fn as_base64(
    model: Option<&str>,
    response_format: Option<&str>,
    output_format: Option<&str>,
) -> AppResult<bool> {
    if output_format.is_some_and(|f| f != "png") {
        return Err(
            ApiError::bad_request("Only output_format 'png' is supported.").param("output_format"),
        );
    }
    match response_format {
        Some("b64_json") => Ok(true),
        Some("url") => Ok(false),
        None => Ok(model.is_some_and(|m| m.starts_with("gpt-image"))),
        Some(other) => Err(ApiError::bad_request(format!(
            "Invalid response_format '{other}': use url or b64_json."
        ))
        .param("response_format")),
    }
}

/// `scheme://host` the client reached the server at (the Host header,
/// which `guard` has checked; https when a proxy says so), for absolute
/// image URLs as OpenAI gives them; empty when the request names no host.
fn origin(headers: &axum::http::HeaderMap) -> String {
    let Some(host) = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && !h.contains(['/', '@', ' ']))
    else {
        return String::new();
    };
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    format!("{}://{host}", if https { "https" } else { "http" })
}

async fn generations_inner(
    st: &Arc<AppState>,
    caller: Caller,
    origin: &str,
    body: &[u8],
) -> AppResult<Response> {
    let req: GenerationRequest = crate::openai::parse(body, GENERATION_FIELDS)?;
    let requested = req.model.as_deref();
    let b64 = as_base64(
        requested,
        req.response_format.as_deref(),
        req.output_format.as_deref(),
    )?;
    let ask = Ask {
        prompt: req.prompt,
        negative: req.negative_prompt,
        n: req.n.unwrap_or(1),
        size: req.size,
        quality: req.quality,
        steps: req.steps,
        guidance: req.guidance_scale,
        sampler: req.sampler,
        seed: req.seed,
        revise: req.revise_prompt.unwrap_or(true),
        start: None,
    };
    draw(st, &caller, origin, requested, ask, b64).await
}

/// Prepare, generate and answer with the images (as `b64_json` or stored
/// files' URLs): the generations and edits endpoints' common end.
async fn draw(
    st: &Arc<AppState>,
    caller: &Caller,
    origin: &str,
    requested: Option<&str>,
    ask: Ask,
    b64: bool,
) -> AppResult<Response> {
    let Prepared {
        mut request,
        queue,
        requests,
        revised,
        ..
    } = prepare(st, caller, requested, &ask, Endpoint::Images).await?;
    let prompt = revised.unwrap_or_else(|| ask.prompt.trim().to_string());
    let gone = Gone(Arc::new(AtomicBool::new(false)));
    let mut data = Vec::new();
    let mut stored: Vec<String> = Vec::new();
    let mut failure = None;
    let n = requests.len();
    let steps = requests.first().map_or(0, |r| r.steps);
    for (i, r) in requests.into_iter().enumerate() {
        let png = match generate(&queue, &mut request, caller.plan.priority, r, &gone.0, None).await
        {
            Ok(png) => png,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        if b64 {
            data.push(json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(&png), "revised_prompt": prompt}));
            continue;
        }
        let name = format!("image-{}-{}.png", request.id(), i + 1);
        match keep_image(st, &caller.user.id, &name, &png).await {
            Ok(id) => {
                data.push(
                    json!({"url": format!("{origin}/v1/files/{id}/content"), "revised_prompt": prompt}),
                );
                stored.push(id);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    request.finish().await;
    if let Some(e) = failure {
        // Nothing half-done is kept: images already stored go.
        for id in &stored {
            let _ = crate::files::remove(st, id).await;
        }
        return Err(e);
    }
    drop(gone);
    Ok(Json(json!({
        "created": hanlin_accounts::now(),
        "data": data,
        "usage": {"images": n, "steps": steps * n},
    }))
    .into_response())
}

/// Store a finished image as the user's file, kept `image_keep`; its id.
pub(crate) async fn keep_image(
    st: &AppState,
    user_id: &str,
    name: &str,
    png: &[u8],
) -> AppResult<String> {
    let keep = st.config.image_keep.as_secs() as i64;
    let f = crate::files::store(
        st,
        user_id,
        IMAGE_PURPOSE,
        name,
        png,
        Some(hanlin_accounts::now() + keep),
    )
    .await?;
    Ok(f.id)
}

/// The purpose images are stored under (`/v1/files` lists them).
pub(crate) const IMAGE_PURPOSE: &str = "image_generation";

fn parse_size(s: &str) -> Option<(usize, usize)> {
    let (w, h) = s.split_once(['x', 'X'])?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::clean_revision;

    #[test]
    fn a_revision_is_one_plain_english_line() {
        assert_eq!(
            clean_revision("\n  Prompt: \"A cat by the West Lake at dusk\"\nMore words").as_deref(),
            Some("A cat by the West Lake at dusk")
        );
        assert_eq!(
            clean_revision("a cat ![x](http://evil/a.png) <b>bold</b> `code`").as_deref(),
            Some("a cat !x(http://evil/a.png) bbold/b code")
        );
        assert_eq!(clean_revision("一只猫"), None, "still Chinese");
        assert_eq!(clean_revision("  \n \"\" "), None);
    }
}
