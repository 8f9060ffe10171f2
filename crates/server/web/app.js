// The Hanlin chat app. One page; screens: sign-in, chat (sidebar +
// conversation), and dialogs (settings, keys, usage, admin, import).
// Everything the user or the model wrote is inserted as text, or as
// Markdown through renderMarkdown (sanitised).
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, props = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
};

const state = {
  me: null,          // {user, csrf, plan, default_model, max_message_chars}
  convs: [],         // conversation summaries, newest first
  conv: null,        // the open conversation
  messages: [],      // all its messages (a tree)
  byId: new Map(),
  streaming: null,   // {controller, replyId}
  personas: [],
  models: [],
};

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || "HTTP " + status);
    this.status = status;
    this.code = body && body.error && body.error.code;
  }
}

async function api(method, path, body, opts = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.me) headers["X-CSRF-Token"] = state.me.csrf;
  const r = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin", signal: opts.signal,
  });
  if (opts.raw) {
    if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
    return r;
  }
  const data = await r.json().catch(() => null);
  if (!r.ok) {
    const err = new ApiError(r.status, data);
    if (r.status === 401 && state.me) {
      sessionExpired();
    }
    throw err;
  }
  return data;
}

function notice(text, kind = "info") {
  const n = $("#notice");
  n.textContent = text;
  n.className = kind;
  n.hidden = !text;
}

// ------------------------------------------------------------------ sign-in

function showLogin(message) {
  state.me = null;
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  $("#login-name").focus();
  // A fresh server: the first account needs the setup token; a closed
  // server offers no sign-up at all.
  api("GET", "/api/setup").then((s) => {
    $("#setup-token-row").hidden = !s.needs_setup;
    $("#setup-hint").hidden = !s.needs_setup;
    $("#register-submit").hidden = !s.needs_setup && s.signup === "closed";
  }).catch(() => {});
}

function sessionExpired() {
  if (state.streaming) state.streaming.controller.abort();
  saveDraft();
  showLogin(t("sessionExpired"));
}

async function signIn(path) {
  const name = $("#login-name").value.trim();
  const password = $("#login-password").value;
  const body = { name, password };
  const token = $("#login-setup-token").value.trim();
  if (path === "/api/register" && token) body.setup_token = token;
  $("#login-info").textContent = "";
  $("#login-error").textContent = "";
  try {
    const r = await api("POST", path, body);
    $("#login-password").value = "";
    if (r.pending) {
      $("#login-info").textContent = t("pendingApproval");
      return;
    }
    state.me = r;
    await enterApp();
  } catch (e) {
    $("#login-error").textContent = e.message;
  }
}

async function enterApp() {
  state.me = await api("GET", "/api/me");
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#who").textContent = state.me.user.name + " · " + state.me.user.plan;
  $("#open-admin").hidden = state.me.user.role !== "admin";
  const models = await api("GET", "/api/models");
  state.models = models.data;
  await Promise.all([loadConversations(), loadPersonas()]);
  const m = location.pathname.match(/^\/c\/([\w-]+)$/);
  const want = m ? m[1] : sessionStorage.getItem("hanlin.open");
  if (want && state.convs.some((c) => c.id === want)) await openConversation(want);
  else showEmpty();
}

// ------------------------------------------------------------------ sidebar

async function loadConversations() {
  state.convs = (await api("GET", "/api/conversations")).data;
  renderConvList();
}

function renderConvList() {
  const list = $("#conv-list");
  list.replaceChildren();
  for (const c of state.convs) {
    const item = el("div", { class: "conv" + (state.conv && state.conv.id === c.id ? " active" : ""), "data-id": c.id },
      el("button", { class: "conv-title", text: c.title, title: c.title, onclick: () => openConversation(c.id) }),
      el("button", { class: "icon conv-rename", title: t("rename"), "aria-label": t("rename"), text: "✎", onclick: () => renameConversation(c) }),
      el("button", { class: "icon conv-delete", title: t("delete"), "aria-label": t("delete"), text: "×", onclick: () => deleteConversation(c) }));
    list.append(item);
  }
}

async function renameConversation(c) {
  const title = prompt(t("renamePrompt"), c.title);
  if (!title || !title.trim()) return;
  await api("PATCH", "/api/conversations/" + c.id, { title: title.trim() });
  await loadConversations();
  if (state.conv && state.conv.id === c.id) { state.conv.title = title.trim(); $("#chat-title").textContent = state.conv.title; }
}

async function deleteConversation(c) {
  if (!confirm(t("confirmDelete"))) return;
  await api("DELETE", "/api/conversations/" + c.id);
  if (state.conv && state.conv.id === c.id) showEmpty();
  await loadConversations();
}

let searchTimer = null;
function onSearchInput() {
  clearTimeout(searchTimer);
  const q = $("#search").value.trim();
  const box = $("#search-results");
  if (!q) { box.hidden = true; $("#conv-list").hidden = false; return; }
  searchTimer = setTimeout(async () => {
    const hits = (await api("GET", "/api/search?q=" + encodeURIComponent(q))).data;
    box.replaceChildren();
    if (!hits.length) box.append(el("p", { class: "muted small", text: t("noResults") }));
    for (const h of hits) {
      box.append(el("button", { class: "hit", onclick: () => openConversation(h.conversation_id, h.message_id) },
        el("strong", { text: h.title }), el("span", { class: "small muted", text: h.snippet })));
    }
    box.hidden = false;
    $("#conv-list").hidden = true;
  }, 200);
}

// ------------------------------------------------------------------ conversation

function showEmpty() {
  state.conv = null;
  state.messages = [];
  state.byId = new Map();
  sessionStorage.removeItem("hanlin.open");
  history.replaceState(null, "", "/");
  $("#chat-title").textContent = t("newChat");
  fillModelSelect(state.me.default_model);
  $("#messages").replaceChildren(el("div", { class: "empty", text: t("emptyChat") }));
  restoreDraft();
  renderConvList();
  renderKbToggle();
  renderToolsToggle();
  renderImageToggle();
}

function fillModelSelect(current) {
  const sel = $("#model-select");
  sel.replaceChildren(...state.models.map((m) => el("option", { value: m, text: m })));
  if (current && !state.models.includes(current)) sel.append(el("option", { value: current, text: current }));
  sel.value = current || state.me.default_model;
}

async function openConversation(id, focusMessage) {
  const data = await api("GET", "/api/conversations/" + id);
  state.conv = data.conversation;
  setMessages(data.messages);
  sessionStorage.setItem("hanlin.open", id);
  history.replaceState(null, "", "/c/" + id);
  $("#chat-title").textContent = state.conv.title;
  fillModelSelect(state.conv.model);
  renderConvList();
  renderKbToggle();
  renderToolsToggle();
  renderImageToggle();
  renderMessages();
  restoreDraft();
  document.body.classList.remove("sidebar-open");
  if (focusMessage) {
    const m = document.querySelector(`[data-id="${CSS.escape(focusMessage)}"]`);
    if (m) { m.scrollIntoView({ block: "center" }); m.classList.add("flash"); }
  }
}

