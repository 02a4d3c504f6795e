"""The web chat page (`GET /` of `spongebob serve`) in a real headless Chromium, driven over the
Chrome DevTools Protocol: typing and Enter or the Send button, a reply streaming into the page,
the whole history sent on the next turn, reasoning in its own collapsible element, the sampling
controls in the request, Stop and New chat, a screenshot, and the `spongebob serve` command
itself. Chromium comes from Debian (`scripts/install_chromium.sh`); without it these fail."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest
import websocket
from PIL import Image

from spongebob.serve import Engine, make_server, page_html
from test_generate import Scripted, make_checkpoint

TIMEOUT = 20.0  # seconds for any one wait: the browser, a reply, the server starting
DELAY = 0.04  # seconds per scripted token, so a reply streams over many frames
REPLY = "Hello from Bikini Bottom! I stream one token at a time."
THINK = "The user asks about the sea. Pineapples float, so"
ANSWER = "SpongeBob lives in a pineapple under the sea."


def chromium() -> str:
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not exe:
        pytest.fail(
            "no 'chromium' on PATH: run scripts/install_chromium.sh (the web page tests need a "
            "real browser)",
            pytrace=False,
        )
    return exe


def kill_group(proc: subprocess.Popen, sig=signal.SIGTERM, wait: float = 5.0) -> None:
    """Signal the process group `proc` leads; SIGKILL it when it does not end in `wait` s."""
    for s in (sig, signal.SIGKILL):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- a small DevTools protocol client -------------------------------------------------------


class Page:
    """One browser tab over CDP: calls, JavaScript, and input the way a user gives it."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=TIMEOUT, suppress_origin=True)
        self.ids = itertools.count(1)
        self.errors: list[str] = []  # uncaught exceptions and console errors of the page

    def call(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg["result"]
            self._event(msg)
        raise AssertionError(f"{method}: no answer in {TIMEOUT}s")

    def _event(self, msg: dict) -> None:
        p = msg.get("params", {})
        if msg.get("method") == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self.errors.append(d.get("exception", {}).get("description") or d.get("text"))
        elif msg.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
            self.errors.append(
                " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
            )

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, f"{expr}: {r['exceptionDetails']}"
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = TIMEOUT):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expr)):
            assert time.monotonic() < deadline, f"timed out waiting for {expr}"
            time.sleep(0.05)
        return value

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && !!document.getElementById('input')")
        self.wait("document.getElementById('model').textContent !== ''")  # /v1/models answered

    def click(self, selector: str) -> None:
        x, y = self.js(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type(self, selector: str, text: str, replace: bool = False) -> None:
        """Click into the field and type `text` (replacing what is there if `replace`)."""
        self.click(selector)
        assert self.js(f"document.activeElement === document.querySelector({json.dumps(selector)})")
        if replace:
            self.js("document.activeElement.select()")
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        key = dict(key="Enter", code="Enter", windowsVirtualKeyCode=13, nativeVirtualKeyCode=13)
        self.call("Input.dispatchKeyEvent", type="keyDown", text="\r", **key)
        self.call("Input.dispatchKeyEvent", type="keyUp", **key)

    def send(self, text: str, button: bool = False) -> None:
        """Type a message and send it with Enter (or the Send button); waits for its bubble."""
        count = "document.querySelectorAll('.msg.assistant').length"
        before = self.js(count)
        self.type("#input", text)
        if button:
            self.click("#send")
        else:
            self.press_enter()
        self.wait(f"{count} === {before + 1}")

    def value(self, selector: str) -> str:
        return self.js(f"document.querySelector({json.dumps(selector)}).value")

    def last_reply(self) -> dict | None:
        """The newest assistant bubble: its answer, reasoning and state."""
        return self.js("""(() => {
            const all = document.querySelectorAll('.msg.assistant');
            if (!all.length) return null;
            const b = all[all.length - 1], d = b.querySelector('details.reasoning');
            const a = b.querySelector('.answer');
            return { answer: a.textContent, think: d.querySelector('.think').textContent,
                     hidden: d.hidden, open: d.open,
                     summary: d.querySelector('summary').textContent,
                     separate: d.parentElement === b
                         && !a.contains(d) && !d.contains(a),
                     thinkShown: d.querySelector('.think').checkVisibility(),
                     done: b.dataset.done === '1', error: b.classList.contains('error'),
                     meta: b.querySelector('.meta').textContent,
                     count: all.length };
        })()""")

    def reply(self, timeout: float = TIMEOUT) -> dict:
        """Wait for the newest reply to finish; returns it."""
        self.wait(
            "(() => { const a = document.querySelectorAll('.msg.assistant');"
            " return a.length > 0 && a[a.length - 1].dataset.done === '1'; })()",
            timeout,
        )
        return self.last_reply()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    exe = chromium()
    root = tmp_path_factory.mktemp("chromium")
    profile = root / "profile"
    log_path = root / "chromium.log"
    args = [
        exe,
        "--headless=new",
        "--no-sandbox",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-extensions",
        "--disable-background-networking",
        "--window-size=1000,720",
        "about:blank",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"chromium did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        tab = next(t for t in targets if t["type"] == "page")
        p = Page(tab["webSocketDebuggerUrl"])
        p.call("Page.enable")
        p.call("Runtime.enable")
        yield p
        p.ws.close()
    finally:
        kill_group(proc)


@pytest.fixture(autouse=True)
def _no_page_errors(request):
    """Every browser test ends with no uncaught JavaScript error or console error."""
    if "page" not in request.fixturenames:
        yield
        return
    p = request.getfixturevalue("page")
    p.errors.clear()
    yield
    assert not p.errors, p.errors


# --- a server with a scripted, slow model ---------------------------------------------------


class SlowScripted(Scripted):
    """Replies from a queue of scripts, one per prompt (a prefill has more than one token);
    every forward sleeps `delay` seconds, so a reply arrives token by token."""

    def __init__(self, vocab: int, eos: int, delay: float) -> None:
        super().__init__([eos], vocab)
        self.eos, self.delay = eos, delay
        self.replies: deque[list[int]] = deque()

    def forward(self, input_ids, **kw):
        if input_ids.shape[1] > 1:
            self.calls = 0
            self.script = self.replies.popleft() if self.replies else [self.eos]
        time.sleep(self.delay)
        return super().forward(input_ids, **kw)


@pytest.fixture(scope="module")
def site(chat_tok):
    """The page served by a real `make_server` over an `Engine` with a scripted model; records
    every chat request body the server gets."""
    t = chat_tok
    model = SlowScripted(t.vocab_size, t.eos_id, DELAY)
    engine = Engine(model, t, model_name="sponge-test", default_max_tokens=100)
    httpd = make_server(engine, "127.0.0.1", 0)
    api = httpd.RequestHandlerClass.api
    bodies: list[dict] = []
    chat_job = api.chat_job

    def recording(body):
        bodies.append(body)
        return chat_job(body)

    api.chat_job = recording
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()

    def ids(text: str) -> list[int]:
        return [int(i) for i in t.encode(text)]

    def say(text: str) -> None:
        model.replies.append([*ids(text), t.eos_id])

    def reason(think: str, answer: str) -> None:
        model.replies.append(
            [
                t.token_to_id("<think>"),
                *ids(think),
                t.token_to_id("</think>"),
                *ids("\n"),
                t.token_to_id("<answer>"),
                *ids(answer),
                t.token_to_id("</answer>"),
                t.eos_id,
            ]
        )

    try:
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{httpd.server_address[1]}/",
            engine=engine,
            bodies=bodies,
            say=say,
            reason=reason,
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
        engine.close()
        thread.join(5)


# --- the tests ------------------------------------------------------------------------------


def test_a_typed_message_streams_its_reply_into_the_page_with_the_sampling_controls(page, site):
    site.say(REPLY)
    page.open(site.url)
    assert page.js("document.getElementById('model').textContent") == "sponge-test"
    page.type("#temperature", "0.3", replace=True)
    page.type("#max_tokens", "60", replace=True)
    page.type("#top_p", "0.9", replace=True)
    assert (page.value("#temperature"), page.value("#max_tokens")) == ("0.3", "60")
    page.type("#input", "Hi SpongeBob, where do you live?")
    assert page.value("#input") == "Hi SpongeBob, where do you live?"
    page.press_enter()
    page.wait("document.querySelectorAll('.msg.assistant').length === 1")

    seen: list[str] = []  # every distinct answer text the page showed, in order
    busy = False  # was the Send button disabled while streaming?
    deadline = time.monotonic() + TIMEOUT
    while True:
        r = page.last_reply()
        if r is not None:
            if not seen or r["answer"] != seen[-1]:
                seen.append(r["answer"])
            if r["done"]:
                break
            busy = busy or page.js("document.getElementById('send').disabled")
        assert time.monotonic() < deadline, f"the reply never finished; saw {seen}"
        time.sleep(0.02)
    assert seen[-1] == REPLY and not r["error"]
    partial = [s for s in seen if s and s != REPLY]
    assert len(partial) >= 3, f"the reply did not stream in pieces: {seen}"
    assert all(b.startswith(a) for a, b in itertools.pairwise(seen)), seen
    assert busy and not page.js("document.getElementById('send').disabled")
    assert r["hidden"] and r["think"] == ""  # no reasoning, no reasoning box
    assert "finish: stop" in r["meta"] and "completion tokens" in r["meta"]
    assert page.value("#input") == ""
    user = page.js("[...document.querySelectorAll('.msg.user')].pop().lastChild.textContent")
    assert user == "Hi SpongeBob, where do you live?"

    body = site.bodies[-1]
    assert body["messages"] == [{"role": "user", "content": "Hi SpongeBob, where do you live?"}]
    assert body["stream"] is True and body["model"] == "sponge-test"
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.9, 60)


def test_turns_send_the_whole_history_and_reasoning_folds_into_its_own_box(page, site):
    page.open(site.url)
    assert page.value("#max_tokens") == ""  # empty = auto: the request leaves it out
    site.say("Under the sea.")
    page.send("Where?")
    first = page.reply()
    assert first["answer"] == "Under the sea." and first["hidden"]
    assert "max_tokens" not in site.bodies[-1]

    site.reason(THINK, ANSWER)
    page.send("In what?", button=True)
    states = []  # (reasoning shown so far, answer so far, open, summary) while it streams
    deadline = time.monotonic() + TIMEOUT
    while not (r := page.last_reply())["done"] or r["count"] < 2:
        states.append((r["think"], r["answer"], r["open"], r["summary"]))
        assert time.monotonic() < deadline, "the reasoning reply never finished"
        time.sleep(0.02)
    thinking = [st for st in states if st[0] and not st[1]]
    assert thinking and all(st[2] and st[3] == "thinking…" for st in thinking), states
    assert all(not st[2] for st in states if st[1]), "the reasoning stays open under the answer"
    assert site.bodies[-1]["messages"] == [
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "Under the sea."},
        {"role": "user", "content": "In what?"},
    ]
    assert (r["think"], r["answer"]) == (THINK, ANSWER) and not r["error"]
    assert not r["hidden"] and r["separate"]
    assert not r["open"] and not r["thinkShown"]  # folded once the answer came
    page.click(".msg.assistant:last-of-type details.reasoning summary")
    r = page.last_reply()
    assert r["open"] and r["thinkShown"]
    page.click(".msg.assistant:last-of-type details.reasoning summary")
    assert not page.last_reply()["open"]

    site.say("It is a very long answer that max tokens cuts short.")
    page.type("#max_tokens", "3", replace=True)
    page.send("Why?")
    r = page.reply()
    assert "finish: length" in r["meta"] and r["answer"]
    body = site.bodies[-1]
    assert body["max_tokens"] == 3 and len(body["messages"]) == 5
    assert body["messages"][3] == {"role": "assistant", "content": ANSWER}  # answer, no think

    page.click("#reset")  # New chat: nothing on screen, nothing in the next request
    assert page.js("document.querySelectorAll('.msg').length") == 0
    site.say("Hi again.")
    page.type("#max_tokens", "40", replace=True)  # the settings stay as they were
    page.send("Hello")
    assert page.reply()["answer"] == "Hi again."
    assert site.bodies[-1]["messages"] == [{"role": "user", "content": "Hello"}]


