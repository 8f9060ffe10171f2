#!/usr/bin/env bash
# The test command: fetches the real models the tests use (once; they are
# cached in the model store) and the official `openai` Python client, and
# runs the whole test suite in release mode, then the web app's end-to-end
# tests in headless Chromium (scripts/e2e.sh installs what they need). With HANLIN_TEST_POSTGRES_URL
# set (see scripts/start_postgres.sh), the accounts and server tests run a
# second time against that PostgreSQL server (each test on a database of
# its own), with two `hanlin serve` replicas sharing one.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin hanlin
hanlin="${CARGO_TARGET_DIR:-target}/release/hanlin"
for m in smollm2-135m qwen2.5-coder-0.5b gemma3-270m multilingual-e5-small qwen2.5-coder-1.5b whisper-base; do
  "$hanlin" pull "$m"
done
python3 -c "import openai" 2>/dev/null || python3 -m pip install -q "openai==3.54.0"
env -u HANLIN_TEST_POSTGRES_URL -u HANLIN_REQUIRE_POSTGRES cargo test --release --workspace "$@"
# The kernels again on the narrower SIMD paths this CPU also supports.
HANLIN_SIMD=avx2 cargo test --release -p hanlin-kernels --lib
HANLIN_SIMD=scalar cargo test --release -p hanlin-kernels --lib
if [ -n "${HANLIN_TEST_POSTGRES_URL:-}" ]; then
  echo "== accounts and server tests on PostgreSQL"
  cargo test --release -p hanlin-accounts -p hanlin-server "$@"
  echo "== two hanlin serve replicas on one PostgreSQL"
  cargo test --release -p hanlin --test replicas "$@"
fi
echo "== web app end to end (headless Chromium)"
scripts/e2e.sh