function setMessages(list) {
  state.messages = list;
  state.byId = new Map(list.map((m) => [m.id, m]));
}

function children(parentId) {
  return state.messages.filter((m) => (m.parent_id || null) === (parentId || null));
}

/** The branch shown: root → current leaf. */
function currentPath() {
  let leafId = state.conv && state.conv.current_leaf;
  if (!leafId || !state.byId.has(leafId)) leafId = state.messages.length ? state.messages[state.messages.length - 1].id : null;
  const path = [];
  for (let m = state.byId.get(leafId); m; m = m.parent_id ? state.byId.get(m.parent_id) : null) {
    path.push(m);
    if (path.length > state.messages.length) break;
  }
  return path.reverse();
}

/** The newest leaf under message `id` (following the latest child at each step). */
function latestLeaf(id) {
  let cur = id;
  for (;;) {
    const kids = children(cur);
    if (!kids.length) return cur;
    cur = kids[kids.length - 1].id;
  }
}

function renderMessages() {
  const box = $("#messages");
  const frag = document.createDocumentFragment();
  const path = currentPath();
  if (!path.length) frag.append(el("div", { class: "empty", text: t("emptyChat") }));
  for (const m of path) frag.append(messageView(m));
  box.replaceChildren(frag);
  box.scrollTop = box.scrollHeight;
}

function messageView(m) {
  const body = el("div", { class: "body" });
  const steps = m.role === "assistant" && Array.isArray(m.tools) && m.tools.length ? toolSteps(m.tools) : null;
  const redrawn = m.role === "user" ? pictureOf(m.content) : null;
  if (m.role === "assistant") renderMarkdown(body, m.content || (m.status === "streaming" ? t("thinking") : ""));
  else if (redrawn) body.replaceChildren(el("img", { class: "source", src: redrawn.src, alt: "" }), el("div", { text: redrawn.text }));
  else body.textContent = m.content;
  const view = el("div", { class: "msg " + m.role + (m.status !== "done" ? " " + m.status : ""), "data-id": m.id, "data-status": m.status }, ...(steps ? [steps, body] : [body]));
  if (m.role === "assistant" && m.sources) {
    decorateCitations(body, m);
    if (m.sources.length) view.append(sourceCards(m));
  }
  const bar = el("div", { class: "msg-bar" });
  const siblings = children(m.parent_id);
  if (siblings.length > 1) {
    const i = siblings.findIndex((s) => s.id === m.id);
    const prev = el("button", { class: "icon branch-prev", "aria-label": "previous", text: "←", onclick: () => switchBranch(siblings[i - 1]) });
    const next = el("button", { class: "icon branch-next", "aria-label": "next", text: "→", onclick: () => switchBranch(siblings[i + 1]) });
    prev.disabled = i === 0;
    next.disabled = i === siblings.length - 1;
    bar.append(prev, el("span", { class: "branch-pos", text: `${i + 1}/${siblings.length}` }), next);
  }
  if (m.status === "incomplete") bar.append(el("span", { class: "tag", text: t("incomplete") }));
  if (m.status === "error") bar.append(el("span", { class: "tag error", text: t("errorReply") }));
  if (m.role === "user") {
    bar.append(el("button", { class: "link edit", text: t("edit"), onclick: () => startEdit(m, view) }));
  } else if (m.role === "assistant" && imageUrl(m.content)) {
    // A picture from image mode: download it, or draw the prompt again.
    const prompt = state.byId.get(m.parent_id);
    const asked = prompt && (pictureOf(prompt.content) || { src: null, text: prompt.content });
    bar.append(
      el("a", { class: "link download", text: t("download"), href: imageUrl(m.content), download: "hanlin-image.png" }),
      el("button", { class: "link again", text: t("anotherSeed"), onclick: () => asked && draw(asked.text, prompt.parent_id || null, asked.src && { src: asked.src }) }),
      el("button", { class: "link redraw", text: t("editPicture"), onclick: () => redrawFrom(imageUrl(m.content)) }));
    const used = revisedPrompt(m.content);
    // The English prompt the chat model wrote: edit it and draw again.
    if (used) bar.append(el("button", { class: "link edit-prompt", text: t("editPrompt"), onclick: () => editPrompt(used) }));
  } else if (m.role === "assistant") {
    bar.append(
      el("button", { class: "link copy", text: t("copy"), onclick: (e) => copyText(m.content, e.target) }),
      el("button", { class: "link regenerate", text: t("regenerate"), onclick: () => regenerate(m) }));
  }
  view.append(bar);
  return view;
}

async function switchBranch(target) {
  if (!target || state.streaming) return;
  const leaf = latestLeaf(target.id);
  state.conv.current_leaf = leaf;
  renderMessages();
  await api("PATCH", "/api/conversations/" + state.conv.id, { current_leaf: leaf });
}

function startEdit(m, view) {
  if (state.streaming) return;
  const body = view.querySelector(".body");
  const ta = el("textarea", { class: "edit-box", rows: "3" });
  // A redraw's prompt is edited without its picture, and redraws it again.
  const redrawn = pictureOf(m.content);
  ta.value = redrawn ? redrawn.text : m.content;
  const save = el("button", { class: "primary save-edit", text: t("saveAndSend"), onclick: async () => {
    const text = ta.value.trim();
    if (!text) return;
    if (redrawn) await draw(text, m.parent_id || null, { src: redrawn.src });
    else await send(text, m.parent_id || null);
  } });
  const cancel = el("button", { text: t("cancel"), onclick: () => renderMessages() });
  body.replaceChildren(ta, el("div", { class: "row" }, cancel, save));
  ta.focus();
}

async function regenerate(m) {
  if (state.streaming || !m.parent_id) return;
  await send(null, m.parent_id);
}

async function copyText(text, btn) {
  try { await navigator.clipboard.writeText(text); } catch (_) {
    const ta = el("textarea"); ta.value = text; document.body.append(ta); ta.select(); document.execCommand("copy"); ta.remove();
  }
  const old = btn.textContent; btn.textContent = t("copied"); setTimeout(() => (btn.textContent = old), 1200);
}

// ------------------------------------------------------------------ sending

function draftKey() { return "hanlin.draft." + (state.conv ? state.conv.id : "new"); }
function saveDraft() { localStorage.setItem(draftKey(), $("#input").value); }
function restoreDraft() { $("#input").value = localStorage.getItem(draftKey()) || ""; autoGrow(); }

function autoGrow() {
  const ta = $("#input");
  ta.style.height = "auto";
  ta.style.height = Math.min(ta.scrollHeight, 240) + "px";
  const max = state.me ? state.me.max_message_chars : 100000;
  const n = [...ta.value].length;
  const q = state.imageMode && state.imageQuota;
  const hint = $("#composer-hint");
  hint.textContent = n > max ? t("tooLong", { n: max })
    : q ? t("imagesLeft", { n: Math.max(0, q.max - q.used), max: q.max }) : "";
  // The pictures left are information; a message too long is an error
  // (and so is having no pictures left).
  hint.classList.toggle("info", n <= max && !!q && q.used < q.max);
  $("#send").disabled = n > max;
}

