"""`spongebob serve`: an OpenAI-compatible HTTP server and a web chat page for a checkpoint.

Endpoints (OpenAI's wire format):

* `GET /v1/models` — the one model served;
* `POST /v1/chat/completions` — chat, streamed (`"stream": true`, server-sent events ending in
  `data: [DONE]`) or not; `temperature`, `top_p`, `max_tokens` (or `max_completion_tokens`),
  `stop` (a string or up to 4), `seed`, `n`, `stream_options.include_usage`. A reasoning reply's
  `<think>` part goes to `reasoning_content` and its answer to `content`, unless the request
  says `"reasoning_format": "inline"` (or the server runs with `--reasoning-format inline`).
  A chatml-family model (contracts.md §2) also takes `tools`, assistant `tool_calls`, `tool`
  messages and `chat_template_kwargs.enable_thinking`; the `<tool_call>` blocks of its reply
  come back as OpenAI `tool_calls` with `finish_reason: "tool_calls"`;
* `POST /v1/completions` — pretrain-mode text: `prompt` (a string or a list) continued after
  `<s>`;
* `GET /` — the web chat page; `GET /health`.

One scheduler thread owns the model. Requests are queued (at most `--max-queue` waiting, else
429); each turn the scheduler takes the oldest request and every queued one it can decode with
it (same sampling settings, the context fits, at most `--max-batch` rows) and runs them as one
left-padded batch through `Generator.iter_tokens`. Each row ends on its own: a stop token of the
tokenizer's family (`</s>`; `<|im_end|>`, `<|endoftext|>`), its own
`max_tokens`, a stop string, its client gone (the handler notices a closed socket) or its
`--timeout`; the batch ends when every row has. Handler threads only parse, validate, wait for
their request's events and write them out. Bad requests get a 4xx and OpenAI's error JSON
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import argparse
import hmac
import itertools
import json
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from spongebob.errors import UserError
from spongebob.generate import (
    TAGS,
    TOOL_CALL,
    SamplingConfig,
    StreamDecoder,
    find_tool_calls,
    parse_reasoning,
)

ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
MAX_BODY = 4 << 20
MAX_STOP = 4
POLL_S = 0.1


class ApiError(Exception):
    """A request that gets an error status and OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


# --- reasoning ------------------------------------------------------------------------------


class ReasoningSplitter:
    """Routes a streamed reply to ("reasoning", text) and ("content", text) pieces.

    A reply that starts (after whitespace) with `<think>` is a reasoning reply: text inside
    `<think>…</think>` is reasoning, the rest content; the tags vanish, as do the whitespace
    that frames each block, so the pieces join to `parse_reasoning`'s think and answer (as
    `split_reply` gives). Any other reply passes through unchanged, as content. Text that may
    be the start of a tag is held back until it is known."""

    def __init__(self, opened: bool = False) -> None:
        """`opened`: the prompt itself ended in `<think>` (chatml with thinking on), so the
        reply starts inside the reasoning block."""
        self.buf = ""
        self.kind: str | None = "split" if opened else None  # None until known: split/plain
        self.mode = "reasoning" if opened else "content"
        self.pending = ""  # trailing whitespace, emitted only if more text follows in the mode
        self.started = False  # has the current block emitted text yet

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        if self.kind is None:
            head = self.buf.lstrip()
            if not head or (len(head) < len(TAGS[0]) and TAGS[0].startswith(head)):
                return []  # not known yet
            self.kind = "split" if head.startswith(TAGS[0]) else "plain"
        if self.kind == "plain":
            out, self.buf = self.buf, ""
            return [("content", out)] if out else []
        out: list[tuple[str, str]] = []
        while self.buf:
            lt = self.buf.find("<")
            if lt != 0:
                plain = self.buf if lt < 0 else self.buf[:lt]
                self.buf = "" if lt < 0 else self.buf[lt:]
                self._plain(plain, out)
                continue
            tag = next((t for t in TAGS if self.buf.startswith(t)), None)
            if tag is not None:
                self.buf = self.buf[len(tag) :]
                self.pending, self.started = "", False
                self.mode = "reasoning" if tag == TAGS[0] else "content"
                continue
            if any(t.startswith(self.buf) for t in TAGS):
                break  # maybe a tag still arriving
            self._plain(self.buf[0], out)
            self.buf = self.buf[1:]
        return out

    def flush(self) -> list[tuple[str, str]]:
        rest, self.buf = self.buf, ""
        if self.kind != "split":
            return [("content", rest)] if rest else []
        out: list[tuple[str, str]] = []
        self._plain(rest, out)
        return out

    def _plain(self, s: str, out: list) -> None:
        if not self.started:
            s = s.lstrip()
            if not s:
                return
            self.started = True
        core = s.rstrip()
        if not core:
            self.pending += s
            return
        piece = self.pending + core
        self.pending = s[len(core) :]
        if out and out[-1][0] == self.mode:
            out[-1] = (self.mode, out[-1][1] + piece)
        else:
            out.append((self.mode, piece))


