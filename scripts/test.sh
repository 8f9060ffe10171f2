#!/usr/bin/env bash
# The test command: fetches the real models the tests use (once; they are
# cached in the model store) and the official `openai` Python client, and
# runs the whole test suite in release mode, then the web app's end-to-end
# tests in headless Chromium (scripts/e2e.sh installs what they need). With HANLIN_TEST_POSTGRES_URL
# set (see scripts/start_postgres.sh), the accounts and server tests run a
# second time against that PostgreSQL server (each test on a database of
# its own), with two `hanlin serve` replicas sharing one.
#
# Everything is compiled once, with the whole workspace's features: the
# later passes run the same test binaries (`cargo test -p X` would resolve
# features for X alone and rebuild most of the dependency tree). Arguments
# go to the first `cargo test` and, as a test filter, to the later passes.
set -euo pipefail
cd "$(dirname "$0")/.."
target="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
t0=$SECONDS
stage() { echo "== $* (at $((SECONDS - t0)) s)"; }
stage "build (the hanlin binary and every test binary)"
mkdir -p "$target"
binaries="$target/test-binaries.tsv"
cargo test --release --workspace --no-run --message-format=json-render-diagnostics \
  | scripts/test_binaries.py >"$binaries"
hanlin="$target/release/hanlin"
stage "models"
for m in smollm2-135m qwen2.5-coder-0.5b gemma3-270m multilingual-e5-small qwen2.5-coder-1.5b whisper-base kokoro-82m clip-bpe; do
  "$hanlin" pull "$m"
done
python3 -c "import openai" 2>/dev/null || python3 -m pip install -q "openai==3.54.0"

# run_tests PACKAGE [TARGET...]: the built test binaries of PACKAGE (all of
# them, or the named targets; `lib` is the library's unit tests), each run
# from its package directory as `cargo test` does.
run_tests() {
  local package="$1" found=0
  shift
  while IFS=$'\t' read -r pkg name exe dir; do
    [ "$pkg" = "$package" ] || continue
    if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
    found=1
    echo "     Running $pkg $name"
    (cd "$dir" && "$exe" ${filter[@]+"${filter[@]}"} ${skip[@]+"${skip[@]}"})
  done <"$binaries"
  [ "$found" = 1 ] || { echo "no test binary for $package $*" >&2; return 1; }
}
filter=()
skip=()
for a in "$@"; do [[ "$a" == -* ]] || filter+=("$a"); done

stage "tests"
env -u HANLIN_TEST_POSTGRES_URL -u HANLIN_REQUIRE_POSTGRES cargo test --release --workspace "$@"
stage "the kernels again on the narrower SIMD paths this CPU also supports"
HANLIN_SIMD=avx2 run_tests hanlin-kernels lib
# AVX2 with AVX-VNNI where the CPU has it (else the same as avx2).
HANLIN_SIMD=avxvnni run_tests hanlin-kernels lib
HANLIN_SIMD=scalar run_tests hanlin-kernels lib
if [ -n "${HANLIN_TEST_POSTGRES_URL:-}" ]; then
  stage "accounts and server tests on PostgreSQL"
  run_tests hanlin-accounts
  # Not twice: the speech, image and official-client tests, whose database
  # use (usage rows, stored files) the api and batch tests make too.
  skip=(--skip audio:: --skip images:: --skip openai_client::)
  run_tests hanlin-server
  skip=()
  stage "two hanlin serve replicas on one PostgreSQL"
  run_tests hanlin replicas
fi
stage "web app end to end (headless Chromium)"
scripts/e2e.sh
stage "done"