async function ensureConversation() {
  if (state.conv) return state.conv;
  const c = await api("POST", "/api/conversations", { model: $("#model-select").value, params: defaultParams() });
  // The draft typed before the conversation existed moves with it.
  localStorage.removeItem("hanlin.draft.new");
  state.conv = c;
  setMessages([]);
  sessionStorage.setItem("hanlin.open", c.id);
  history.replaceState(null, "", "/c/" + c.id);
  return c;
}

function defaultParams() {
  return { temperature: 0.7, top_p: 0.9, max_tokens: 1024 };
}

/** Read a reply's server-sent events (`data:` JSON lines), calling `onEvent` with each as it arrives. */
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const dec = new TextDecoder();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += dec.decode(value, { stream: true });
    let cut;
    while ((cut = pending.indexOf("\n\n")) >= 0) {
      const chunk = pending.slice(0, cut);
      pending = pending.slice(cut + 2);
      const data = chunk.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

/**
 * Send `text` as a new user message under `parentId`, or (text null) regenerate the reply to `parentId`.
 * `hooks` (voice mode): `delta(text)` as the reply streams, `done(status)` when it ends.
 */
async function send(text, parentId, hooks = {}) {
  if (state.streaming) return;
  const max = state.me.max_message_chars;
  if (text != null && [...text].length > max) { notice(t("tooLong", { n: max }), "error"); return; }
  let body = null;
  let frame = 0;
  let reply = null;
  const paint = () => {
    frame = 0;
    if (reply && body) { renderMarkdown(body, reply.content); scrollToEnd(); }
  };
  const bodyOf = (m) => document.querySelector(`.msg[data-id="${CSS.escape(m.id)}"] .body`);
  const payload = text != null ? { content: text, parent_id: parentId } : { parent_id: parentId };
  await streamReply("messages", payload, text, {
    assistant(m) { reply = m; body = bodyOf(m); },
    event(ev, m) {
      if (ev.type === "tool_call" || ev.type === "tool_result") {
        // A step the server runs: shown at once, its result when it comes.
        m.tools = m.tools || [];
        const step = ev.type === "tool_call" ? { ...ev.call, running: true } : ev.result;
        const i = m.tools.findIndex((s) => s.id === step.id && s.step === step.step);
        if (i >= 0) m.tools[i] = step; else m.tools.push(step);
        renderMessages();
        body = bodyOf(m);
      } else if (ev.type === "delta") {
        m.content += ev.text;
        if (hooks.delta) hooks.delta(ev.text);
        if (!frame) frame = requestAnimationFrame(paint);
      } else if (ev.type === "done") {
        // Search mode: the text with its citations checked, and the sources.
        if (ev.sources) m.sources = ev.sources;
        if (ev.tools) m.tools = ev.tools;
      }
    },
    finally(m) {
      if (frame) cancelAnimationFrame(frame);
      if (hooks.done) hooks.done(m ? m.status : "error");
    },
  });
}

/** POST to a conversation's streaming endpoint (`messages` or `images`)
 * and follow its events: the user's and the assistant's records, then
 * `handlers.event` for the rest, `done` (status and final content) and
 * `error` handled here; an abort, an API error or a broken connection
 * (recovered by `reconnect`) too. `text`, when given, is the composer's
 * text, cleared once the server has taken it. */
async function streamReply(path, payload, text, handlers) {
  notice("");
  let conv;
  try {
    conv = await ensureConversation();
  } catch (e) {
    if (e.status !== 401) notice(e.message, "error");
    return;
  }
  const controller = new AbortController();
  state.streaming = { controller, replyId: null };
  setStreamingUi(true);
  let reply = null;
  try {
    const r = await api("POST", `/api/conversations/${conv.id}/${path}`, payload, { raw: true, signal: controller.signal });
    if (text != null && $("#input").value.trim() === text.trim()) { $("#input").value = ""; localStorage.removeItem(draftKey()); autoGrow(); }
    await readEvents(r, (ev) => {
      if (ev.type === "user" && ev.message) {
        addMessage(ev.message);
      } else if (ev.type === "assistant") {
        reply = ev.message;
        state.streaming.replyId = reply.id;
        addMessage(reply);
        renderMessages();
        handlers.assistant(reply);
      } else if (ev.type === "error" && reply) {
        reply.status = "error";
        notice(ev.message, "error");
      } else if (reply) {
        if (ev.type === "done") {
          reply.status = ev.status;
          if (typeof ev.content === "string") reply.content = ev.content;
        }
        handlers.event(ev, reply);
      }
    });
  } catch (e) {
    if (e.name === "AbortError") {
      if (reply) reply.status = "incomplete";
    } else if (e instanceof ApiError) {
      if (e.status === 401) sessionExpired(); else notice(e.message, "error");
    } else {
      // The connection broke (server restart, network): recover.
      if (reply) reply.status = "incomplete";
      reconnect(conv.id);
    }
  } finally {
    if (handlers.finally) handlers.finally(reply);
    state.streaming = null;
    setStreamingUi(false);
    if (state.conv && state.conv.id === conv.id) renderMessages();
    loadConversations().catch(() => {});
  }
}

/** The image an image-mode reply shows (a stored file of this user), or null. */
function imageUrl(content) {
  const m = /!\[[^\]]*\]\((\/v1\/files\/[A-Za-z0-9_-]+\/content)\)/.exec(content || "");
  return m ? m[1] : null;
}

/** The English prompt an image reply says the chat model wrote (the
 * server's `> 🖋 …` line), or null. */
function revisedPrompt(content) {
  const m = /^> 🖋 (.+)$/m.exec(content || "");
  return m ? m[1].trim() : null;
}

function editPrompt(text) {
  state.imageMode = true;
  renderImageToggle();
  const input = $("#input");
  input.value = text;
  autoGrow();
  input.focus();
}

/** How many pictures the plan still allows today, for image mode's hint. */
async function refreshImageQuota() {
  try {
    const u = await api("GET", "/api/usage");
    state.imageQuota = { used: u.images_today, max: u.plan.images_per_day };
  } catch (_) {
    state.imageQuota = null;
  }
  autoGrow();
}

/** A user's image-mode message that redraws a picture (the server writes
 * it as the picture's link, a blank line, then the prompt): {src, text},
 * or null. */
function pictureOf(content) {
  const m = /^!\[[^\]]*\]\((\/v1\/files\/[A-Za-z0-9_-]+\/content)\)\n\n([\s\S]*)$/.exec(content || "");
  return m ? { src: m[1], text: m[2] } : null;
}

/** Redraw `src` next (a stored picture's URL or a PNG data URL): image
 * mode on, the picture shown above the composer with how much to change. */
function redrawFrom(src) {
  state.editFrom = src ? { src } : null;
  if (src) { state.imageMode = true; renderImageToggle(); $("#input").focus(); }
  renderEditFrom();
}

