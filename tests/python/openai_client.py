"""Drives `dima serve` with the official `openai` Python client and checks
every answer: models, completions and chat (plain and streamed), stop
strings, logprobs (against `dima score` for the same ids), echo, n, seed,
content parts, the tokenizer routes and the error cases.

Usage: python openai_client.py BASE_URL MODEL DIMA_BIN
(tests/serve.rs runs it against a server it starts.)
"""

import json
import math
import subprocess
import sys
import threading
import urllib.request

import re

import jsonschema
import openai

BASE, MODEL, DIMA = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=300)
failures = []


def check(name):
    def wrap(fn):
        try:
            fn()
            print(f"ok   {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failures.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        return fn

    return wrap


def post(path, body):
    req = urllib.request.Request(
        f"{BASE}{path}", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def get(path):
    with urllib.request.urlopen(f"{BASE}{path}") as r:
        return json.loads(r.read())


def ids_of(text):
    return post("/tokenize", {"model": MODEL, "prompt": text})["tokens"]


def score(ids):
    """`dima score`'s log-probability of each id after the first."""
    out = subprocess.run(
        [DIMA, "score", "--model", MODEL, "--ids", ",".join(map(str, ids)), "--top-k", "1"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    positions = json.loads(out.strip().splitlines()[-1])["positions"]
    return [p["next_logprob"] for p in positions[:-1]]


def complete(**kw):
    args = dict(model=MODEL, temperature=0)
    args.update(kw)
    return client.completions.create(**args)


def refused(status, param, needle, call):
    try:
        call()
    except openai.APIStatusError as e:
        assert e.status_code == status, (e.status_code, e.body)
        assert e.body["param"] == param, e.body
        assert needle in e.body["message"], e.body
        assert e.body["type"] in ("invalid_request_error", "rate_limit_error", "server_error"), e.body
        return
    raise AssertionError(f"expected a {status} naming {param}")


PROMPT = "The capital of France is Paris. The capital of Germany is"


@check("models lists the served model")
def _():
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL], ids


@check("completion: length, usage, finish_reason")
def _():
    r = complete(prompt=PROMPT, max_tokens=8)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason == "length", r
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == len(ids_of(PROMPT)), r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


@check("stop: the text ends where the stop string starts, and it is not returned")
def _():
    full = complete(prompt=PROMPT, max_tokens=24).choices[0].text
    # A stop string that occurs in the greedy text, split wherever tokens split it.
    for stop in [full[3:7], full[5:6], [full[9:12], full[4:6]]]:
        r = complete(prompt=PROMPT, max_tokens=24, stop=stop)
        stops = stop if isinstance(stop, list) else [stop]
        cut = min(full.find(s) for s in stops if s in full)
        assert r.choices[0].text == full[:cut], (stop, r.choices[0].text, full)
        assert r.choices[0].finish_reason == "stop"
    # Streamed: the same text, and no stop string ever sent.
    chunks = complete(prompt=PROMPT, max_tokens=24, stop=full[6:10], stream=True)
    text = "".join(ch.choices[0].text for ch in chunks)
    assert text == full[: full.find(full[6:10])], (text, full)
    # A stop string longer than the output: the whole output.
    r = complete(prompt=PROMPT, max_tokens=4, stop=[full + "never"])
    assert r.choices[0].finish_reason == "length" and r.choices[0].text == complete(prompt=PROMPT, max_tokens=4).choices[0].text


@check("logprobs: token logprobs <= 0, match dima score within 1e-3")
def _():
    r = complete(prompt=PROMPT, max_tokens=6, logprobs=3, extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    got = [int(t.split(":")[1]) for t in lp.tokens]
    assert all(x <= 0 for x in lp.token_logprobs) and sum(lp.token_logprobs) <= 0
    assert all(len(t) >= 3 for t in lp.top_logprobs)
    want = score(ids_of(PROMPT) + got)[-len(got):]
    for a, b in zip(lp.token_logprobs, want):
        assert abs(a - b) < 1e-3, (lp.token_logprobs, want)
    # Raw log-softmax: sampling parameters do not change them.
    r2 = complete(prompt=PROMPT, max_tokens=1, logprobs=1, temperature=0.3, top_p=0.5)
    assert abs(r2.choices[0].logprobs.token_logprobs[0] - want[0]) < 1e-3 or r2.choices[0].logprobs.tokens[0] != r.choices[0].logprobs.tokens[0]


@check("echo + max_tokens 0: the prompt's logprobs, the first null (loglikelihood)")
def _():
    ids = ids_of(PROMPT)
    r = complete(prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == PROMPT, c.text
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    want = score(ids)
    for a, b in zip(lp.token_logprobs[1:], want):
        assert abs(a - b) < 1e-3, (a, b)
    assert r.usage.completion_tokens == 0
    # With token ids as the prompt (what lm-eval sends), the same numbers.
    r = complete(prompt=ids, max_tokens=1, echo=True, logprobs=1)
    lp2 = r.choices[0].logprobs.token_logprobs
    assert lp2[0] is None and all(abs(a - b) < 1e-6 for a, b in zip(lp2[1 : len(ids)], lp.token_logprobs[1:]))
    assert len(lp2) == len(ids) + 1


@check("n: several choices, each its own; seed reproduces them, whatever else runs")
def _():
    kw = dict(prompt="Once upon a time", max_tokens=12, n=3, temperature=1.0, seed=11)
    a = complete(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.text for c in a.choices]
    assert len(set(texts)) > 1, texts
    assert a.usage.completion_tokens == 36
    # The same request while others run (batched differently): the same texts.
    others = [threading.Thread(target=complete, kwargs=dict(prompt=f"{i} apples", max_tokens=16)) for i in range(3)]
    for t in others:
        t.start()
    b = complete(**kw)
    for t in others:
        t.join()
    assert [c.text for c in b.choices] == texts, ([c.text for c in b.choices], texts)
    # Several prompts: choices prompt-major.
    r = complete(prompt=["Red", "Blue"], max_tokens=3, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy


@check("chat: content parts, system folded in, max_completion_tokens, streaming usage")
def _():
    msgs = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "What color is the sky?"}]},
    ]
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_completion_tokens=5)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 5
    plain = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What color is the sky?"}],
        temperature=0,
        max_completion_tokens=5,
    )
    assert plain.choices[0].message.content == r.choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL, messages=msgs, temperature=0, max_completion_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    text, usage, finish = "", None, None
    for ch in stream:
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
        else:
            usage = ch.usage
    assert text == r.choices[0].message.content and finish == r.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens


