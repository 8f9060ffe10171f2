"""Drives a running Hanlin server with the official `openai` package.

Environment: HANLIN_BASE (http://host:port), HANLIN_KEY, HANLIN_MODEL (a small
English model), HANLIN_QWEN (the default, Chinese-capable model).
Every check asserts; the first failure exits non-zero.
"""
import json
import os

import openai

base = os.environ["HANLIN_BASE"] + "/v1"
key = os.environ["HANLIN_KEY"]
model = os.environ["HANLIN_MODEL"]
qwen = os.environ["HANLIN_QWEN"]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)

# Models
ids = [m.id for m in client.models.list().data]
assert model in ids and qwen in ids, ids

# Non-streaming chat, greedy, with usage
r = client.chat.completions.create(
    model=qwen,
    messages=[{"role": "user", "content": "用中文介绍一下长城"}],
    max_tokens=32,
    temperature=0,
)
c = r.choices[0]
assert c.message.role == "assistant"
assert "长城" in c.message.content, c.message.content
assert c.finish_reason in ("stop", "length")
assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

# Streaming: pieces add up to the same text as the non-streamed greedy answer
stream = client.chat.completions.create(
    model=qwen,
    messages=[{"role": "user", "content": "用中文介绍一下长城"}],
    max_tokens=32,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for ch in chunk.choices:
        if ch.delta.content:
            pieces.append(ch.delta.content)
        if ch.finish_reason:
            finish = ch.finish_reason
assert "".join(pieces) == c.message.content, ("".join(pieces), c.message.content)
assert len(pieces) > 3
assert finish == c.finish_reason
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
# The same prompt again: its prefix comes from the KV cache.
assert usage.prompt_tokens_details.cached_tokens > 0

# n, seed, stop, logprobs
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write a short poem about the sea."}],
    max_tokens=24,
    n=2,
    seed=7,
    temperature=1.0,
    logprobs=True,
    top_logprobs=3,
)
assert len(r.choices) == 2 and r.choices[0].index == 0 and r.choices[1].index == 1
lp = r.choices[0].logprobs.content
assert len(lp) > 0 and all(t.logprob <= 0 for t in lp)
assert all(len(t.top_logprobs) == 3 for t in lp)
again = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write a short poem about the sea."}],
    max_tokens=24,
    seed=7,
    temperature=1.0,
)
assert again.choices[0].message.content == r.choices[0].message.content, "same seed, same text"

r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
    max_tokens=60,
    temperature=0,
    stop=["5"],
)
assert "5" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop", r

# Text completions, and fill-in-the-middle with the coder model
r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
assert "Paris" in r.choices[0].text, r.choices[0].text
r = client.completions.create(
    model=qwen,
    prompt="def add(a, b):\n    ",
    suffix="\n\nprint(add(2, 3))\n",
    max_tokens=16,
    temperature=0,
)
assert "return" in r.choices[0].text and "a + b" in r.choices[0].text.replace("a+b", "a + b"), r.choices[0].text

# Tools: the Qwen template announces them; the answer comes back as tool_calls.
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
r = client.chat.completions.create(
    model=qwen,
    messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
    tools=tools,
    max_tokens=64,
    temperature=0,
)
c = r.choices[0]
assert c.finish_reason == "tool_calls", c
call = c.message.tool_calls[0]
assert call.function.name == "get_weather"
assert "Paris" in json.loads(call.function.arguments)["city"]

# Structured output: a JSON schema enforced by constrained decoding, greedy
# and sampled.
person = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
r = client.chat.completions.create(
    model=qwen,
    messages=[{"role": "user", "content": "Give me a person named 李雷 who is 30 years old, as JSON."}],
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person, "strict": True}},
    max_tokens=60,
    temperature=0,
)
obj = json.loads(r.choices[0].message.content)
assert obj == {"name": "李雷", "age": 30}, obj
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Invent a person."}],
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person}},
    max_tokens=80,
    temperature=1.0,
    seed=3,
    n=2,
)
for ch in r.choices:
    obj = json.loads(ch.message.content)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int) and 0 <= obj["age"] <= 150, obj
e_schema = None
try:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"a": {"type": "frobnitz"}}}}},
    )
except openai.BadRequestError as err:
    e_schema = err
assert e_schema is not None and e_schema.code == "invalid_json_schema"

# Embeddings (the client asks for base64 and decodes it)
e = client.embeddings.create(model=qwen, input=[
    "今天天气很好，阳光明媚。",
    "今天天气晴朗，阳光很好。",
    "The stock market fell sharply on Monday.",
])
v = [d.embedding for d in e.data]
assert len(v) == 3 and len(v[0]) == 896, (len(v), len(v[0]))
cos = lambda a, b: sum(x * y for x, y in zip(a, b))
assert abs(cos(v[0], v[0]) - 1) < 1e-3
assert cos(v[0], v[1]) > cos(v[0], v[2]), (cos(v[0], v[1]), cos(v[0], v[2]))
assert e.usage.prompt_tokens > 10
e = client.embeddings.create(model=qwen, input="长城", dimensions=64, encoding_format="float")
assert len(e.data[0].embedding) == 64

# Speech to text: whisper-1 is the installed Whisper
assert "whisper-1" in ids, ids
jfk = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "speech", "tests", "data", "jfk.wav")
with open(jfk, "rb") as f:
    t = client.audio.transcriptions.create(model="whisper-1", file=f)
assert "ask not what your country can do for you" in t.text, t.text
with open(jfk, "rb") as f:
    t = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json")
assert t.language == "english" and t.segments[0].start == 0.0 and t.duration == 11.0, t
with open(jfk, "rb") as f:
    srt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
assert srt.startswith("1\n00:00:00,000 --> "), srt
with open(jfk, "rb") as f:
    t = client.audio.translations.create(model="whisper-1", file=f)
assert "country" in t.text, t.text

# Text to speech: tts-1 and OpenAI's voice names
speech = client.audio.speech.create(model="tts-1", voice="alloy", input="你好，Hanlin。", response_format="wav")
assert speech.content[:4] == b"RIFF" and len(speech.content) > 24000, len(speech.content)

# Errors come back as the client's own exception types
def raises(exc, fn):
    try:
        fn()
    except exc as e:
        return e
    raise AssertionError(f"expected {exc.__name__}")

e = raises(openai.NotFoundError, lambda: client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}]))
assert e.code == "model_not_found"
e = raises(openai.AuthenticationError, lambda: openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).models.list())
assert e.code == "invalid_api_key"
e = raises(openai.BadRequestError, lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=5))
assert e.param == "temperature"
e = raises(openai.BadRequestError, lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6))
assert e.code == "context_length_exceeded"
e = raises(openai.BadRequestError, lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], extra_body={"bogus": 1}))
assert e.param == "bogus"
print("openai client: all checks passed")