function renderEditFrom() {
  const box = $("#edit-from");
  const f = state.imageMode && state.editFrom;
  $("#attach-picture").hidden = !state.imageMode;
  box.hidden = !f;
  if (!f) { box.replaceChildren(); return; }
  const strength = el("input", { type: "range", id: "edit-strength", min: "0.3", max: "1", step: "0.05", value: String(state.strength || 0.8), "aria-label": t("changeHowMuch") });
  strength.addEventListener("input", () => { state.strength = Number(strength.value); });
  box.replaceChildren(
    el("img", { src: f.src, alt: "" }),
    el("span", { class: "muted small", text: t("redrawing") }),
    el("label", { class: "muted small", for: "edit-strength", text: t("changeHowMuch") }), strength,
    el("button", { type: "button", class: "icon clear-edit", "aria-label": t("cancel"), text: "✕", onclick: () => redrawFrom(null) }));
}

/** A picture the user chose, as a PNG data URL at most 1024 pixels on a side
 * (decoded without a URL, which the page's content policy would refuse). */
async function pictureAsPng(file) {
  let img;
  try {
    img = await createImageBitmap(file);
  } catch (_) {
    throw new Error(t("notAPicture"));
  }
  const k = Math.min(1, 1024 / Math.max(img.width, img.height));
  const c = document.createElement("canvas");
  c.width = Math.max(1, Math.round(img.width * k));
  c.height = Math.max(1, Math.round(img.height * k));
  c.getContext("2d").drawImage(img, 0, 0, c.width, c.height);
  img.close();
  return c.toDataURL("image/png");
}

/** Image mode: draw `prompt` into the conversation under `parentId` (redrawing
 * `from.src` when given), showing the denoising as it goes. */
async function draw(prompt, parentId, from) {
  if (state.streaming) return;
  const payload = { prompt, parent_id: parentId };
  if (from && from.src) {
    payload.image = from.src;
    if (state.strength) payload.strength = state.strength;
  }
  await streamReply("images", payload, prompt, {
    assistant() {},
    event(ev, reply) {
      if (ev.type !== "progress") return;
      const body = document.querySelector(`.msg[data-id="${CSS.escape(reply.id)}"] .body`);
      if (body) {
        const bar = el("progress", { max: ev.steps, value: ev.step });
        body.replaceChildren(el("img", { class: "preview", src: ev.preview, alt: "" }), el("div", { class: "muted small", text: t("drawing", { i: ev.step, n: ev.steps }) }), bar);
        scrollToEnd();
      }
    },
  });
  await refreshImageQuota();
}

function renderImageToggle() {
  const b = $("#toggle-image");
  const model = state.me && state.me.image_model;
  b.hidden = !model;
  if (!model) state.imageMode = false;
  const on = !!state.imageMode;
  b.replaceChildren(el("span", { class: "kb-icon", "aria-hidden": "true", text: "🎨" }), el("span", { class: "kb-label", text: on ? t("imageOn") : t("imageOff") }));
  b.title = t("imageHelp", { model: model || "" });
  b.setAttribute("aria-pressed", on ? "true" : "false");
  b.classList.toggle("on", on);
  $("#input").placeholder = on ? t("imagePlaceholder") : t("messagePlaceholder");
  renderEditFrom();
  if (on) refreshImageQuota(); else autoGrow();
}

function addMessage(m) {
  if (!state.byId.has(m.id)) state.messages.push(m);
  state.byId.set(m.id, m);
  state.conv.current_leaf = m.id;
}

function scrollToEnd() {
  const box = $("#messages");
  if (box.scrollHeight - box.scrollTop - box.clientHeight < 200) box.scrollTop = box.scrollHeight;
}

function setStreamingUi(on) {
  $("#send").hidden = on;
  $("#stop").hidden = !on;
  for (const b of document.querySelectorAll(".msg-bar button")) b.disabled = on;
}

async function reconnect(convId) {
  notice(t("connectionLost"), "error");
  for (let i = 0; i < 120; i++) {
    await new Promise((r) => setTimeout(r, 1000));
    try {
      const r = await fetch("/health");
      if (r.ok) break;
    } catch (_) { /* still down */ }
  }
  try {
    await api("GET", "/api/me");
    if (state.conv && state.conv.id === convId) await openConversation(convId);
    notice(t("reconnected"));
    setTimeout(() => notice(""), 2000);
  } catch (_) { /* a 401 shows the sign-in screen */ }
}

// ------------------------------------------------------------------ settings & personas

async function loadPersonas() {
  state.personas = (await api("GET", "/api/personas")).data;
}

function fillPersonas(selectedPrompt) {
  const sel = $("#persona-select");
  sel.replaceChildren(el("option", { value: "", text: t("noPersona") }), ...state.personas.map((p) => el("option", { value: p.id, text: p.name })));
  const match = state.personas.find((p) => p.prompt === selectedPrompt);
  sel.value = match ? match.id : "";
  fillPersonaStyle(match);
}

/** The voice and look selects of the settings dialog, set to `persona`'s. */
function fillPersonaStyle(persona) {
  $("#persona-voice").replaceChildren(el("option", { value: "", text: t("defaultChoice") }), ...state.me.voices.map((v) => el("option", { value: v, text: v })));
  $("#persona-look").replaceChildren(el("option", { value: "", text: t("defaultChoice") }), ...state.me.looks.map((l) => el("option", { value: l, text: t("look_" + l) })));
  $("#persona-voice").value = (persona && persona.voice) || "";
  $("#persona-look").value = (persona && persona.look) || "";
}

/** The persona whose prompt the open conversation uses, if any. */
function currentPersona() {
  const prompt = state.conv && state.conv.system_prompt;
  return prompt ? state.personas.find((p) => p.prompt === prompt) : undefined;
}

async function openSettings() {
  const conv = await ensureConversation();
  const p = conv.params || {};
  $("#system-prompt").value = conv.system_prompt || "";
  $("#p-temperature").value = p.temperature ?? 0.7;
  $("#p-top-p").value = p.top_p ?? 0.9;
  $("#p-max-tokens").value = p.max_tokens ?? 1024;
  fillPersonas(conv.system_prompt);
  $("#settings-dialog").showModal();
}

async function saveSettings() {
  const params = {
    ...(state.conv.params || {}),
    temperature: Number($("#p-temperature").value),
    top_p: Number($("#p-top-p").value),
    max_tokens: Math.max(1, Math.round(Number($("#p-max-tokens").value) || 1024)),
  };
  const c = await api("PATCH", "/api/conversations/" + state.conv.id, { system_prompt: $("#system-prompt").value, params });
  state.conv = { ...state.conv, ...c };
}

// ------------------------------------------------------------------ tools

/** A tool's name for people: the built-ins translated, an MCP server's tool as "server: tool". */
function toolLabel(name) {
  const key = "tool_" + name;
  const s = t(key);
  if (s !== key) return s;
  return name.includes("__") ? name.replace("__", ": ") : name;
}