def test_stop_ends_the_stream_and_the_server_cancels_the_row(page, site):
    page.open(site.url)
    site.say(" ".join(["bubbles"] * 80))
    page.send("Talk a lot")
    page.wait("(() => { const a = document.querySelectorAll('.msg.assistant .answer');"
              " return a.length && a[a.length - 1].textContent.length > 20; })()")  # fmt: skip
    before = len(site.engine.recent)
    page.click("#stop")
    r = page.reply()
    assert "finish: stopped" in r["meta"] and not r["error"]
    deadline = time.monotonic() + TIMEOUT
    while not any(e[2] == "cancelled" for e in list(site.engine.recent)[before:]):
        assert time.monotonic() < deadline, "the server never noticed the client left"
        time.sleep(0.05)
    site.say("ok")  # the stopped reply is part of the chat, as it is on screen
    page.send("Enough")
    assert page.reply()["answer"] == "ok"
    msgs = site.bodies[-1]["messages"]
    assert len(msgs) == 3 and msgs[1]["role"] == "assistant"
    assert msgs[1]["content"].startswith("bubbles") and len(msgs[1]["content"]) < 80 * 8


def test_a_refused_request_shows_its_error_and_the_chat_goes_on(page, site):
    page.open(site.url)
    page.type("#max_tokens", "100000", replace=True)
    page.send("Too much")
    r = page.reply()
    assert r["error"] and "max_tokens" in r["answer"] and "100000" in r["answer"], r
    page.type("#max_tokens", "20", replace=True)
    page.send("bubble " * 300)  # more than the context of 256 tokens
    r = page.reply()
    assert r["error"] and "context" in r["answer"] and "New chat" in r["answer"], r
    assert not page.js("document.getElementById('send').disabled")
    site.say("Fine.")
    page.send("Short one")
    r = page.reply()
    assert r["answer"] == "Fine." and not r["error"]
    assert site.bodies[-1]["messages"] == [{"role": "user", "content": "Short one"}]