def split_reply(
    text: str, template: str = "minimind2", opened: bool = False
) -> tuple[str | None, str]:
    """(reasoning_content, content) of a whole reply; (None, text) unless it starts with
    `<think>` or, `opened`, its prompt did (chatml with thinking on)."""
    if not (opened or text.lstrip().startswith(TAGS[0])):
        return None, text
    r = parse_reasoning(text, template, opened)
    return r.think, r.answer


class ToolCallHolder:
    """Passes streamed content through until a `<tool_call>` starts; from there holds it,
    so the calls can be sent as OpenAI `tool_calls` once the reply is complete."""

    def __init__(self) -> None:
        self.held = ""
        self.calling = False

    def feed(self, text: str) -> str:
        if self.calling:
            self.held += text
            return ""
        buf = self.held + text
        at = buf.find(TOOL_CALL)
        if at >= 0:
            self.calling, self.held = True, buf[at:]
            return buf[:at].rstrip()  # the whitespace before a call is not content
        # Hold what may be the start of a call: a prefix of the tag, and whitespace before it.
        keep = next((k for k in range(len(TOOL_CALL) - 1, 0, -1) if buf.endswith(TOOL_CALL[:k])), 0)
        cut = len(buf[: len(buf) - keep].rstrip())
        self.held = buf[cut:]
        return buf[:cut]

    def finish(self) -> tuple[str, list[dict]]:
        """(content still to send, tool calls in OpenAI's shape); a malformed call block is
        sent back as content (the model's text, not the request's fault)."""
        held, self.held = self.held, ""
        if not self.calling:
            return held, []
        parsed = find_tool_calls(held)
        if parsed is None:
            return held, []
        return parsed.content, openai_tool_calls(parsed.calls)


