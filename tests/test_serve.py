"""`spongebob serve`: the OpenAI client against a tiny random checkpoint (chat, stream and not,
stop strings, n, seeds, completions, usage), reasoning replies from a scripted model, batching
under 32 concurrent streaming clients, the queue bound, timeouts, a client that leaves
mid-stream, API keys, and a 4xx for every malformed request with the server serving on."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import openai
import pytest
import torch

from spongebob import checkpoint
from spongebob.generate import Generator, SamplingConfig, parse_reasoning
from spongebob.serve import (
    Engine,
    Job,
    ReasoningSplitter,
    ToolCallHolder,
    make_server,
    shape_message,
    split_reply,
)
from test_generate import Scripted, make_checkpoint

MSGS = [{"role": "user", "content": "你好，你是谁？"}]


@contextmanager
def serving(engine: Engine, **kw):
    """Serve `engine` on a free loopback port in a thread; yields the base URL."""
    httpd = make_server(engine, "127.0.0.1", 0, **kw)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tok_dir):
    torch.set_num_threads(1)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("serve") / "final", tok_dir, seed=4)
    return checkpoint.load(ckpt, "cpu", kernels="torch")


@pytest.fixture(scope="module")
def engine(loaded):
    e = Engine(loaded.model, loaded.tokenizer, max_queue=64, max_n=4, default_max_tokens=16)
    yield e
    e.close()


@pytest.fixture(autouse=True)
def _unpaused(request):
    """A failing test never leaves the shared engine paused (the next would hang)."""
    yield
    if "engine" in request.fixturenames:
        request.getfixturevalue("engine").pause(False)


@pytest.fixture(scope="module")
def base(engine):
    with serving(engine) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)


def wait_until(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def reference(loaded, ids, max_new=8):
    """What the Generator alone gives for `ids`, greedy: (text, number of tokens)."""
    gen = Generator(loaded.model, loaded.tokenizer)
    g = gen.generate([ids], SamplingConfig(max_new_tokens=max_new, temperature=0))[0]
    return g.text, len(g.ids), g.finish


def raw(base, method, path, body=None, headers=None):
    """(status, parsed JSON or text) of one request over http.client."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(text)
    except json.JSONDecodeError:
        return r.status, text


# --- the OpenAI client ----------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["spongebob"]


