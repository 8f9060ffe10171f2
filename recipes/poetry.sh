#!/usr/bin/env bash
# Train a small Chinese poetry model end to end on this machine's CPU:
# corpus (全唐詩 from npm chinese-poetry) → byte-level BPE tokenizer →
# pretraining (recipes/tiny-zh.toml) → GGUF export → `hanlin run`.
# Figures (validation bits per character against a unigram baseline,
# tokens/s) are printed and kept in $OUT/pre/summary.json; the loss curves
# are $OUT/pre/loss.csv and loss.png. Interrupt it and run it again: the
# pretraining resumes from its last checkpoint.
#   recipes/poetry.sh               (OUT=target/recipes/poetry by default)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-target/recipes/poetry}"
HANLIN="${HANLIN:-target/release/hanlin}"
[ -x "$HANLIN" ] || cargo build --release --bin hanlin
mkdir -p "$OUT"
start=$(date +%s)
[ -d "$OUT/corpus" ] || python3 recipes/poetry_corpus.py "$OUT/corpus" ${LIMIT:+--limit "$LIMIT"}
[ -f "$OUT/tok.json" ] || "$HANLIN" train tokenizer --corpus "$OUT/corpus" --vocab "${VOCAB:-6000}" -o "$OUT/tok.json"
"$HANLIN" train pretrain --config "${CONFIG:-recipes/tiny-zh.toml}" --corpus "$OUT/corpus" \
  --tokenizer "$OUT/tok.json" -o "$OUT/pre"
"$HANLIN" export "$OUT/pre" -o "$OUT/poetry.gguf" --quant q8_0
echo "== samples (greedy-ish, temperature 0.8)"
for p in "《春夜》李白" "床前明月光，" "《送友人》"; do
  "$HANLIN" run "$OUT/poetry.gguf" --raw --temperature 0.8 --max-tokens 48 "$p" || true
  echo
done
echo "== done in $(( $(date +%s) - start )) s; figures in $OUT/pre/summary.json"