/** One line per step, "计算器: 123456 * 654321 = 80779853376", each opening to its arguments and result. */
function toolSteps(steps) {
  const list = el("ol", { class: "tool-list" });
  for (const s of steps) {
    const result = s.running ? t("toolRunning") : String(s.content || "").replace(/^error: /, "⚠ ");
    const line = toolLabel(s.name) + ": " + (result.length > 120 ? result.slice(0, 120) + "…" : result);
    const detail = el("details", {},
      el("summary", { text: line + (s.ms != null && !s.running ? ` (${s.ms} ms)` : "") }),
      el("div", { text: t("toolArgs") }), el("pre", { text: s.arguments || "{}" }),
      el("div", { text: t("toolResult") }), el("pre", { text: s.running ? t("toolRunning") : String(s.content || "") }));
    list.append(el("li", { class: s.ok === false ? "failed" : "" }, detail));
  }
  const box = el("details", { class: "tool-steps" }, el("summary", { text: t("toolSteps", { n: steps.length }) }), list);
  // Open while it runs; closed once answered (a click opens it).
  if (steps.some((s) => s.running)) box.open = true;
  return box;
}

function convTools() {
  const tools = state.conv && state.conv.params && state.conv.params.tools;
  return Array.isArray(tools) ? tools : [];
}

async function availableTools() {
  if (!state.tools) state.tools = (await api("GET", "/api/tools")).data;
  return state.tools;
}

function renderToolsToggle() {
  const on = convTools().length > 0;
  const b = $("#toggle-tools");
  b.replaceChildren(el("span", { class: "kb-icon", "aria-hidden": "true", text: "🧮" }), el("span", { class: "kb-label", text: on ? t("toolsOn") : t("toolsOff") }));
  b.title = t("toolsHelp", { names: (state.tools || []).map((x) => toolLabel(x.name)).join(", ") || "…" });
  b.setAttribute("aria-pressed", on ? "true" : "false");
  b.classList.toggle("on", on);
}

/** The per-conversation switch: on = every tool this user may use, off = none. */
async function toggleTools() {
  await ensureConversation();
  const list = await availableTools();
  if (!list.length) { notice(t("noTools"), "error"); return; }
  const tools = convTools().length ? [] : list.map((x) => x.name);
  const params = { ...(state.conv.params || defaultParams()), tools };
  state.conv = { ...state.conv, ...(await api("PATCH", "/api/conversations/" + state.conv.id, { params })) };
  renderToolsToggle();
}

// ------------------------------------------------------------------ knowledge bases (search mode)

function convKbs() {
  const kb = state.conv && state.conv.params && state.conv.params.kb;
  return Array.isArray(kb) ? kb : [];
}

function renderKbToggle() {
  const names = convKbs();
  const b = $("#open-kb");
  const label = names.length ? t("searchOn", { names: names.join(", ") }) : t("searchOff");
  // Phones show the icon only (the label is for wider screens and readers).
  b.replaceChildren(el("span", { class: "kb-icon", "aria-hidden": "true", text: "🔎" }), el("span", { class: "kb-label", text: label }));
  b.title = label;
  b.classList.toggle("on", names.length > 0);
}

async function openKb() {
  await ensureConversation();
  $("#kb-result").textContent = "";
  await renderKbDialog();
  $("#kb-dialog").showModal();
}

async function renderKbDialog() {
  const list = (await api("GET", "/api/kb")).data;
  const used = new Set(convKbs());
  table($("#kb-table"), [t("useHere"), t("name"), t("documents"), t("feeds")], list.map((k) => {
    const box = el("input", { type: "checkbox", class: "kb-use", "data-name": k.name, "aria-label": k.name, onchange: setConvKbs });
    box.checked = used.has(k.name);
    const feeds = el("div", {}, ...(k.feeds || []).map((f) => el("div", {
      class: "small feed" + (f.last_error ? " error" : ""),
      text: f.url + (f.last_error ? ` — ${t("feedFailing")} ×${f.failures}: ${f.last_error}` : ` (${f.items_added})`),
    })));
    return [box, k.name, k.documents ?? "—", feeds];
  }));
  if (!list.length) $("#kb-table").replaceChildren(el("tr", {}, el("td", { text: t("noKbs") })));
  $("#kb-admin").hidden = state.me.user.role !== "admin";
  const target = $("#kb-target");
  const keep = target.value;
  target.replaceChildren(...list.map((k) => el("option", { value: k.name, text: k.name })));
  if (list.some((k) => k.name === keep)) target.value = keep;
}

async function setConvKbs() {
  const kb = [...document.querySelectorAll(".kb-use")].filter((b) => b.checked).map((b) => b.dataset.name);
  const params = { ...(state.conv.params || defaultParams()), kb };
  state.conv = { ...state.conv, ...(await api("PATCH", "/api/conversations/" + state.conv.id, { params })) };
  renderKbToggle();
}

function kbResult(text, error) {
  $("#kb-result").textContent = text;
  $("#kb-result").className = error ? "error" : "";
}

async function kbAction(fn) {
  try { await fn(); } catch (e) { kbResult(e.message, true); }
  await renderKbDialog();
}

async function uploadFiles(files) {
  const name = $("#kb-target").value;
  if (!name) return;
  for (const f of files) {
    kbResult(f.name + " …");
    const r = await fetch(`/v1/kb/${encodeURIComponent(name)}/files?filename=${encodeURIComponent(f.name)}`, {
      method: "POST", body: f, credentials: "same-origin",
      headers: { "X-CSRF-Token": state.me.csrf, "Content-Type": "application/octet-stream" },
    });
    const data = await r.json().catch(() => null);
    if (!r.ok) throw new ApiError(r.status, data);
    kbResult(t("uploaded", { file: f.name, added: data.added, duplicates: data.duplicates }));
  }
}

/** Turn `[n]` in an answer into links to its source cards (not inside code or math). */
function decorateCitations(body, m) {
  const byN = new Map(m.sources.map((s) => [s.index, s]));
  const walker = document.createTreeWalker(body, NodeFilter.SHOW_TEXT);
  const nodes = [];
  while (walker.nextNode()) nodes.push(walker.currentNode);
  for (const node of nodes) {
    if (node.parentElement.closest("code, pre, .katex, a")) continue;
    const parts = node.textContent.split(/(\[\d{1,2}\])/);
    if (parts.length < 2) continue;
    const frag = document.createDocumentFragment();
    for (const p of parts) {
      const n = /^\[(\d{1,2})\]$/.exec(p);
      const src = n && byN.get(Number(n[1]));
      if (src) frag.append(el("a", { class: "cite", href: `#src-${m.id}-${src.index}`, "data-n": String(src.index), text: `[${src.index}]` }));
      else if (p) frag.append(p);
    }
    node.replaceWith(frag);
  }
}

/** The cards of the sources an answer cites: number, title (a link when it is a URL), date, the passage. */
function sourceCards(m) {
  const list = el("ol", { class: "sources", "aria-label": t("sources") });
  for (const s of m.sources) {
    const title = /^https?:\/\//.test(s.source || "")
      ? el("a", { href: s.source, target: "_blank", rel: "noopener noreferrer", text: s.title })
      : el("span", { class: "src-title", text: s.title });
    const meta = [s.published ? day(s.published) : "", s.kb].filter(Boolean).join(" · ");
    list.append(el("li", { id: `src-${m.id}-${s.index}`, class: "source-card" },
      el("div", { class: "src-head" }, el("span", { class: "src-n", text: `[${s.index}]` }), title, el("span", { class: "muted small", text: meta })),
      el("p", { class: "src-text", text: s.text })));
  }
  return list;
}