def test_chat_non_streaming_equals_the_generator_with_usage(client, loaded):
    ids = [int(i) for i in loaded.tokenizer.encode_prompt(MSGS)]
    want, n_tokens, finish = reference(loaded, ids)
    r = client.chat.completions.create(
        model="spongebob", messages=MSGS, temperature=0, max_tokens=8
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == n_tokens
    assert r.usage.total_tokens == len(ids) + n_tokens


def test_chat_streaming_gives_the_same_text_in_chunks(client, loaded):
    ids = [int(i) for i in loaded.tokenizer.encode_prompt(MSGS)]
    want, n_tokens, finish = reference(loaded, ids)
    stream = client.chat.completions.create(
        model="spongebob",
        messages=MSGS,
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == finish and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_tokens


def test_stop_strings_cut_the_reply_stream_or_not(client, loaded):
    ids = [int(i) for i in loaded.tokenizer.encode_prompt(MSGS)]
    full, _, _ = reference(loaded, ids, 16)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip() and len(full) > 4
    cut = full[: full.index(stop)]
    kw = dict(model="m", messages=MSGS, temperature=0, max_tokens=16)
    r = client.chat.completions.create(stop=[stop, "never-seen"], **kw)
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_and_seeds(client):
    kw = dict(model="m", messages=MSGS, temperature=1.0, top_p=0.9, max_tokens=10, n=3)
    a = client.chat.completions.create(seed=11, **kw)
    b = client.chat.completions.create(seed=11, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert 3 <= a.usage.completion_tokens <= 30  # over all choices
    chunks = list(client.chat.completions.create(seed=11, stream=True, **kw))
    texts = ["", "", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in a.choices]


def test_completions_continue_text_after_bos(client, loaded):
    tok = loaded.tokenizer
    ids = [tok.bos_id, *map(int, tok.encode("从前有座山"))]
    want, n_tokens, _ = reference(loaded, ids)
    r = client.completions.create(model="m", prompt="从前有座山", temperature=0, max_tokens=8)
    assert r.object == "text_completion" and r.choices[0].text == want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n_tokens
    chunks = list(
        client.completions.create(
            model="m", prompt="从前有座山", temperature=0, max_tokens=8, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == want
    two = client.completions.create(
        model="m", prompt=["从前有座山", "a"], temperature=0, max_tokens=4
    )
    assert [c.index for c in two.choices] == [0, 1]


# --- reasoning ------------------------------------------------------------------------------

REPLIES = [
    "<think>\n先想一想。\n</think>\n<answer>\n巴黎。\n</answer>",
    "<think>a b</think><answer>c d</answer>",
    "  <think>\n\n多行\n\n思考\n</think>\n\n<answer>答 案</answer>\n",
]


@pytest.mark.parametrize("reply", REPLIES)
def test_streamed_reasoning_split_equals_parse_reasoning_for_every_chunking(reply):
    r = parse_reasoning(reply)
    assert split_reply(reply) == (r.think, r.answer)
    for size in (1, 2, 3, 7, len(reply)):
        sp = ReasoningSplitter()
        parts = []
        for i in range(0, len(reply), size):
            parts += sp.feed(reply[i : i + size])
        parts += sp.flush()
        got = {"reasoning": "", "content": ""}
        for kind, text in parts:
            got[kind] += text
        assert (got["reasoning"], got["content"]) == (r.think, r.answer), size


@pytest.mark.parametrize("reply", [" plain reply ", "", "  ", "<thin", "a <think>b</think>", "<"])
def test_a_reply_not_starting_with_think_passes_through_unchanged(reply):
    assert split_reply(reply) == (None, reply)
    for size in (1, 2, 5):
        sp = ReasoningSplitter()
        parts = []
        for i in range(0, len(reply), size):
            parts += sp.feed(reply[i : i + size])
        parts += sp.flush()
        assert {k for k, _ in parts} <= {"content"}
        assert "".join(t for _, t in parts) == reply


TOOL_REPLIES = [
    'ok.\n<tool_call>\n{"name": "calc", "arguments": {"expr": "1+2"}}\n</tool_call>',
    '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b"}</tool_call>',
    "no call here <tool_c but a near miss  ",
    "<tool_call>not json</tool_call>",  # malformed: passed back as text
    "text  \n\n",
]


@pytest.mark.parametrize("reply", TOOL_REPLIES)
def test_streamed_tool_calls_equal_the_whole_reply_for_every_chunking(reply):
    job = Job(prompts=[[1]], n=1, max_tokens=1, temperature=0, top_p=1, seed=None, stop=[],
              deadline=0.0, tools=True)  # fmt: skip
    msg, reason = shape_message(reply, job, split=False)
    want_calls = [
        (c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])
    ]
    for size in (1, 2, 3, 7, len(reply) or 1):
        h = ToolCallHolder()
        text = "".join(h.feed(reply[i : i + size]) for i in range(0, len(reply), size))
        rest, calls = h.finish()
        assert text + rest == (msg["content"] or ""), size
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == want_calls
    assert (reason == "tool_calls") == bool(want_calls)


class Reasoner(Scripted):
    """Scripted, restarting its script at every prompt (a prefill has more than one token)."""

    def forward(self, input_ids, **kw):
        if input_ids.shape[1] > 1:
            self.calls = 0
        return super().forward(input_ids, **kw)


@pytest.fixture(scope="module")
def reasoning_client(chat_tok):
    think, answer = "先想一想，再回答。", "巴黎是法国的首都。"
    t = chat_tok
    script = [
        t.token_to_id("<think>"),
        *map(int, t.encode(think)),
        t.token_to_id("</think>"),
        *map(int, t.encode("\n")),
        t.token_to_id("<answer>"),
        *map(int, t.encode(answer)),
        t.token_to_id("</answer>"),
        t.eos_id,
    ]
    e = Engine(Reasoner(script, t.vocab_size), t)
    with serving(e) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), think, answer
    e.close()


def test_reasoning_content_reaches_the_client_stream_or_not(reasoning_client):
    client, think, answer = reasoning_client
    kw = dict(model="m", messages=MSGS, temperature=0, max_tokens=100)
    msg = client.chat.completions.create(**kw).choices[0].message
    assert msg.content == answer and msg.reasoning_content == think
    chunks = list(client.chat.completions.create(stream=True, **kw))
    got = {"reasoning_content": "", "content": ""}
    for c in chunks:
        for key in got:
            got[key] += getattr(c.choices[0].delta, key, None) or ""
    assert got == {"reasoning_content": think, "content": answer}
    assert chunks[-1].choices[0].finish_reason == "stop"
    inline = client.chat.completions.create(extra_body={"reasoning_format": "inline"}, **kw)
    text = inline.choices[0].message.content
    assert text.startswith("<think>") and answer in text
    assert getattr(inline.choices[0].message, "reasoning_content", None) is None


# --- concurrency ----------------------------------------------------------------------------


def test_32_concurrent_streaming_clients_all_complete_batched(base, engine, loaded):
    prompts = [f"第{i}个问题" for i in range(32)]
    want = {}
    for p in prompts[:4]:
        ids = [int(i) for i in loaded.tokenizer.encode_prompt([{"role": "user", "content": p}])]
        want[p] = reference(loaded, ids, 6)[0]
    results, errors = {}, []
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)

    def one(p):
        try:
            stream = client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": p}],
                temperature=0,
                max_tokens=6,
                stream=True,
            )
            chunks = list(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            results[p] = (text, chunks[-1].choices[0].finish_reason)
        except Exception as e:  # collected, so the assertion shows them
            errors.append(repr(e))

    before = len(engine.batches)
    engine.pause()  # let all 32 queue up, so they are decoded as one batch
    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while engine.waiting() < 32 and time.monotonic() < deadline:
        time.sleep(0.02)
    engine.pause(False)
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 32
    assert time.monotonic() - t0 < 60
    assert all(f in ("stop", "length") for _, f in results.values())
    for p, text in want.items():  # batched rows give what each prompt gets alone
        assert results[p][0] == text
    assert max(list(engine.batches)[before:]) == 32


def test_a_full_queue_answers_429_and_the_server_goes_on(base, engine, client):
    old = engine.max_queue
    engine.max_queue = 2
    engine.pause()
    out = []
    body = {"messages": MSGS, "max_tokens": 2, "temperature": 0}
    threads = [
        threading.Thread(target=lambda: out.append(raw(base, "POST", "/v1/chat/completions", body)))
        for _ in range(2)
    ]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: engine.waiting() >= 2)
        status, err = raw(base, "POST", "/v1/chat/completions", body)
        assert status == 429 and err["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="m", messages=MSGS, max_tokens=2)
    finally:
        engine.max_queue = old
        engine.pause(False)
    for t in threads:
        t.join(30)
    assert [s for s, _ in out] == [200, 200]


def test_a_request_past_its_timeout_gets_504(base, engine):
    old = engine.timeout
    engine.timeout = 0.2
    engine.pause()
    out = []
    body = {"messages": MSGS, "max_tokens": 2}
    t = threading.Thread(target=lambda: out.append(raw(base, "POST", "/v1/chat/completions", body)))
    try:
        t.start()
        wait_until(lambda: engine.waiting() >= 1)
        time.sleep(0.4)
    finally:
        engine.timeout = old
        engine.pause(False)
    t.join(30)
    status, err = out[0]
    assert status == 504 and err["error"]["type"] == "timeout_error"


def _open_stream(base, body) -> tuple[socket.socket, object]:
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return s, s.makefile("rb")


def test_a_client_leaving_mid_stream_stops_its_row_and_others_go_on(base, engine, client):
    long = {"messages": MSGS, "max_tokens": 150, "temperature": 0, "stream": True}
    engine.pause()  # both requests in one batch
    leaver, f = _open_stream(base, long)
    wait_until(lambda: engine.waiting() >= 1)
    other: list = []
    t = threading.Thread(
        target=lambda: other.append(
            list(
                client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": "别走"}],
                    temperature=0,
                    max_tokens=40,
                    stop=[],
                    stream=True,
                )
            )
        )
    )
    t.start()
    wait_until(lambda: engine.waiting() >= 2)
    before = len(engine.recent)
    engine.pause(False)
    assert f.readline().startswith(b"HTTP/1.1 200")
    events = 0
    while events < 3:  # read a few chunks, then hang up
        line = f.readline()
        assert line, "the stream ended early"
        events += line.startswith(b"data: ")
    f.close()
    leaver.close()
    t.join(60)
    assert other and other[0][-1].choices[0].finish_reason in ("stop", "length")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ends = list(engine.recent)[before:]
        if any(e[2] == "cancelled" for e in ends):
            break
        time.sleep(0.05)
    cancelled = [e for e in ends if e[2] == "cancelled"]
    assert cancelled and cancelled[0][3] < 150
    assert client.models.list().data  # still serving


# --- bad requests ---------------------------------------------------------------------------

TOO_LONG = [{"role": "user", "content": "长" * 400}]
BAD = [
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", b"\xff\xfe", 400),
    ("POST", "/v1/chat/completions", [1, 2], 400),
    ("POST", "/v1/chat/completions", {}, 400),
    ("POST", "/v1/chat/completions", {"messages": []}, 400),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400),
    ("POST", "/v1/chat/completions", {"messages": ["hi"]}, 400),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "temperature": "hot"}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "temperature": -1}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "top_p": 0}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "max_tokens": 0}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "max_tokens": -3}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "max_tokens": 10**6}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "max_tokens": "8"}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "max_tokens": True}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "n": 0}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "n": 99}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "stop": 5}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "stop": list("abcde")}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "seed": 1.5}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "stream": "yes"}, 400),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "model": 3}, 400),
    ("POST", "/v1/chat/completions", {"messages": TOO_LONG}, 400),
    ("POST", "/v1/chat/completions", {"messages": TOO_LONG[:0] + MSGS, "max_tokens": 250}, 400),
    ("POST", "/v1/completions", {}, 400),
    ("POST", "/v1/completions", {"prompt": 5}, 400),
    ("POST", "/v1/completions", {"prompt": []}, 400),
    ("GET", "/v1/nothing", None, 404),
    ("POST", "/nothing", {"a": 1}, 404),
    ("POST", "/v1/models", {}, 405),
    ("GET", "/v1/chat/completions", None, 405),
    ("DELETE", "/v1/completions", None, 405),
]