@check("chat logprobs: top_logprobs listed per token")
def _():
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], temperature=0, max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@check("structured output: json_schema and json_object outputs parse and validate; a Lark grammar is followed")
def _():
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_completion_tokens=80,
        temperature=0.7,
        seed=3,
        n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    for c in r.choices:
        assert c.finish_reason == "stop", (c.finish_reason, c.message.content)
        jsonschema.validate(json.loads(c.message.content), PERSON)
    r = complete(prompt="A JSON object:", max_tokens=60, extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    assert isinstance(json.loads(r.choices[0].text), dict), r.choices[0].text
    chunks = complete(
        prompt="Numbers:", max_tokens=12, stream=True, extra_body={"grammar": "start: /[0-9]{1,3}(, [0-9]{1,3}){0,5}/"}
    )
    text = "".join(ch.choices[0].text for ch in chunks)
    assert re.fullmatch(r"[0-9]{1,3}(, [0-9]{1,3}){0,5}", text), text


@check("tokenize / detokenize / tokenizer_info")
def _():
    t = post("/tokenize", {"model": MODEL, "prompt": "Hello world", "return_token_strs": True})
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] > 0 and t["tokens"][0] == 2
    assert post("/detokenize", {"model": MODEL, "tokens": t["tokens"]})["prompt"] == "Hello world"
    chat = post("/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert chat["count"] > 3
    info = get("/tokenizer_info")
    assert info["bos_token"] == "<bos>" and "chat_template" in info


@check("bad input: 400s naming param, 404 for an unknown model")
def _():
    refused(400, "stop", "at most 4", lambda: complete(prompt="x", max_tokens=2, stop=["a", "b", "c", "d", "e"]))
    refused(400, "stop", "empty", lambda: complete(prompt="x", max_tokens=2, stop=["a", ""]))
    refused(400, "logprobs", "between 0 and 20", lambda: complete(prompt="x", max_tokens=2, logprobs=21))
    refused(400, "n", "between 1 and 16", lambda: complete(prompt="x", max_tokens=2, n=17))
    refused(400, "frequency_penalty", "not supported", lambda: complete(prompt="x", max_tokens=2, frequency_penalty=1.0))
    refused(400, "foo", "Unrecognized request argument", lambda: complete(prompt="x", max_tokens=2, extra_body={"foo": 1}))
    refused(
        400,
        "messages[0].content[0].type",
        "text only",
        lambda: client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        ),
    )
    refused(
        400,
        "tools",
        "not supported",
        lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {"name": "f"}}]
        ),
    )
    refused(
        400,
        "response_format",
        "Invalid type",
        lambda: complete(prompt="x", max_tokens=2, extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}}),
    )
    refused(400, "grammar", "cannot match any text", lambda: complete(prompt="x", max_tokens=2, extra_body={"grammar": 'start: x\nx: x "a"'}))
    refused(400, "grammar", "GBNF", lambda: complete(prompt="x", max_tokens=2, extra_body={"grammar": 'root ::= "a"'}))
    refused(400, "n", "at most 4", lambda: complete(prompt="x", max_tokens=2, n=5))
    refused(404, "model", "does not exist", lambda: client.completions.create(model="nope", prompt="x", max_tokens=1))


if failures:
    print(f"{len(failures)} check(s) failed: {failures}")
    sys.exit(1)
print("all checks passed")
