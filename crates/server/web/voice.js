// Voice mode: talk with the assistant through an animated avatar.
//
// The page records the microphone itself (an AudioWorklet, 16 kHz mono:
// no codec on the way in), finds speech with an energy detector whose
// noise floor follows the room (hands-free) or records while the talk
// button is held, and sends the utterance as WAV to /api/voice/transcribe.
// The text goes into the conversation as a message (app.js `send`); the
// reply is cut into sentences as it streams, and each sentence is spoken
// (/api/voice/speak: audio, mouth shapes timed against it, an expression)
// as soon as it is complete, the next one fetched while this one plays.
// Speaking while the avatar talks (barge-in) stops it and the reply.
"use strict";

/** Mouth shapes (server names) as SVG paths around (100, 148). */
const MOUTHS = {
  rest: "M88 146 Q100 149 112 146 Q100 150 88 146 Z",
  closed: "M88 147 Q100 146 112 147 Q100 148 88 147 Z",
  lip: "M89 146 Q100 143 111 146 Q100 153 89 146 Z",
  open: "M88 143 Q100 138 112 143 Q100 166 88 143 Z",
  mid: "M87 145 Q100 141 113 145 Q100 158 87 145 Z",
  spread: "M84 146 Q100 143 116 146 Q100 154 84 146 Z",
  round: "M92 144 Q100 136 108 144 Q100 162 92 144 Z",
  pursed: "M95 146 Q100 141 105 146 Q100 153 95 146 Z",
  teeth: "M88 146 Q100 143 112 146 Q100 152 88 146 Z",
  // At rest, by expression.
  smiling: "M85 143 Q100 158 115 143 Q100 151 85 143 Z",
  sad: "M88 151 Q100 143 112 151 Q100 146 88 151 Z",
  surprised: "M95 145 Q100 138 105 145 Q100 156 95 145 Z",
};

const VOICE_RATE = 16000;
/** Speech must last this long to start a recording (hands-free). */
const START_MS = 140;
/** …and louder while the avatar talks, so its own voice does not interrupt it. */
const BARGE_IN_MS = 260;
/** This much silence ends an utterance (hands-free). */
const END_SILENCE_MS = 800;
/** Audio kept from before speech was detected. */
const PREROLL_MS = 300;
/** The longest utterance. */
const MAX_UTTERANCE_MS = 30000;

const voice = {
  open: false,
  phase: "idle",      // idle | listening | recording | thinking | speaking
  stream: null, ctx: null, node: null, rate: VOICE_RATE,
  floor: 0.004, loudMs: 0, silenceMs: 0, recMs: 0,
  preroll: [], rec: null, held: false,
  play: null,         // AudioContext for the replies
  generation: 0,      // bumped to drop what an interrupted reply still brings
  queue: [],          // promises of spoken sentences, in order
  playing: null,      // {source, cues, start}
  pending: "", firstSpoken: false, replyDone: true,
  persona: null,
  raf: 0, blinkTimer: 0,
};

function voiceStatus(key) {
  $("#voice-status").textContent = key ? t(key) : "";
}

function setPhase(phase) {
  voice.phase = phase;
  $("#avatar").dataset.state = phase;
  voiceStatus({ idle: "voiceIdle", listening: "voiceListening", recording: "voiceHearing", thinking: "voiceThinking", speaking: "voiceSpeaking" }[phase]);
  if (phase === "thinking") setExpression("thinking");
  else if (phase !== "speaking") setExpression("neutral");
}

function setExpression(expr) {
  const a = $("#avatar");
  a.dataset.expression = expr;
  if (a.dataset.mouth === "rest") setMouth("rest");
}

function setMouth(m) {
  const a = $("#avatar");
  a.dataset.mouth = m;
  const expr = a.dataset.expression;
  const d = m === "rest" && MOUTHS[expr] ? MOUTHS[expr] : MOUTHS[m] || MOUTHS.rest;
  $("#mouth").setAttribute("d", d);
}

function blink() {
  const a = $("#avatar");
  a.classList.add("blink");
  setTimeout(() => a.classList.remove("blink"), 140);
  voice.blinkTimer = setTimeout(blink, 2500 + Math.random() * 3000);
}

// ------------------------------------------------------------------ open / close

