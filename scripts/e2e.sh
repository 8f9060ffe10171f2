#!/usr/bin/env bash
# The web app's end-to-end tests: a real `hanlin serve` on the default model,
# driven in headless Chromium by playwright-core (e2e/chat.test.mjs).
# Installs what they need when it is missing: Debian's chromium and a CJK
# font (so screenshots show Chinese), the pinned playwright-core, and the
# official Python MCP SDK (the tools step's MCP server).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v chromium >/dev/null || missing+=(chromium)
fc-list 2>/dev/null | grep -qi "wenquanyi\|noto sans cjk" || missing+=(fonts-wqy-microhei)
command -v node >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The tools step's MCP server runs on the official Python SDK.
python3 -c "import mcp.server.mcpserver" 2>/dev/null || python3 -m pip install -q "mcp==2.3.0"
[ -d e2e/node_modules/playwright-core ] || (cd e2e && npm ci --no-audit --no-fund --loglevel=error)
hanlin="$(realpath -m "${CARGO_TARGET_DIR:-target}")/release/hanlin"
[ -x "$hanlin" ] || cargo build --release --bin hanlin
"$hanlin" pull qwen2.5-coder-0.5b >/dev/null
HANLIN_BIN="$hanlin" CHROMIUM="$(command -v chromium)" node e2e/chat.test.mjs