def openai_tool_calls(calls) -> list[dict]:
    return [
        {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        for c in calls
    ]


def shape_message(text: str, job: Job, split: bool) -> tuple[dict, str | None]:
    """The assistant message of a whole reply and, when it called tools, "tool_calls" as its
    finish reason."""
    content: str | None = text
    msg: dict = {"role": "assistant"}
    if split:
        think, answer = split_reply(text, job.template, job.opened)
        if think is not None:
            content, msg["reasoning_content"] = answer, think
    reason = None
    parsed = find_tool_calls(content) if job.tools and content else None
    if parsed is not None:
        content, reason = parsed.content or None, "tool_calls"
        msg["tool_calls"] = openai_tool_calls(parsed.calls)
    msg["content"] = content
    return msg, reason


# --- the scheduler --------------------------------------------------------------------------

_ids = itertools.count(1)


@dataclass
class Job:
    """One request: its prompts (one row per prompt × n), sampling, and the events it gets."""

    prompts: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    deadline: float
    tools: bool = False  # the request offered tools: parse <tool_call> blocks of replies
    template: str = "minimind2"  # the tokenizer's family (how replies are split)
    opened: bool = False  # the prompt ended inside a <think> block
    id: int = field(default_factory=lambda: next(_ids))
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def key(self) -> tuple:
        """Jobs with equal keys can share a batch (one SamplingConfig for all rows)."""
        if self.temperature == 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", self.id)  # alone, so the seed alone decides its tokens
        return ("sample", self.temperature, self.top_p)


class Row:
    """The decoding state of one choice of one job."""

    def __init__(self, job: Job, index: int, decode) -> None:
        self.job, self.index = job, index
        self.decoder = StreamDecoder(decode)
        self.text = ""  # accepted text (stop strings cut off)
        self.sent = 0  # characters of `text` already sent
        self.tokens = 0
        self.finish: str | None = None
        self.hold = max((len(s) for s in job.stop), default=1) - 1

    def add(self, piece: str, final: bool = False) -> str | None:
        """Accept text; returns the new text safe to send (None when nothing)."""
        self.text += piece
        for s in self.job.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text = self.text[:at]
                self.finish = "stop"
                final = True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        if end <= self.sent:
            return None
        out, self.sent = self.text[self.sent : end], end
        return out


class Engine:
    """The model, its generator, the queue and the scheduler thread."""

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str = "spongebob",
        max_batch: int = 32,
        max_queue: int = 64,
        timeout: float = 300.0,
        max_n: int = 8,
        default_max_tokens: int = 512,
    ) -> None:
        from spongebob.generate import Generator

        self.gen = Generator(model, tokenizer)
        self.tok = tokenizer
        self.context = int(model.config.max_seq_len)
        self.model_name = model_name
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.max_n, self.default_max_tokens = max_n, default_max_tokens
        self.created = int(time.time())
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.paused = False  # tests: hold the queue while requests pile up
        self.recent: deque[tuple[int, int, str, int]] = deque(maxlen=256)  # job, row, finish, n
        self.batches: deque[int] = deque(maxlen=256)  # rows per batch
        self.thread = threading.Thread(target=self._loop, name="spongebob-scheduler", daemon=True)
        self.thread.start()

    # --- submitting

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise ApiError(503, "the server is shutting down", "server_error", "unavailable")
            if len(self.pending) >= self.max_queue:
                raise ApiError(
                    429,
                    f"too many requests waiting ({self.max_queue}); retry later",
                    "rate_limit_error",
                    "rate_limit_exceeded",
                )
            self.pending.append(job)
            self.cond.notify()

    def pause(self, paused: bool = True) -> None:
        """Stop (or resume) taking queued requests; the batch running goes on."""
        with self.cond:
            self.paused = paused
            self.cond.notify_all()

    def waiting(self) -> int:
        with self.cond:
            return len(self.pending)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=10)

    # --- the loop

    def _take(self) -> list[Job] | None:
        """Wait for work; pop the oldest job and the queued ones that can share its batch."""
        with self.cond:
            while (not self.pending or self.paused) and not self.closed:
                self.cond.wait()
            if self.closed:
                for job in self.pending:
                    job.events.put(("error", None, ApiError(503, "server closed", "server_error")))
                self.pending.clear()
                return None
            first = self.pending.popleft()
            batch, rows = [first], first.rows
            longest = max(len(p) for p in first.prompts)
            most = first.max_tokens
            for job in list(self.pending):
                if rows + job.rows > self.max_batch or job.key() != first.key():
                    continue
                lo = max(longest, *(len(p) for p in job.prompts))
                mo = max(most, job.max_tokens)
                if lo + mo > self.context:
                    continue
                self.pending.remove(job)
                batch.append(job)
                rows, longest, most = rows + job.rows, lo, mo
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for job in batch:
                if job.cancelled.is_set():
                    self.recent.append((job.id, -1, "cancelled", 0))
                elif now > job.deadline:
                    job.events.put(("error", None, timeout_error(self.timeout)))
                else:
                    live.append(job)
            if not live:
                continue
            try:
                self._run(live)
            except Exception as e:  # never let one batch take the server down
                err = ApiError(500, f"generation failed: {e}", "server_error", "internal_error")
                for job in live:
                    job.events.put(("error", None, err))

    def _run(self, jobs: list[Job]) -> None:
        rows = [Row(job, i, self.tok.decode) for job in jobs for i in range(job.rows)]
        prompts = [job.prompts[i // job.n] for job in jobs for i in range(job.rows)]
        first = jobs[0]
        cfg = SamplingConfig(
            max_new_tokens=max(job.max_tokens for job in jobs),
            temperature=first.temperature,
            top_p=first.top_p,
            seed=first.seed,
            stop_ids=[],  # every row's end is decided here, so rows end on their own
        )
        self.batches.append(len(rows))
        stops = {int(i) for i in self.tok.stop_ids}  # the family's end-of-turn tokens

        def finish(row: Row, reason: str) -> None:
            if reason in ("stop", "length"):
                tail = row.add(row.decoder.flush(), final=True)
                if tail:
                    row.job.events.put(("delta", row.index, tail))
                reason = row.finish or reason
            row.finish = reason
            self.recent.append((row.job.id, row.index, reason, row.tokens))
            if reason == "timeout":
                row.job.events.put(("timeout", row.index, None))
            elif reason != "cancelled":
                row.job.events.put(("done", row.index, (reason, row.tokens)))

        def check(row: Row) -> bool:
            """Is the row still going? Ends it when its client left or its time is up."""
            if row.finish is not None:
                return False
            if row.job.cancelled.is_set():
                finish(row, "cancelled")
            elif time.monotonic() > row.job.deadline:
                finish(row, "timeout")
            return row.finish is None

        def should_stop() -> bool:
            return not any([check(r) for r in rows])

        steps = self.gen.iter_tokens(prompts, cfg, should_stop)
        for i, tid in steps:
            row = rows[i]
            if not check(row):
                continue
            if tid in stops:
                finish(row, "stop")
                continue
            row.tokens += 1
            piece = row.add(row.decoder.push(tid))
            if piece:
                row.job.events.put(("delta", row.index, piece))
            if row.finish == "stop":
                finish(row, "stop")
            elif row.tokens >= row.job.max_tokens:
                finish(row, "length")
        for row in rows:
            if row.finish is None:
                finish(row, "length")


def timeout_error(seconds: float) -> ApiError:
    return ApiError(504, f"the request took longer than {seconds:g}s", "timeout_error", "timeout")


# --- request parsing -------------------------------------------------------------------------


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open=False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"'{name}' must be a number", name, "invalid_type")
    if v < lo or (lo_open and v == lo) or v > hi:
        span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise bad(f"'{name}' must be in {span}, not {v}", name)
    return float(v)


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer", name, "invalid_type")
    return v


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI's content parts: only text ones
        parts = []
        for p in content:
            if (
                not isinstance(p, dict)
                or p.get("type") != "text"
                or not isinstance(p.get("text"), str)
            ):
                raise bad(f"{where}: only text content parts are supported", "messages")
            parts.append(p["text"])
        return "".join(parts)
    raise bad(f"{where}: 'content' must be a string", "messages", "invalid_type")


class Api:
    """Request validation and response shaping, apart from HTTP."""

    def __init__(self, engine: Engine, reasoning_format: str = "split") -> None:
        self.engine = engine
        self.reasoning_format = reasoning_format

    def models(self) -> dict:
        e = self.engine
        return {
            "object": "list",
            "data": [
                {
                    "id": e.model_name,
                    "object": "model",
                    "created": e.created,
                    "owned_by": "spongebob",
                }
            ],
        }

    def _common(self, body: dict, prompts: list[list[int]]) -> Job:
        e = self.engine
        if "model" in body and not isinstance(body["model"], str):
            raise bad("'model' must be a string", "model", "invalid_type")
        if "stream" in body and not isinstance(body["stream"], bool):
            raise bad("'stream' must be a boolean", "stream", "invalid_type")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        n = _int(body, "n")
        n = 1 if n is None else n
        if not 1 <= n <= e.max_n:
            raise bad(f"'n' must be in [1, {e.max_n}], not {n}", "n")
        seed = _int(body, "seed")
        longest = max(len(p) for p in prompts)
        room = e.context - longest
        if room < 1:
            raise bad(
                f"the prompt is {longest} tokens; this model's context is {e.context}",
                "messages",
                "context_length_exceeded",
            )
        mt = _int(body, "max_completion_tokens")
        mt = _int(body, "max_tokens") if mt is None else mt
        if mt is not None:
            if mt < 1:
                raise bad(f"'max_tokens' must be at least 1, not {mt}", "max_tokens")
            if mt > e.context - 1:
                raise bad(
                    f"'max_tokens' is {mt}; this model's context is {e.context} tokens",
                    "max_tokens",
                )
            if mt > room:
                raise bad(
                    f"the prompt ({longest} tokens) plus max_tokens ({mt}) is more than this "
                    f"model's context of {e.context} tokens",
                    "messages",
                    "context_length_exceeded",
                )
        max_tokens = min(e.default_max_tokens, room) if mt is None else mt
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
        if len(stop) > MAX_STOP:
            raise bad(f"'stop' takes at most {MAX_STOP} strings", "stop")
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
        return Job(
            prompts=prompts,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=[s for s in stop if s],
            deadline=time.monotonic() + e.timeout,
        )

    def chat_job(self, body: dict) -> tuple[Job, bool]:
        """(job, split reasoning?) of a chat request."""
        msgs = body.get("messages")
        if msgs is None:
            raise bad("'messages' is required", "messages", "missing_required_parameter")
        if not isinstance(msgs, list):
            raise bad("'messages' must be a list", "messages", "invalid_type")
        if not msgs:
            raise bad("'messages' must not be empty", "messages")
        clean = []
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise bad(f"{where} must be an object", "messages", "invalid_type")
            role = m.get("role")
            if role not in ROLES:
                raise bad(f"{where}: unknown role {role!r}", "messages")
            msg: dict = {"role": ROLES[role]}
            calls = m.get("tool_calls") if role == "assistant" else None
            content = m.get("content")
            msg["content"] = "" if content is None and calls else _text(content, where)
            if calls is not None:
                if not isinstance(calls, list):
                    raise bad(f"{where}: 'tool_calls' must be a list", "messages", "invalid_type")
                msg["tool_calls"] = calls  # its fields are checked by the template (Rust)
            if role == "assistant" and isinstance(m.get("reasoning_content"), str):
                msg["reasoning_content"] = m["reasoning_content"]
            clean.append(msg)
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise bad("'tools' must be a list", "tools", "invalid_type")
        kwargs = body.get("chat_template_kwargs") or {}
        thinking = kwargs.get("enable_thinking", False) if isinstance(kwargs, dict) else None
        if not isinstance(thinking, bool):
            raise bad(
                "'chat_template_kwargs' must be an object whose 'enable_thinking' is a boolean",
                "chat_template_kwargs",
                "invalid_type",
            )
        fmt = body.get("reasoning_format", self.reasoning_format)
        if fmt not in ("split", "inline"):
            raise bad("'reasoning_format' must be 'split' or 'inline'", "reasoning_format")
        tok = self.engine.tok
        try:
            ids = [int(i) for i in tok.encode_prompt(clean, tools=tools or None, thinking=thinking)]
        except ValueError as e:
            raise bad(f"messages: {e}", "tools" if "tool" in str(e) else "messages") from None
        job = self._common(body, [ids])
        job.tools = bool(tools)
        job.template = tok.template
        job.opened = tok.template == "chatml" and thinking
        return job, fmt == "split"

    def completion_job(self, body: dict) -> Job:
        prompt = body.get("prompt")
        if prompt is None:
            raise bad("'prompt' is required", "prompt", "missing_required_parameter")
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise bad("'prompt' must be a string or a non-empty list of strings", "prompt")
        tok = self.engine.tok
        prompts = [[int(tok.bos_id), *map(int, tok.encode(t))] for t in texts]
        return self._common(body, prompts)


# --- HTTP -----------------------------------------------------------------------------------


def page_html() -> bytes:
    """The web chat page, shipped as package data."""
    return resources.files("spongebob").joinpath("web/index.html").read_bytes()


def _peer_closed(sock: socket.socket) -> bool:
    """Has the client closed its end? (readable with nothing to read)"""
    try:
        r, _, _ = select.select([sock], [], [], 0)
        if not r:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "spongebob"
    api: Api  # set on the subclass made by `make_server`
    api_key: str | None = None
    quiet = True

    def log_message(self, format, *args) -> None:
        if not self.quiet:
            super().log_message(format, *args)

    # --- plumbing

    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ApiError, headers: dict | None = None) -> None:
        self._send_json(err.status, err.body(), headers)

    def _routes(self) -> dict:
        return {
            "/": {"GET": self._page},
            "/index.html": {"GET": self._page},
            "/health": {"GET": lambda: self._send_json(200, {"status": "ok"})},
            "/v1/models": {"GET": lambda: self._send_json(200, self.api.models())},
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
        }

    def _dispatch(self, method: str) -> None:
        try:
            path = self.path.split("?", 1)[0]
            if len(path) > 1:
                path = path.rstrip("/")
            methods = self._routes().get(path)
            if methods is None:
                self._drain()
                raise ApiError(404, f"no such endpoint: {method} {path}", code="not_found")
            if method not in methods:
                self._drain()
                raise ApiError(
                    405,
                    f"{path} takes {', '.join(methods)}, not {method}",
                    code="method_not_allowed",
                    headers={"Allow": ", ".join(methods)},
                )
            if path.startswith("/v1/") and self.api_key is not None:
                got = self.headers.get("Authorization", "")
                want = f"Bearer {self.api_key}"
                if not hmac.compare_digest(got.encode(), want.encode()):
                    self._drain()
                    raise ApiError(401, "invalid or missing API key", code="invalid_api_key")
            methods[method]()
        except ApiError as e:
            self._error(e, e.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug in one request never takes the server down
            try:
                self._error(ApiError(500, f"internal error: {e}", "server_error", "internal_error"))
            except OSError:
                self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _drain(self) -> None:
        """Read and drop a request body we will not use, so the connection stays usable."""
        n = self.headers.get("Content-Length")
        if n and n.isdigit() and int(n) <= MAX_BODY:
            self.rfile.read(int(n))
        elif n:
            self.close_connection = True

    def _body(self) -> dict:
        n = self.headers.get("Content-Length")
        if n is None or not n.isdigit():
            self.close_connection = True
            raise ApiError(
                411, "a JSON body with Content-Length is required", code="length_required"
            )
        if int(n) > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"the body is over {MAX_BODY} bytes", code="too_large")
        raw = self.rfile.read(int(n))
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"the body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object", code="invalid_json")
        return body

    def _page(self) -> None:
        data = page_html()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # --- the two generating endpoints

    def _chat(self) -> None:
        body = self._body()
        job, split = self.api.chat_job(body)
        self._generate(job, body, chat=True, split=split)

    def _completions(self) -> None:
        body = self._body()
        job = self.api.completion_job(body)
        self._generate(job, body, chat=False, split=False)

    def _events(self, job: Job):
        """The job's events; cancels it when the client goes away."""
        while True:
            try:
                ev = job.events.get(timeout=POLL_S)
            except queue.Empty:
                if _peer_closed(self.connection):
                    job.cancelled.set()
                    self.close_connection = True
                    return
                continue
            yield ev

    def _generate(self, job: Job, body: dict, chat: bool, split: bool) -> None:
        engine = self.api.engine
        engine.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        prompt_tokens = sum(len(p) for p in job.prompts)
        try:
            if body.get("stream"):
                self._stream(job, body, chat, split, rid, created, prompt_tokens)
            else:
                self._whole(job, chat, split, rid, created, prompt_tokens)
        except (BrokenPipeError, ConnectionResetError, OSError):
            job.cancelled.set()
            self.close_connection = True

    def _whole(self, job, chat, split, rid, created, prompt_tokens) -> None:
        texts = [""] * job.rows
        ends: dict[int, tuple[str, int]] = {}
        for kind, i, value in self._events(job):
            if kind == "delta":
                texts[i] += value
            elif kind == "done":
                ends[i] = value
            elif kind == "timeout":
                job.cancelled.set()
                raise timeout_error(self.api.engine.timeout)
            elif kind == "error":
                raise value
            if len(ends) == job.rows:
                break
        else:
            return  # the client left
        choices = []
        for i in range(job.rows):
            reason = ends[i][0]
            if chat:
                msg, called = shape_message(texts[i], job, split)
                choices.append(
                    {
                        "index": i,
                        "message": msg,
                        "logprobs": None,
                        "finish_reason": called or reason,
                    }
                )
            else:
                choices.append(
                    {"index": i, "text": texts[i], "logprobs": None, "finish_reason": reason}
                )
        completion = sum(end[1] for end in ends.values())
        self._send_json(
            200,
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": self.api.engine.model_name,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion,
                },
            },
        )

    def _stream(self, job, body, chat, split, rid, created, prompt_tokens) -> None:
        so = body.get("stream_options") or {}
        model = self.api.engine.model_name
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(payload) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        def chunk(i: int, delta: dict | None = None, text: str = "", reason=None) -> dict:
            if chat:
                choice = {
                    "index": i,
                    "delta": delta or {},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            else:
                choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
            }

        splitters = [ReasoningSplitter(job.opened) if split else None for _ in range(job.rows)]
        holders = [ToolCallHolder() if job.tools else None for _ in range(job.rows)]

        def pieces(i: int, text: str, final: bool = False) -> str | None:
            """Send a row's new text; at its end, its tool calls (returns "tool_calls" then)."""
            sp, holder = splitters[i], holders[i]
            parts = ([] if not text else sp.feed(text)) if sp else [("content", text)]
            if sp and final:
                parts += sp.flush()
            for field_, t in parts:
                if field_ == "content" and holder:
                    t = holder.feed(t)
                if t:
                    key = "reasoning_content" if field_ == "reasoning" else "content"
                    send(chunk(i, {key: t}) if chat else chunk(i, text=t))
            if not (final and holder):
                return None
            rest, calls = holder.finish()
            if rest:
                send(chunk(i, {"content": rest}))
            if not calls:
                return None
            deltas = [{"index": k, **c} for k, c in enumerate(calls)]
            send(chunk(i, {"tool_calls": deltas}))
            return "tool_calls"

        if chat:
            for i in range(job.rows):
                send(chunk(i, {"role": "assistant", "content": ""}))
        ended, completion = 0, 0
        for kind, i, value in self._events(job):
            if kind == "delta":
                pieces(i, value)
            elif kind == "done":
                called = pieces(i, "", final=True)
                send(chunk(i, reason=called or value[0]))
                completion += value[1]
                ended += 1
            elif kind in ("timeout", "error"):
                job.cancelled.set()
                err = timeout_error(self.api.engine.timeout) if kind == "timeout" else value
                send(err.body())
                break
            if ended == job.rows:
                break
        else:
            return  # the client left
        if so.get("include_usage"):
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            }
            send({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                  "usage": usage})  # fmt: skip
        send("[DONE]")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def make_server(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8998,
    api_key: str | None = None,
    reasoning_format: str = "split",
    quiet: bool = True,
) -> Server:
    """An HTTP server (not yet serving) for `engine`; port 0 picks a free port."""
    handler = type(
        "SpongeBobHandler",
        (Handler,),
        {"api": Api(engine, reasoning_format), "api_key": api_key or None, "quiet": quiet},
    )
    return Server((host, port), handler)