async function openVoice() {
  if (voice.open) return;
  voice.persona = typeof currentPersona === "function" ? currentPersona() : undefined;
  const look = voice.persona && state.me.looks.includes(voice.persona.look) ? voice.persona.look : "scholar";
  $("#avatar").setAttribute("class", "look-" + look);
  // Kokoro where the server has it: natural, but slower to first audio.
  $("#voice-natural-label").hidden = !state.me.natural_voice;
  $("#voice-natural").checked = localStorage.getItem("hanlin.naturalVoice") === "1";
  $("#voice").hidden = false;
  $("#voice-heard").textContent = "";
  $("#voice-said").textContent = "";
  voice.open = true;
  setMouth("rest");
  blink();
  // Both audio contexts are made while the click still counts as a user
  // gesture, so that the browser lets them play.
  voice.play = new AudioContext();
  try {
    voice.ctx = new AudioContext({ sampleRate: VOICE_RATE });
  } catch (_) {
    voice.ctx = new AudioContext(); // resampled when the utterance is sent
  }
  voice.rate = voice.ctx.sampleRate;
  try {
    if (!navigator.mediaDevices) throw new Error("no media devices (not a secure origin)");
    voice.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (e) {
    $("#voice-status").textContent = t("micUnavailable", { why: e.message || e.name });
    return;
  }
  await voice.ctx.audioWorklet.addModule("/assets/voice-worklet.js");
  if (!voice.open) return;
  const src = voice.ctx.createMediaStreamSource(voice.stream);
  voice.node = new AudioWorkletNode(voice.ctx, "pcm-capture");
  voice.node.port.onmessage = (e) => onAudio(e.data);
  src.connect(voice.node);
  setPhase(listeningPhase());
}

function closeVoice() {
  if (!voice.open) return;
  voice.open = false;
  stopSpeaking(true);
  clearTimeout(voice.blinkTimer);
  if (voice.stream) for (const tr of voice.stream.getTracks()) tr.stop();
  if (voice.ctx) voice.ctx.close().catch(() => {});
  if (voice.play) voice.play.close().catch(() => {});
  voice.stream = voice.ctx = voice.node = voice.play = null;
  voice.rec = null;
  $("#voice").hidden = true;
}

// ------------------------------------------------------------------ listening

function onAudio(block) {
  if (!voice.open) return;
  let sum = 0;
  for (let i = 0; i < block.length; i++) sum += block[i] * block[i];
  const rms = Math.sqrt(sum / block.length);
  const ms = (block.length / voice.rate) * 1000;
  $("#voice-meter span").style.width = Math.min(100, rms * 600) + "%";
  const threshold = Math.max(voice.floor * 3, 0.012);
  const loud = rms > threshold;

  if (voice.rec) {
    voice.rec.push(block);
    voice.recMs += ms;
    voice.silenceMs = loud ? 0 : voice.silenceMs + ms;
    if (voice.recMs >= MAX_UTTERANCE_MS || (!voice.held && voice.silenceMs >= END_SILENCE_MS)) finishUtterance();
    return;
  }
  if (!loud) voice.floor = Math.max(0.002, voice.floor * 0.95 + rms * 0.05);
  voice.preroll.push(block);
  while (voice.preroll.length * ms > PREROLL_MS) voice.preroll.shift();
  if (!$("#voice-handsfree").checked) return;
  const talking = voice.phase === "speaking";
  if (voice.phase !== "listening" && !talking) return;
  voice.loudMs = (talking ? rms > threshold * 1.5 : loud) ? voice.loudMs + ms : 0;
  if (voice.loudMs >= (talking ? BARGE_IN_MS : START_MS)) startUtterance();
}

function startUtterance() {
  if (voice.phase === "speaking" || state.streaming) stopSpeaking(true);
  voice.rec = voice.preroll.slice();
  voice.preroll = [];
  voice.recMs = voice.rec.length * 20;
  voice.silenceMs = 0;
  voice.loudMs = 0;
  setPhase("recording");
}

async function finishUtterance() {
  const blocks = voice.rec;
  voice.rec = null;
  voice.held = false;
  if (!blocks || voice.recMs < 300) { setPhase(listeningPhase()); return; }
  setPhase("thinking");
  const wav = wavBytes(resample(concat(blocks), voice.rate, VOICE_RATE), VOICE_RATE);
  let text = "";
  try {
    const r = await fetch("/api/voice/transcribe", {
      method: "POST", body: wav, credentials: "same-origin",
      headers: { "Content-Type": "audio/wav", "X-CSRF-Token": state.me.csrf },
    });
    const data = await r.json().catch(() => null);
    if (!r.ok) throw new Error((data && data.error && data.error.message) || "HTTP " + r.status);
    text = (data.text || "").trim();
  } catch (e) {
    notice(e.message, "error");
  }
  if (!voice.open) return;
  if (!text) { setPhase(listeningPhase()); return; }
  $("#voice-heard").textContent = text;
  $("#voice-said").textContent = "";
  ask(text);
}

function listeningPhase() {
  return $("#voice-handsfree").checked ? "listening" : "idle";
}

/** Send what was heard; speak the reply as it streams. */
async function ask(text) {
  // An interrupted reply may still be closing.
  for (let i = 0; state.streaming && i < 50; i++) await new Promise((r) => setTimeout(r, 50));
  const gen = ++voice.generation;
  voice.pending = "";
  voice.firstSpoken = false;
  voice.replyDone = false;
  const path = currentPath();
  send(text, path.length ? path[path.length - 1].id : null, {
    delta: (d) => {
      if (gen !== voice.generation) return;
      voice.pending += d;
      for (const s of takeSentences(false)) speakSentence(s, gen);
    },
    done: () => {
      if (gen !== voice.generation) return;
      for (const s of takeSentences(true)) speakSentence(s, gen);
      voice.replyDone = true;
      if (!voice.queue.length && !voice.playing) setPhase(listeningPhase());
    },
  });
}

/**
 * Complete sentences from the streamed text (all of it when `end`). The
 * first one may end at a comma once it is long enough, to speak sooner.
 */
function takeSentences(end) {
  const out = [];
  const re = /[。！？!?；;\n]|[.:](?=\s)/g;
  let m;
  let cut = 0;
  while ((m = re.exec(voice.pending))) cut = m.index + m[0].length;
  if (!cut && !voice.firstSpoken) {
    const comma = voice.pending.search(/[，,、]/);
    if (comma >= 12) cut = comma + 1;
  }
  if (end) cut = voice.pending.length;
  if (!cut) return out;
  const head = voice.pending.slice(0, cut);
  voice.pending = voice.pending.slice(cut);
  for (const piece of head.split(/(?<=[。！？!?；;\n])|(?<=[.:])\s+/)) {
    const s = speakable(piece);
    if (s) out.push(s);
  }
  return out;
}

/** Markdown as it would be read aloud: no code, marks or links. */
function speakable(text) {
  return text
    .replace(/```[\s\S]*?(```|$)/g, " ")
    .replace(/`([^`]*)`/g, "$1")
    .replace(/!?\[([^\]]*)\]\([^)]*\)/g, "$1")
    .replace(/https?:\/\/\S+/g, " ")
    .replace(/[*_#>|~]+/g, " ")
    .replace(/\s+/g, " ")
    .trim()
    .replace(/^[\p{P}\s]+$/u, "");
}

// ------------------------------------------------------------------ speaking

function speakSentence(text, gen) {
  voice.firstSpoken = true;
  const persona = voice.persona;
  const job = fetch("/api/voice/speak", {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": state.me.csrf },
    body: JSON.stringify({
      text,
      voice: (persona && persona.voice) || "",
      model: state.me.natural_voice && $("#voice-natural").checked ? "tts-1-hd" : "tts-1",
    }),
  }).then(async (r) => {
    const data = await r.json().catch(() => null);
    if (!r.ok) throw new Error((data && data.error && data.error.message) || "HTTP " + r.status);
    return { ...data, text };
  });
  job.catch(() => {}); // reported when its turn comes
  voice.queue.push({ job, gen });
  if (!voice.playing) playNext();
}

async function playNext() {
  if (voice.playing || !voice.queue.length || !voice.open) return;
  const { job, gen } = voice.queue[0];
  voice.playing = { pending: true };
  let said;
  try {
    said = await job;
  } catch (e) {
    notice(e.message, "error");
  }
  voice.queue.shift();
  voice.playing = null;
  if (gen !== voice.generation || !voice.open) return;
  if (!said) { playNext(); return; }
  const pcm = Uint8Array.from(atob(said.audio), (c) => c.charCodeAt(0));
  const n = pcm.length >> 1;
  const buf = voice.play.createBuffer(1, Math.max(1, n), said.rate);
  const ch = buf.getChannelData(0);
  const view = new DataView(pcm.buffer);
  for (let i = 0; i < n; i++) ch[i] = view.getInt16(i * 2, true) / 32768;
  const source = voice.play.createBufferSource();
  source.buffer = buf;
  source.connect(voice.play.destination);
  if (voice.play.state === "suspended") await voice.play.resume().catch(() => {});
  const start = voice.play.currentTime + 0.02;
  voice.playing = { source, cues: said.visemes, start, index: 0 };
  setPhase("speaking");
  setExpression(said.expression || "neutral");
  $("#voice-said").textContent = said.text;
  $("#avatar").dataset.spoken = String(Number($("#avatar").dataset.spoken || 0) + 1);
  source.onended = () => {
    if (!voice.playing || voice.playing.source !== source) return;
    voice.playing = null;
    setMouth("rest");
    if (voice.queue.length) playNext();
    else if (voice.replyDone) setPhase(listeningPhase());
  };
  source.start(start);
  animate();
}

/** Lip-sync: the mouth follows the cues by the playback clock. */
function animate() {
  cancelAnimationFrame(voice.raf);
  const step = () => {
    const p = voice.playing;
    if (!p || !p.cues) return;
    const ms = (voice.play.currentTime - p.start) * 1000;
    while (p.index + 1 < p.cues.length && p.cues[p.index + 1][0] <= ms) p.index++;
    const mouth = ms < 0 ? "rest" : p.cues[p.index][1];
    if ($("#avatar").dataset.mouth !== mouth) setMouth(mouth);
    voice.raf = requestAnimationFrame(step);
  };
  voice.raf = requestAnimationFrame(step);
}

/** Stop talking (barge-in, close): the sound, what is queued and, with `reply`, the reply itself. */
function stopSpeaking(reply) {
  voice.generation++;
  voice.queue = [];
  voice.pending = "";
  if (voice.playing && voice.playing.source) {
    try { voice.playing.source.stop(); } catch (_) { /* not started */ }
  }
  voice.playing = null;
  cancelAnimationFrame(voice.raf);
  setMouth("rest");
  if (reply && state.streaming) state.streaming.controller.abort();
}

// ------------------------------------------------------------------ audio helpers

function concat(blocks) {
  const n = blocks.reduce((a, b) => a + b.length, 0);
  const out = new Float32Array(n);
  let o = 0;
  for (const b of blocks) { out.set(b, o); o += b.length; }
  return out;
}

/** Linear resampling (only when the browser would not record at 16 kHz). */
function resample(x, from, to) {
  if (from === to) return x;
  const n = Math.floor((x.length * to) / from);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const p = (i * from) / to;
    const j = Math.floor(p);
    const f = p - j;
    out[i] = (x[j] || 0) * (1 - f) + (x[j + 1] || 0) * f;
  }
  return out;
}

/** 16-bit mono WAV. */
function wavBytes(samples, rate) {
  const buf = new ArrayBuffer(44 + samples.length * 2);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + samples.length * 2, true); str(8, "WAVE");
  str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
  str(36, "data"); v.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    v.setInt16(44 + i * 2, s < 0 ? s * 32768 : s * 32767, true);
  }
  return new Uint8Array(buf);
}

// ------------------------------------------------------------------ controls

document.addEventListener("DOMContentLoaded", () => {
  const talk = $("#voice-talk");
  const down = (e) => {
    e.preventDefault();
    if (!voice.open || voice.rec || !voice.ctx) return;
    if (voice.play && voice.play.state === "suspended") voice.play.resume().catch(() => {});
    voice.held = true;
    startUtterance();
  };
  const up = () => { if (voice.held && voice.rec) finishUtterance(); voice.held = false; };
  talk.addEventListener("pointerdown", down);
  talk.addEventListener("pointerup", up);
  talk.addEventListener("pointerleave", up);
  document.addEventListener("keydown", (e) => {
    if (!voice.open) return;
    if (e.key === "Escape") closeVoice();
    else if (e.code === "Space" && !e.repeat && e.target.tagName !== "INPUT") down(e);
  });
  document.addEventListener("keyup", (e) => { if (voice.open && e.code === "Space") up(); });
  $("#voice-close").addEventListener("click", closeVoice);
  $("#voice-handsfree").addEventListener("change", () => {
    if (voice.phase === "listening" || voice.phase === "idle") setPhase(listeningPhase());
  });
  $("#voice-natural").addEventListener("change", (e) => {
    localStorage.setItem("hanlin.naturalVoice", e.target.checked ? "1" : "0");
  });
});
