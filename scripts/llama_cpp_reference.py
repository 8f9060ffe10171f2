#!/usr/bin/env python3
"""Regenerate Hanlin's reference fixtures from llama.cpp.

llama.cpp comes from the `llama-cpp-python` source package (its sdist vendors
llama.cpp under vendor/llama.cpp); `scripts/build_llama_cpp.sh` builds it and
prints the two paths this script needs:

    eval "$(scripts/build_llama_cpp.sh)"     # sets LLAMA_CPP_PY and LLAMA_CPP_LIB_PATH
    python3 scripts/llama_cpp_reference.py MODEL.gguf NAME [--plain] [--steps N]

Writes crates/engine/tests/fixtures/NAME.tokens.json (token ids for a corpus of Chinese,
English, mixed, emoji, code and whitespace-heavy strings) and
crates/engine/tests/fixtures/NAME.logits.json (greedy continuations with the top logits at
every step, for the parity test).
"""
import json
import os
import sys

sys.path.insert(0, os.environ["LLAMA_CPP_PY"])
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "crates", "engine", "tests", "fixtures")

CORPUS = [
    "Hello, world!",
    "用中文介绍一下长城",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "The Great Wall (长城) is over 21,196 km long — 真的吗?",
    "emoji: 😀👍🏽🇨🇳 and ZWJ 👨‍👩‍👧‍👦 family",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "   leading spaces\t\ttabs\n\n\nnewlines   trailing   ",
    "fn main() { println!(\"{}\", 1_000_000u64.pow(2)); }",
    "I'm sure they'll say we've done it; don't you?",
    "数字1234567890和English混合mixed文本，标点！？。",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "https://example.com/path?q=长城&lang=zh#section",
    "日本語のテキストと한국어 텍스트",
    "    \n\t\r\n  ",
    "ÀÉÎÕÜ àéîõü ß ñ ç",
    "x" * 300,
]

PROMPTS = [
    "<|im_start|>user\n用中文介绍一下长城<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a Python function that checks whether a number is prime.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n请写一首关于秋天的短诗。<|im_end|>\n<|im_start|>assistant\n",
]

# For base (not chat-tuned) models: `... MODEL.gguf NAME --plain`.
PLAIN_PROMPTS = [
    "长城是中国古代的",
    "def is_prime(n):\n    \"\"\"Return True if n is a prime number.\"\"\"\n",
    "The capital of France is",
    "秋天来了，",
]

STEPS = 256
TOPK = 8


def main():
    model, name = sys.argv[1], sys.argv[2]
    prompts = PLAIN_PROMPTS if "--plain" in sys.argv[3:] else PROMPTS
    # Fewer steps keep the replay of a large model short in CI.
    steps_max = STEPS
    if "--steps" in sys.argv[3:]:
        steps_max = int(sys.argv[sys.argv.index("--steps") + 1])
    llm = llama_cpp.Llama(model_path=model, n_ctx=1024, n_threads=2, logits_all=True, verbose=False, seed=0)
    toks = []
    for text in CORPUS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        toks.append({"text": text, "ids": list(map(int, ids))})
    with open(os.path.join(FIXTURES, f"{name}.tokens.json"), "w") as f:
        json.dump(toks, f, ensure_ascii=False, indent=0)

    runs = []
    eog = {int(llm.token_eos())}
    if "--plain" in sys.argv[3:]:
        eog = set()  # a base model's continuation is cut at STEPS
    for prompt in prompts:
        prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(prompt_ids)
        generated, steps = [], []
        for _ in range(steps_max):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            top = np.argsort(-logits)[:TOPK]
            steps.append({"ids": [int(i) for i in top], "logits": [round(float(logits[i]), 4) for i in top]})
            nxt = int(top[0])
            generated.append(nxt)
            if nxt in eog:
                break
            llm.eval([nxt])
        runs.append({"prompt": prompt, "prompt_ids": list(map(int, prompt_ids)), "generated": generated, "steps": steps})
        print(f"{name}: {len(generated)} steps: {llm.detokenize(generated).decode('utf-8', 'replace')[:80]!r}", file=sys.stderr)
    with open(os.path.join(FIXTURES, f"{name}.logits.json"), "w") as f:
        json.dump({"model": os.path.basename(model), "topk": TOPK, "runs": runs}, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