def test_every_malformed_request_gets_a_4xx_and_the_server_keeps_serving(base, client):
    for method, path, body, want in BAD:
        status, err = raw(base, method, path, body)
        assert status == want, (method, path, body, status, err)
        assert set(err["error"]) >= {"message", "type", "code"}, err
        assert raw(base, "GET", "/v1/models")[0] == 200
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # no Content-Length
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 411")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # garbage
        s.sendall(b"\x00\x01 nonsense\r\n\r\n")
        s.recv(100)
    r = client.chat.completions.create(model="m", messages=MSGS, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[], max_tokens=3)
    assert e.value.status_code == 400


def test_api_key_is_required_when_set(engine):
    with serving(engine, api_key="s3cret") as url:
        assert raw(url, "GET", "/v1/models")[0] == 401
        status, err = raw(url, "GET", "/v1/models", headers={"Authorization": "Bearer nope"})
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "spongebob"
        status, page = raw(url, "GET", "/")
        assert status == 200 and "<html" in page


def test_the_page_is_package_data():
    from importlib import resources

    page = resources.files("spongebob").joinpath("web/index.html").read_text(encoding="utf-8")
    assert "/v1/chat/completions" in page


def test_cli_serve_flags_parse():
    from spongebob.cli import build_parser

    args = build_parser().parse_args(["serve", "--ckpt", "x"])
    assert (args.host, args.port, args.device, args.kernels, args.api_key) == (
        "127.0.0.1",
        8998,
        "auto",
        "auto",
        None,
    )