# --- command line --------------------------------------------------------------------------


def add_commands(sub) -> None:
    """`spongebob serve`."""
    from spongebob.chat import add_model_args

    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible HTTP API, with a web chat page",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8998, help="port (default 8998; 0 = any free)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/")
    p.add_argument("--model-name", default="spongebob", help="the model id clients see")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together (default 32)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting before 429 (default 64)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    p.add_argument("--max-n", type=int, default=8, help="largest n a request may ask (default 8)")
    p.add_argument(
        "--max-tokens", type=int, default=512, help="max_tokens when a request gives none"
    )
    p.add_argument(
        "--reasoning-format",
        choices=["split", "inline"],
        default="split",
        help="split: <think> text in reasoning_content (default); inline: left in content",
    )
    p.add_argument("--log-requests", action="store_true", help="log every request to stderr")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    for name in ("max_batch", "max_queue", "max_n", "max_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.timeout <= 0:
        raise UserError("--timeout must be > 0")
    from spongebob import checkpoint

    loaded = checkpoint.load(args.ckpt, args.device, tokenizer=args.tokenizer, kernels=args.kernels)
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        model_name=args.model_name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        timeout=args.timeout,
        max_n=args.max_n,
        default_max_tokens=args.max_tokens,
    )
    try:
        httpd = make_server(
            engine, args.host, args.port, args.api_key, args.reasoning_format, not args.log_requests
        )
    except OSError as e:
        engine.close()
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    host, port = httpd.server_address[:2]
    print(f"spongebob serve: {loaded.meta.get('path')} on http://{host}:{port}/", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        engine.close()
    print("spongebob serve: stopped", file=sys.stderr)
    return 0