/** Hovering or focusing a citation shows the passage it stands on. */
function wireCitations() {
  const pop = el("div", { id: "cite-pop", role: "tooltip" });
  pop.hidden = true;
  document.body.append(pop);
  const show = (a) => {
    const m = state.byId.get(a.closest(".msg")?.dataset.id);
    const src = m && m.sources && m.sources.find((s) => s.index === Number(a.dataset.n));
    if (!src) return;
    pop.replaceChildren(el("strong", { text: `[${src.index}] ${src.title}` }), el("p", { text: src.text }));
    pop.hidden = false;
    const r = a.getBoundingClientRect();
    pop.style.left = Math.max(8, Math.min(r.left, innerWidth - pop.offsetWidth - 8)) + "px";
    const below = r.bottom + 6 + pop.offsetHeight <= innerHeight;
    pop.style.top = (below ? r.bottom + 6 : Math.max(8, r.top - pop.offsetHeight - 6)) + "px";
  };
  const hide = () => { pop.hidden = true; };
  for (const [on, off] of [["mouseover", "mouseout"], ["focusin", "focusout"]]) {
    $("#messages").addEventListener(on, (e) => { const a = e.target.closest("a.cite"); if (a) show(a); });
    $("#messages").addEventListener(off, (e) => { if (e.target.closest("a.cite")) hide(); });
  }
  $("#messages").addEventListener("scroll", hide);
}

// ------------------------------------------------------------------ keys, usage, admin, import

function table(tableEl, headers, rows) {
  tableEl.replaceChildren(el("tr", {}, ...headers.map((h) => el("th", { text: h }))), ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, c instanceof Node ? c : document.createTextNode(String(c ?? "")))))));
}

const day = (ts) => (ts ? new Date(ts * 1000).toISOString().slice(0, 10) : "");

async function openKeys() {
  $("#key-secret").hidden = true;
  await renderKeys();
  $("#keys-dialog").showModal();
}

async function renderKeys() {
  $("#keys-dialog .muted").textContent = t("keysHelp", { base: location.origin });
  const keys = (await api("GET", "/api/keys")).data;
  table($("#keys-table"), [t("name"), "", t("created"), t("expires"), ""], keys.map((k) => [
    k.name, k.prefix + "…", day(k.created_at), k.revoked_at ? t("revoked") : day(k.expires_at),
    k.revoked_at ? "" : el("button", { class: "link", text: t("revoke"), onclick: async () => { await api("DELETE", "/api/keys/" + k.id); await renderKeys(); } }),
  ]));
}

async function createKey() {
  const r = await api("POST", "/api/keys", { name: $("#key-name").value.trim() });
  $("#key-secret").textContent = r.secret;
  $("#key-secret").hidden = false;
  $("#key-name").value = "";
  await renderKeys();
}

async function openUsage() {
  const u = await api("GET", "/api/usage");
  const p = u.plan;
  $("#usage-plan").textContent = `${t("plan")}: ${p.name} · ${t("tokensToday")}: ${u.tokens_today} / ${p.tokens_per_day} · ${t("imagesToday")}: ${u.images_today} / ${p.images_per_day} · ${p.tokens_per_minute} tokens ${t("perMinute")} · ${p.requests_per_minute} ${t("requests")} ${t("perMinute")}`;
  const perDay = new Map();
  for (const r of u.data) perDay.set(r.day, (perDay.get(r.day) || 0) + r.prompt_tokens + r.completion_tokens);
  $("#usage-chart").replaceChildren(barChart([...perDay.entries()].slice(-30), p.tokens_per_day));
  table($("#usage-table"), [t("day"), t("model"), t("requests"), t("prompt"), t("cached"), t("completion")],
    u.data.map((r) => [r.day, r.model, r.requests, r.prompt_tokens, r.cached_tokens, r.completion_tokens]));
  $("#usage-dialog").showModal();
}

// ------------------------------------------------------------------ batches

const ACTIVE = ["validating", "in_progress", "finalizing", "cancelling"];
let batchTimer = null;

async function openBatches() {
  $("#batch-result").textContent = "";
  await renderBatches();
  $("#batches-dialog").showModal();
}

/** The user's batches, newest first: status, a progress bar, downloads; refreshed while any runs. */
async function renderBatches() {
  clearTimeout(batchTimer);
  const list = (await api("GET", "/v1/batches?limit=50")).data;
  const fileLink = (id, label, b) => id
    ? el("a", { href: "/v1/files/" + encodeURIComponent(id) + "/content", download: `${b.id}-${label}.jsonl`, class: "batch-download", text: t(label) })
    : "";
  table($("#batches-table"), [t("created"), "", t("status"), t("progress"), t("download"), ""], list.map((b) => {
    const c = b.request_counts;
    const done = c.completed + c.failed;
    const bar = el("span", { class: "batch-progress" },
      el("progress", { max: String(Math.max(1, c.total)), value: String(done) }),
      ` ${done}/${c.total}` + (c.failed ? ` (${c.failed} ✗)` : ""));
    return [
      day(b.created_at), b.id.slice(0, 14) + "…",
      el("span", { class: "batch-status " + b.status, text: t("batch_" + b.status) }),
      bar,
      el("span", {}, fileLink(b.output_file_id, "results", b), " ", fileLink(b.error_file_id, "errors", b)),
      ACTIVE.includes(b.status) && b.status !== "cancelling"
        ? el("button", { class: "link", text: t("cancel"), onclick: async () => { await api("POST", `/v1/batches/${b.id}/cancel`); await renderBatches(); } })
        : "",
    ];
  }));
  if ($("#batches-dialog").open && list.some((b) => ACTIVE.includes(b.status))) {
    batchTimer = setTimeout(() => renderBatches().catch(() => {}), 1500);
  }
}

async function submitBatch() {
  const f = $("#batch-file").files[0];
  if (!f) return;
  const out = $("#batch-result");
  out.className = "small";
  out.textContent = f.name + " …";
  try {
    const form = new FormData();
    form.append("purpose", "batch");
    form.append("file", f, f.name);
    const r = await fetch("/v1/files", { method: "POST", body: form, credentials: "same-origin", headers: { "X-CSRF-Token": state.me.csrf } });
    const file = await r.json().catch(() => null);
    if (!r.ok) throw new ApiError(r.status, file);
    const b = await api("POST", "/v1/batches", { input_file_id: file.id, endpoint: $("#batch-endpoint").value, completion_window: "24h" });
    if (b.status === "failed") {
      const why = (b.errors && b.errors.data || []).slice(0, 3).map((e) => (e.line ? `#${e.line} ` : "") + e.message).join("; ");
      throw new Error(t("batchFailed", { why }));
    }
    out.textContent = t("batchStarted", { id: b.id, n: b.request_counts.total });
    $("#batch-file").value = "";
  } catch (e) {
    out.className = "small error";
    out.textContent = e.message;
  }
  await renderBatches();
}

