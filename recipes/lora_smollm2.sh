#!/usr/bin/env bash
# Adapt SmolLM2-135M-Instruct to a domain with LoRA on this machine's CPU:
# the domain is Hanlin's own documentation (the repository's Markdown
# files), every tenth block of 129 tokens held out. Prints the held-out
# perplexity of the base model and of the adapted one (it must drop),
# exports the merged model to GGUF and asks it a question about Hanlin.
# Figures in $OUT/run/summary.json, curves in $OUT/run/loss.csv and
# loss.png. Interrupt it and run it again: training resumes from its last
# checkpoint.
#   recipes/lora_smollm2.sh          (OUT=target/recipes/lora by default)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-target/recipes/lora}"
HANLIN="${HANLIN:-target/release/hanlin}"
[ -x "$HANLIN" ] || cargo build --release --bin hanlin
start=$(date +%s)
mkdir -p "$OUT/docs"
git ls-files '*.md' | while read -r f; do cp "$f" "$OUT/docs/$(echo "$f" | tr / _)"; done
"$HANLIN" train lora --base smollm2-135m --data "$OUT/docs" -o "$OUT/run" \
  --rank 8 --alpha 16 --targets wq,wk,wv,wo --steps "${STEPS:-60}" --batch-size 4 --seq-len 128 --lr 1e-3
"$HANLIN" export "$OUT/run" -o "$OUT/smollm2-hanlin.gguf" --quant q8_0
echo "== sample"
"$HANLIN" run "$OUT/smollm2-hanlin.gguf" --temperature 0 --max-tokens 60 "What does hanlin serve do?" || true
echo
echo "== done in $(( $(date +%s) - start )) s; figures in $OUT/run/summary.json"
