#!/usr/bin/env bash
# Train a small Chinese poetry + chat model end to end on this machine's CPU:
# corpus (全唐詩 from npm chinese-poetry) → byte-level BPE tokenizer →
# pretraining (recipes/tiny-zh.toml) → SFT on conversations (poetry requests
# and chatterbot-corpus dialogues, recipes/poetry_chat.py) → DPO on
# preference pairs → evaluation → GGUF export → `hanlin run`.
# Figures are printed and kept in $OUT/{pre,sft,dpo}/summary.json
# (validation bits per character against a unigram baseline, SFT loss, DPO
# held-out preference accuracy, tokens/s); the loss curves are
# $OUT/*/loss.csv and loss.png. Interrupt it and run it again: each stage
# resumes from its last checkpoint.
#   recipes/poetry.sh               (OUT=target/recipes/poetry by default)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-target/recipes/poetry}"
HANLIN="${HANLIN:-target/release/hanlin}"
[ -x "$HANLIN" ] || cargo build --release --bin hanlin
mkdir -p "$OUT"
start=$(date +%s)
[ -d "$OUT/corpus" ] || python3 recipes/poetry_corpus.py "$OUT/corpus" ${LIMIT:+--limit "$LIMIT"}
[ -f "$OUT/chat/heldout.jsonl" ] || python3 recipes/poetry_chat.py "$OUT/corpus" "$OUT/chat"
[ -f "$OUT/tok.json" ] || "$HANLIN" train tokenizer --corpus "$OUT/corpus" --vocab "${VOCAB:-6000}" -o "$OUT/tok.json"
echo "== pretraining"
"$HANLIN" train pretrain --config "${CONFIG:-recipes/tiny-zh.toml}" --corpus "$OUT/corpus" \
  --tokenizer "$OUT/tok.json" -o "$OUT/pre"
echo "== supervised fine-tuning"
"$HANLIN" train sft --from "$OUT/pre" --data "$OUT/chat/sft.jsonl" -o "$OUT/sft" \
  --steps "${SFT_STEPS:-400}" --batch-size 16 --lr 1e-3 --seq-len 128
echo "== preference tuning (DPO)"
"$HANLIN" train dpo --from "$OUT/sft" --data "$OUT/chat/prefs.jsonl" -o "$OUT/dpo" \
  --steps "${DPO_STEPS:-150}" --batch-size 8 --lr 2e-4 --beta 0.1 --seq-len 128
echo "== evaluation on held-out conversations"
"$HANLIN" train eval "$OUT/dpo" --data "$OUT/chat/heldout.jsonl" --max-tokens 40
"$HANLIN" export "$OUT/dpo" -o "$OUT/poetry.gguf" --quant q8_0
echo "== samples"
for p in "寫一首五言絕句，題目是《春夜》。" "你好" "《靜夜思》是誰寫的？"; do
  echo "> $p"
  "$HANLIN" run "$OUT/poetry.gguf" --temperature 0.7 --max-tokens 48 "$p" || true
  echo
done
"$HANLIN" run "$OUT/poetry.gguf" --raw --temperature 0.8 --max-tokens 48 "《春夜》李白" || true
echo
echo "== done in $(( $(date +%s) - start )) s; figures in $OUT/{pre,sft,dpo}/summary.json"