/** Tokens per day as an SVG bar chart, with the plan's daily limit as a line. */
function barChart(points, limit) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 560, H = 180, pad = 24;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H + 20}`);
  svg.setAttribute("class", "chart");
  const max = Math.max(1, ...points.map((p) => p[1]));
  const bw = points.length ? Math.min(48, (W - pad) / points.length) : 0;
  points.forEach(([d, v], i) => {
    const h = (v / max) * (H - pad);
    const r = document.createElementNS(NS, "rect");
    r.setAttribute("x", pad + i * bw + 2); r.setAttribute("y", H - h); r.setAttribute("width", Math.max(1, bw - 4)); r.setAttribute("height", h);
    const tt = document.createElementNS(NS, "title"); tt.textContent = `${d}: ${v}`; r.append(tt);
    svg.append(r);
    const lab = document.createElementNS(NS, "text");
    lab.setAttribute("x", pad + i * bw + bw / 2); lab.setAttribute("y", H + 14); lab.setAttribute("text-anchor", "middle");
    lab.textContent = d.slice(5);
    svg.append(lab);
  });
  const cap = document.createElementNS(NS, "text");
  cap.setAttribute("x", 0); cap.setAttribute("y", 12); cap.textContent = `max ${max} / ${t("perDay")} ${limit}`;
  svg.append(cap);
  return svg;
}

/** The admin's MCP servers: the settings file's (read-only) and the screen's, each testable. */
async function renderMcp() {
  const list = (await api("GET", "/v1/admin/mcp")).data;
  const result = (text, error) => { $("#mcp-result").textContent = text; $("#mcp-result").className = "small" + (error ? " error" : ""); };
  table($("#admin-mcp"), [t("name"), t("origin"), "URL / command", t("plans"), ""], list.map((m) => [
    m.name, m.origin, m.url || m.command, [...m.plans, ...m.users].join(", ") || t("everyone"),
    el("span", {},
      el("button", { class: "link mcp-test", text: t("test"), onclick: async () => {
        const r = await api("GET", "/v1/admin/mcp/" + encodeURIComponent(m.name) + "/tools");
        result(r.ok ? m.name + ": " + r.tools.map((x) => x.name).join(", ") : r.error, !r.ok);
      } }),
      m.origin === "admin" ? el("button", { class: "link mcp-remove", text: t("remove"), onclick: async () => {
        await api("DELETE", "/v1/admin/mcp/" + encodeURIComponent(m.name)); await renderMcp();
      } }) : ""),
  ]));
}

async function addMcp() {
  const plans = $("#mcp-plans").value.split(",").map((x) => x.trim()).filter(Boolean);
  try {
    await api("PUT", "/v1/admin/mcp/" + encodeURIComponent($("#mcp-name").value.trim()), { url: $("#mcp-url").value.trim(), plans });
    $("#mcp-name").value = ""; $("#mcp-url").value = ""; $("#mcp-plans").value = "";
    $("#mcp-result").textContent = "";
    await renderMcp();
  } catch (e) {
    $("#mcp-result").textContent = e.message; $("#mcp-result").className = "small error";
  }
}

async function openAdmin() {
  await renderAdmin();
  await renderMcp();
  $("#admin-dialog").showModal();
}

async function renderAdmin() {
  const [users, plans, usage, keys, settings] = await Promise.all([api("GET", "/v1/admin/users"), api("GET", "/v1/admin/plans"), api("GET", "/v1/admin/usage"), api("GET", "/v1/admin/keys"), api("GET", "/v1/admin/settings")]);
  $("#admin-signup").value = settings.signup;
  const names = new Map(users.data.map((u) => [u.id, u.name]));
  table($("#admin-keys"), [t("name"), t("users"), "", t("created"), t("expires"), ""], keys.data.map((k) => [
    k.name, names.get(k.user_id) || k.user_id, k.prefix + "…", day(k.created_at), k.revoked_at ? t("revoked") : day(k.expires_at),
    k.revoked_at ? "" : el("button", { class: "link revoke-key", text: t("revoke"), onclick: async () => { await api("DELETE", "/v1/admin/keys/" + k.id); await renderAdmin(); } }),
  ]));
  const planNames = plans.data.map((p) => p.name);
  const setStatus = (u, status) => async () => { await api("PATCH", "/v1/admin/users/" + encodeURIComponent(u.name), { status }); await renderAdmin(); };
  table($("#admin-users"), [t("name"), t("role"), t("plan"), t("status"), ""], users.data.map((u) => {
    const sel = el("select", { class: "user-plan", onchange: async () => { await api("POST", "/v1/admin/users", { name: u.name, plan: sel.value }); await renderAdmin(); } },
      ...planNames.map((n) => el("option", { value: n, text: n })));
    sel.value = u.plan;
    const self = state.me && state.me.user.id === u.id;
    const actions = el("div", { class: "row small" },
      ...(u.status === "pending" ? [el("button", { class: "link approve-user", text: t("approve"), onclick: setStatus(u, "active") })] : []),
      ...(u.status === "active" && !self ? [el("button", { class: "link disable-user", text: t("disable"), onclick: setStatus(u, "disabled") })] : []),
      ...(u.status === "disabled" ? [el("button", { class: "link enable-user", text: t("enable"), onclick: setStatus(u, "active") })] : []),
      ...(!self ? [el("button", { class: "link delete-user", text: t("deleteUser"), onclick: async () => {
        if (!confirm(t("deleteUser") + " " + u.name + "?")) return;
        await api("DELETE", "/v1/admin/users/" + encodeURIComponent(u.name)); await renderAdmin();
      } })] : []));
    return [u.name, u.role, sel, el("span", { class: "user-status " + u.status, text: t("status_" + u.status) }), actions];
  }));
  table($("#admin-plans"), [t("name"), t("requests") + "/min", "tokens/min", "tokens/" + t("day"), "ctx", t("priority"), "n", t("price") + " ‰", ""], plans.data.map((p) => {
    const inputs = ["requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_context", "priority", "max_n", "price_milli"].map((k) => el("input", { type: "number", value: p[k], "data-k": k, class: "num" }));
    const save = el("button", { class: "link", text: t("save"), onclick: async () => {
      const body = { models: p.models };
      for (const i of inputs) body[i.dataset.k] = Number(i.value);
      await api("PUT", "/v1/admin/plans/" + encodeURIComponent(p.name), body);
      await renderAdmin();
    } });
    return [p.name, ...inputs, save];
  }));
  table($("#admin-usage"), [t("day"), t("name"), t("model"), t("requests"), t("prompt"), t("cached"), t("completion")],
    usage.data.map((r) => [r.day, r.user, r.model, r.requests, r.prompt_tokens, r.cached_tokens, r.completion_tokens]));
}

async function importFile(file) {
  const out = $("#import-result");
  out.textContent = "…";
  out.className = "";
  try {
    const text = await file.text();
    let json;
    try { json = JSON.parse(text); } catch (e) { throw new Error("JSON: " + e.message); }
    const r = await api("POST", "/api/import", json);
    out.textContent = t("imported", { n: r.imported });
    await loadConversations();
  } catch (e) {
    out.textContent = e.message;
    out.className = "error";
  }
}

function exportConv(format) {
  if (!state.conv) return;
  const a = el("a", { href: `/api/conversations/${state.conv.id}/export?format=${format}`, download: "" });
  document.body.append(a); a.click(); a.remove();
}

// ------------------------------------------------------------------ theme

function applyTheme(theme) {
  const dark = theme === "dark" || (!theme && matchMedia("(prefers-color-scheme: dark)").matches);
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  $("#hljs-dark").disabled = !dark;
  $("#hljs-light").disabled = dark;
}

// ------------------------------------------------------------------ wiring

function wire() {
  $("#login-form").addEventListener("submit", (e) => { e.preventDefault(); signIn("/api/login"); });
  $("#admin-signup").addEventListener("change", async () => {
    await api("PUT", "/v1/admin/settings", { signup: $("#admin-signup").value });
  });
  $("#register-submit").addEventListener("click", () => {
    if ($("#login-form").reportValidity()) signIn("/api/register");
  });
  for (const b of document.querySelectorAll(".lang-toggle")) b.addEventListener("click", () => {
    setLanguage(LANG === "zh" ? "en" : "zh");
    if (state.me) { if (state.conv) renderMessages(); else showEmpty(); renderConvList(); }
  });
  for (const b of document.querySelectorAll(".theme-toggle")) b.addEventListener("click", () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem("hanlin.theme", next);
    applyTheme(next);
  });
  $("#logout").addEventListener("click", async () => { await api("POST", "/api/logout").catch(() => {}); showLogin(); });
  $("#new-chat").addEventListener("click", () => { if (!state.streaming) { saveDraft(); showEmpty(); } });
  $("#search").addEventListener("input", onSearchInput);
  $("#toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
  $("#composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("#input").value.trim();
    if (!text) return;
    const path = currentPath();
    const parent = path.length ? path[path.length - 1].id : null;
    if (state.imageMode) {
      const from = state.editFrom;
      redrawFrom(null);
      draw(text, parent, from);
    } else send(text, parent);
  });
  $("#input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("#composer").requestSubmit(); }
  });
  $("#input").addEventListener("input", () => { autoGrow(); saveDraft(); });
  $("#stop").addEventListener("click", () => state.streaming && state.streaming.controller.abort());
  $("#model-select").addEventListener("change", async () => {
    if (state.conv) state.conv = { ...state.conv, ...(await api("PATCH", "/api/conversations/" + state.conv.id, { model: $("#model-select").value })) };
  });
  $("#open-settings").addEventListener("click", openSettings);
  $("#open-voice").addEventListener("click", () => openVoice().catch((e) => notice(e.message, "error")));
  $("#persona-select").addEventListener("change", () => {
    const p = state.personas.find((x) => x.id === $("#persona-select").value);
    if (p) $("#system-prompt").value = p.prompt;
    fillPersonaStyle(p);
  });
  $("#persona-save").addEventListener("click", async () => {
    const sel = state.personas.find((x) => x.id === $("#persona-select").value);
    const name = prompt(t("personaName"), sel ? sel.name : "");
    if (!name) return;
    const body = { name, prompt: $("#system-prompt").value, voice: $("#persona-voice").value, look: $("#persona-look").value };
    if (sel && sel.name === name) await api("PUT", "/api/personas/" + sel.id, body); else await api("POST", "/api/personas", body);
    await loadPersonas();
    fillPersonas($("#system-prompt").value);
  });
  $("#persona-delete").addEventListener("click", async () => {
    const id = $("#persona-select").value;
    if (!id) return;
    await api("DELETE", "/api/personas/" + id);
    await loadPersonas();
    fillPersonas("");
  });
  $("#settings-dialog").addEventListener("close", () => { if ($("#settings-dialog").returnValue === "save") saveSettings(); });
  $("#open-kb").addEventListener("click", openKb);
  $("#mcp-add").addEventListener("click", addMcp);
  $("#toggle-tools").addEventListener("click", () => toggleTools().catch((e) => notice(e.message, "error")));
  $("#toggle-image").addEventListener("click", () => { state.imageMode = !state.imageMode; renderImageToggle(); $("#input").focus(); });
  $("#attach-picture").addEventListener("click", () => $("#picture-file").click());
  $("#picture-file").addEventListener("change", async (e) => {
    const file = e.target.files && e.target.files[0];
    e.target.value = "";
    if (!file) return;
    try { redrawFrom(await pictureAsPng(file)); } catch (err) { notice(err.message, "error"); }
  });
  $("#kb-create").addEventListener("click", () => kbAction(async () => {
    const name = $("#kb-new-name").value.trim();
    if (!name) return;
    await api("PUT", "/v1/kb/" + encodeURIComponent(name));
    $("#kb-new-name").value = "";
    await renderKbDialog();
    $("#kb-target").value = name;
    kbResult("✓ " + name);
  }));
  $("#kb-files").addEventListener("change", (e) => {
    const files = [...e.target.files];
    e.target.value = "";
    kbAction(() => uploadFiles(files));
  });
  $("#kb-feed-add").addEventListener("click", () => kbAction(async () => {
    await api("POST", `/v1/kb/${encodeURIComponent($("#kb-target").value)}/feeds`, { url: $("#kb-feed-url").value.trim(), every: $("#kb-feed-every").value.trim() || "10m" });
    $("#kb-feed-url").value = "";
    kbResult(t("feedAdded"));
  }));
  wireCitations();
  $("#open-keys").addEventListener("click", openKeys);
  $("#key-create").addEventListener("click", createKey);
  $("#open-usage").addEventListener("click", openUsage);
  $("#open-batches").addEventListener("click", openBatches);
  $("#batch-submit").addEventListener("click", submitBatch);
  $("#batches-dialog").addEventListener("close", () => clearTimeout(batchTimer));
  $("#open-admin").addEventListener("click", openAdmin);
  $("#open-import").addEventListener("click", () => { $("#import-result").textContent = ""; $("#import-dialog").showModal(); });
  $("#import-file").addEventListener("change", async (e) => {
    const f = e.target.files[0];
    if (f) await importFile(f);
    e.target.value = ""; // the same file can be chosen again
  });
  for (const b of document.querySelectorAll("dialog .close")) b.addEventListener("click", (e) => e.target.closest("dialog").close());
  $("#export-md").addEventListener("click", () => exportConv("markdown"));
  $("#export-json").addEventListener("click", () => exportConv("json"));
  // Copy buttons on code blocks (rendered Markdown has no handlers of its own).
  $("#messages").addEventListener("click", (e) => {
    const b = e.target.closest(".copy-code");
    if (b) copyText(b.parentElement.nextElementSibling.textContent, b);
  });
}

async function main() {
  applyTheme(localStorage.getItem("hanlin.theme"));
  applyLanguage();
  wire();
  try {
    await enterApp();
  } catch (e) {
    showLogin(e.status === 401 ? "" : e.message);
  }
}

document.addEventListener("DOMContentLoaded", main);
