#!/usr/bin/env bash
# The test command: fetches the real models the tests use (once; they are
# cached in the model store) and runs the whole test suite in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin hanlin
for m in smollm2-135m qwen2.5-coder-0.5b gemma3-270m; do
  ./target/release/hanlin pull "$m"
done
cargo test --release --workspace "$@"
# The kernels again on the narrower SIMD paths this CPU also supports.
HANLIN_SIMD=avx2 cargo test --release -p hanlin-kernels --lib
HANLIN_SIMD=scalar cargo test --release -p hanlin-kernels --lib