# --- chatml: thinking, tools, tool calls ----------------------------------------------------

CALC_TOOL = {
    "type": "function",
    "function": {
        "name": "calc",
        "description": "evaluate an arithmetic expression",
        "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}},
    },
}


class Recorder(Reasoner):
    """Reasoner that also keeps every prompt it was given."""

    prompts: list

    def forward(self, input_ids, **kw):
        if input_ids.shape[1] > 1:
            self.prompts.append(input_ids[0].tolist())
        return super().forward(input_ids, **kw)


@pytest.fixture(scope="module")
def chatml_tool_client(chatml_tok):
    """A chatml-family engine whose scripted model thinks (the prompt opened `<think>`), then
    calls `calc`, ending at `<|im_end|>`."""
    t = chatml_tok
    think = "需要计算。"
    call = '\n<tool_call>\n{"name": "calc", "arguments": {"expr": "12*3"}}\n</tool_call>'
    script = [
        *map(int, t.encode(think + "\n")),
        t.token_to_id("</think>"),
        *map(int, t.encode("\n\n好的。")),
        *map(int, t.encode(call)),
        t.token_to_id("<|im_end|>"),
        5,
    ]
    model = Recorder(script, t.vocab_size)
    model.prompts = []
    model.config = replace(model.config, max_seq_len=2048)  # room for the tools block
    e = Engine(model, t)
    with serving(e) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), model, think
    e.close()


