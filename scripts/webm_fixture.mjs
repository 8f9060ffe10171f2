// Records crates/speech/tests/data/jfk.webm the way a browser sends speech:
// headless Chromium plays jfk.wav into a MediaRecorder (WebM, Opus) in real
// time. Run once to make the fixture (needs e2e/node_modules: scripts/e2e.sh
// installs them): node scripts/webm_fixture.mjs
import { chromium } from "../e2e/node_modules/playwright-core/index.mjs";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const data = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "crates", "speech", "tests", "data");
const wav = fs.readFileSync(path.join(data, "jfk.wav")).toString("base64");
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox", "--autoplay-policy=no-user-gesture-required"] });
const page = await browser.newPage();
await page.goto("about:blank");
const b64 = await page.evaluate(async (wav) => {
  const bytes = Uint8Array.from(atob(wav), (c) => c.charCodeAt(0));
  const ctx = new AudioContext({ sampleRate: 48000 });
  const buf = await ctx.decodeAudioData(bytes.buffer);
  const dest = ctx.createMediaStreamDestination();
  const src = ctx.createBufferSource();
  src.buffer = buf;
  src.connect(dest);
  const rec = new MediaRecorder(dest.stream, { mimeType: "audio/webm;codecs=opus", audioBitsPerSecond: 32000 });
  const chunks = [];
  rec.ondataavailable = (e) => chunks.push(e.data);
  const done = new Promise((r) => { rec.onstop = r; });
  rec.start();
  src.start();
  await new Promise((r) => { src.onended = r; });
  await new Promise((r) => setTimeout(r, 300));
  rec.stop();
  await done;
  const out = new Uint8Array(await new Blob(chunks).arrayBuffer());
  let s = "";
  for (const x of out) s += String.fromCharCode(x);
  return btoa(s);
}, wav);
fs.writeFileSync(path.join(data, "jfk.webm"), Buffer.from(b64, "base64"));
console.log("wrote jfk.webm,", Buffer.from(b64, "base64").length, "bytes");
await browser.close();