def test_a_screenshot_of_a_chat_is_a_real_picture(page, site, tmp_path):
    page.open(site.url)
    site.say("I am SpongeBob.")
    page.send("Who are you?")
    page.reply()
    site.reason(THINK, ANSWER)
    page.send("Where do you live?")
    page.reply()
    page.click(".msg.assistant:last-of-type details.reasoning summary")  # show the reasoning
    png = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    out = tmp_path / "chat.png"
    out.write_bytes(png)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.width >= 800 and img.height >= 500, img.size
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the screenshot is (nearly) blank"
    top = max(colours)[0] / (img.width * img.height)
    assert top < 0.9, f"one colour covers {top:.0%} of the screenshot"


def test_the_spongebob_serve_command_serves_a_working_page(page, tmp_path, tok_dir):
    ckpt = make_checkpoint(tmp_path / "final", tok_dir, seed=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "spongebob", "serve", "--ckpt", str(ckpt), "--port", "0"]
    cmd += ["--device", "cpu", "--kernels", "torch", "--model-name", "tiny"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        out, url = [], None
        deadline = time.monotonic() + 60
        while url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"spongebob serve did not start:\n{''.join(out)}")
            out.append(line)
            if " on http://" in line:
                url = line.rsplit(" on ", 1)[1].strip()
        with urllib.request.urlopen(url, timeout=10) as r:  # the page is the package's file
            assert r.headers["Content-Type"].startswith("text/html")
            assert r.read() == page_html()
        page.open(url)
        assert page.js("document.getElementById('model').textContent") == "tiny"
        page.send("你好，你是谁？")
        r = page.reply(timeout=60)
        assert not r["error"], r
        assert "finish: " in r["meta"] and "completion tokens" in r["meta"], r
    finally:
        kill_group(proc, signal.SIGINT, wait=10)


def test_the_page_is_package_data_next_to_serve():
    """serve.py reads the page with importlib.resources; maturin's python-source layout puts
    every file of python/spongebob that git does not ignore into the wheel, web/ included."""
    f = resources.files("spongebob") / "web" / "index.html"
    assert f.is_file()
    html = f.read_text(encoding="utf-8")
    assert page_html() == f.read_bytes()
    for needle in ("/v1/chat/completions", 'id="temperature"', 'id="max_tokens"', "reasoning"):
        assert needle in html
    src = Path(__file__).parents[1] / "python" / "spongebob" / "web" / "index.html"
    if not (src.is_file() and shutil.which("git")):
        return
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(src)], cwd=src.parent, capture_output=True
    )
    assert ignored.returncode != 0, "web/index.html is git-ignored, so maturin would drop it"
