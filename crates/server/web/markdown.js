// Markdown → safe HTML: marked parses, DOMPurify sanitises, highlight.js
// colours code, KaTeX typesets $…$, $$…$$, \(…\) and \[…\]. Math is cut out
// before parsing (so Markdown does not mangle it) and typeset into the
// sanitised DOM afterwards (KaTeX escapes its input; `trust` stays off).
"use strict";

// Display math ($$…$$, \[…\]) and \(…\) are found by a left-to-right scan
// (a regular expression with a lazy [\s\S]+? rescans to the end of the text
// for every unclosed opener: quadratic on a reply full of "\["); inline
// $…$ stays a regular expression, which cannot cross a "$" or a line.
const MATH_PAIRS = [["$$", "$$", true], ["\\[", "\\]", true], ["\\(", "\\)", false]];
const INLINE_MATH_RE = /\$([^\s$](?:[^$\n]*?[^\s$\\])?)\$(?!\d)/g;

/** `text` with its math replaced by placeholders, each pushed onto `maths`. */
function cutMath(text, maths) {
  const hold = (tex, display) => {
    maths.push({ tex, display });
    return "\u0000MATH" + (maths.length - 1) + "\u0000";
  };
  const inline = (s) => s.replace(INLINE_MATH_RE, (m, tex) => hold(tex, false));
  const next = new Map(); // opener → its next position at or after i (-1: none left)
  let out = "";
  let i = 0;
  for (;;) {
    let best = null;
    for (const [open, close, display] of MATH_PAIRS) {
      let at = next.get(open);
      if (at === undefined || (at >= 0 && at < i)) { at = text.indexOf(open, i); next.set(open, at); }
      if (at >= 0 && (!best || at < best.at)) best = { at, open, close, display };
    }
    if (!best) break;
    const end = text.indexOf(best.close, best.at + best.open.length + 1);
    if (end < 0) { next.set(best.open, -1); continue; } // never closed: no later one can be either
    out += inline(text.slice(i, best.at)) + hold(text.slice(best.at + best.open.length, end), best.display);
    i = end + best.close.length;
  }
  return out + inline(text.slice(i));
}
const FENCE_RE = /(```[\s\S]*?(?:```|$)|`[^`\n]+`)/g;

function markdownSetup() {
  if (markdownSetup.done) return;
  markdownSetup.done = true;
  marked.setOptions({ gfm: true, breaks: true });
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
}

/** Render `text` into element `el` (replacing its content). */
function renderMarkdown(el, text) {
  markdownSetup();
  const maths = [];
  // Protect code first: math inside code is code.
  const parts = text.split(FENCE_RE);
  const src = parts
    .map((p, i) => (i % 2 === 1 ? p : cutMath(p, maths)))
    .join("");
  let html = marked.parse(src);
  html = html.replace(/\u0000MATH(\d+)\u0000/g, '<span class="math" data-i="$1"></span>');
  el.innerHTML = DOMPurify.sanitize(html, { ADD_ATTR: ["data-i"], FORBID_TAGS: ["style", "form", "input", "button"], FORBID_ATTR: ["style"] });
  for (const span of el.querySelectorAll("span.math")) {
    const m = maths[Number(span.dataset.i)];
    if (!m) continue;
    try {
      katex.render(m.tex, span, { displayMode: m.display, throwOnError: false, trust: false, strict: "ignore" });
    } catch (_) {
      span.textContent = m.tex;
    }
  }
  for (const code of el.querySelectorAll("pre > code")) decorateCode(code);
}

function decorateCode(code) {
  const lang = [...code.classList].find((c) => c.startsWith("language-"))?.slice(9) || "";
  try {
    if (lang && hljs.getLanguage(lang)) {
      code.innerHTML = hljs.highlight(code.textContent, { language: lang, ignoreIllegals: true }).value;
    } else if (code.textContent.length < 5000) {
      code.innerHTML = hljs.highlightAuto(code.textContent).value;
    }
    code.classList.add("hljs");
  } catch (_) { /* leave it plain */ }
  const pre = code.parentElement;
  const head = document.createElement("div");
  head.className = "code-head";
  const name = document.createElement("span");
  name.textContent = lang;
  const btn = document.createElement("button");
  btn.type = "button";
  btn.className = "copy-code";
  btn.textContent = t("copy");
  head.append(name, btn);
  pre.before(head);
}
