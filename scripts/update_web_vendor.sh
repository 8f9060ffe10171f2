#!/usr/bin/env bash
# Refresh the web app's pinned front-end libraries in crates/server/web/vendor
# from the npm registry (npm pack: no install, no build step). To update one,
# change its version here, run this script, look at the app, commit the diff.
set -euo pipefail
cd "$(dirname "$0")/../crates/server/web"
MARKED=18.2.1
DOMPURIFY=3.4.18
HLJS=11.12.0
KATEX=0.19.1
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
( cd "$tmp"
  npm pack -q "marked@$MARKED" "dompurify@$DOMPURIFY" "@highlightjs/cdn-assets@$HLJS" "katex@$KATEX" >/dev/null
  for t in *.tgz; do mkdir "${t%.tgz}"; tar -xzf "$t" -C "${t%.tgz}"; done )
rm -rf vendor && mkdir -p vendor/katex/fonts
cp "$tmp"/marked-*/package/lib/marked.umd.js vendor/marked.min.js
cp "$tmp"/dompurify-*/package/dist/purify.min.js vendor/purify.min.js
cp "$tmp"/highlightjs-cdn-assets-*/package/highlight.min.js vendor/highlight.min.js
cp "$tmp"/highlightjs-cdn-assets-*/package/styles/github.min.css vendor/hljs-light.css
cp "$tmp"/highlightjs-cdn-assets-*/package/styles/github-dark.min.css vendor/hljs-dark.css
cp "$tmp"/katex-*/package/dist/katex.min.js vendor/katex/katex.min.js
cp "$tmp"/katex-*/package/dist/katex.min.css vendor/katex/katex.min.css
cp "$tmp"/katex-*/package/dist/fonts/*.woff2 vendor/katex/fonts/
cat > vendor/VERSIONS <<V
marked $MARKED (MIT)
dompurify $DOMPURIFY (MPL-2.0 OR Apache-2.0)
@highlightjs/cdn-assets $HLJS (BSD-3-Clause)
katex $KATEX (MIT)
V
for f in "$tmp"/*/package/LICENSE*; do d="$(basename "$(dirname "$(dirname "$f")")")"; cp "$f" "vendor/LICENSE.${d%-*}"; done
du -sh vendor
