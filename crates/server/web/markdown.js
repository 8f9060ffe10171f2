// Markdown → safe HTML: marked parses, DOMPurify sanitises, highlight.js
// colours code, KaTeX typesets $…$, $$…$$, \(…\) and \[…\]. Math is cut out
// before parsing (so Markdown does not mangle it) and typeset into the
// sanitised DOM afterwards (KaTeX escapes its input; `trust` stays off).
"use strict";

const MATH_RE = /\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\]|\\\(([\s\S]+?)\\\)|\$([^\s$](?:[^$\n]*?[^\s$\\])?)\$(?!\d)/g;
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
    .map((p, i) => (i % 2 === 1 ? p : p.replace(MATH_RE, (m, d1, d2, i3, i4) => {
      const display = d1 !== undefined || d2 !== undefined;
      maths.push({ tex: d1 ?? d2 ?? i3 ?? i4, display });
      return "\u0000MATH" + (maths.length - 1) + "\u0000";
    })))
    .join("");
  let html = marked.parse(src);
  html = html.replace(/\u0000MATH(\d+)\u0000/g, '<span class="math" data-i="$1"></span>');
  el.innerHTML = DOMPurify.sanitize(html, { ADD_ATTR: ["data-i"], FORBID_TAGS: ["style", "form", "input", "button"] });
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