def test_chatml_tool_calls_reach_the_openai_client_stream_or_not(chatml_tool_client, chatml_tok):
    client, model, think = chatml_tool_client
    msgs = [{"role": "user", "content": "12*3 等于多少？"}]
    kw = dict(model="m", messages=msgs, tools=[CALC_TOOL], temperature=0, max_tokens=200,
              extra_body={"chat_template_kwargs": {"enable_thinking": True}})  # fmt: skip
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == think and choice.message.content == "好的。"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calc"
    assert json.loads(call.function.arguments) == {"expr": "12*3"} and call.id.startswith("call_")
    # The prompt was the template's, with the tools block and an open think block.
    want = chatml_tok.encode_prompt(msgs, tools=[CALC_TOOL], thinking=True)
    assert model.prompts[-1] == [int(i) for i in want]

    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert text == "好的。" and reasoning == think and "<tool_call>" not in text
    assert len(calls) == 1 and calls[0].function.name == "calc" and calls[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The call and its result go back as history; the next prompt renders them as the template.
    history = [
        *msgs,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "36"},
    ]
    client.chat.completions.create(**{**kw, "messages": history})
    rendered = chatml_tok.render(
        [*msgs, {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
         {"role": "tool", "content": "36"}],
        add_generation_prompt=True, tools=[CALC_TOOL], thinking=True,
    )  # fmt: skip
    assert "<tool_response>\n36\n</tool_response>" in rendered
    assert model.prompts[-1] == [int(i) for i in chatml_tok.encode(rendered, allow_special=True)]


def test_tools_on_a_template_without_tools_and_bad_tool_fields_are_400(base):
    def post(body):
        return raw(base, "POST", "/v1/chat/completions", body)

    ok = {"model": "m", "messages": MSGS, "max_tokens": 2}
    status, body = post({**ok, "tools": [CALC_TOOL]})  # the minimind2 family has no tools
    assert status == 400 and "tools" in body["error"]["message"]
    status, body = post({**ok, "tools": "calc"})
    assert status == 400 and body["error"]["param"] == "tools"
    status, body = post({**ok, "chat_template_kwargs": {"enable_thinking": "yes"}})
    assert status == 400 and body["error"]["param"] == "chat_template_kwargs"
    bad_calls = [*MSGS, {"role": "assistant", "content": None, "tool_calls": "f"}]
    status, body = post({**ok, "messages": bad_calls})
    assert status == 400 and "tool_calls" in body["error"]["message"]
    assert post(ok)[0] == 200  # still serving
