"""`spongebob chat`: talk to a checkpoint, interactively or from a script.

Three modes, the tutorial's `--model_mode 0/1/2`:

* pretrain — raw continuation: `<s>` + your text, the model writes on until `</s>`;
* chat — the chat template with the last `--history N` exchanges and an optional `--system`;
  prompt ids come from the Rust `ChatTokenizer` (one source of truth for the template);
* reason — chat, with the reply's `<think>` part shown apart from its `<answer>`. Only the
  answer goes back into the history, as reasoning models are usually run. A chatml-family
  model (contracts.md §2) is prompted with its think block open.

A distilled (reasoning) model often thinks in chat mode too: a chat reply that opens with
`<think>` is shown and recorded as in reason mode; any other reply is shown as written.

`--tools calc` (chatml family) offers the built-in calculator (spongebob/tools.py): a reply's
`<tool_call>` is run, its result goes back as a `tool` message, and the model continues, up to
`MAX_TOOL_ROUNDS` calls per turn.

Interactive when stdin is a terminal and no `--prompt`/`--prompts-file` is given: `/reset`
clears the history, `/exit` or Ctrl-D quits, Ctrl-C stops a reply. Otherwise non-interactive:
each prompt (from `--prompt`, repeatable, `--prompts-file`, or stdin lines) is one turn of the
same conversation, as if typed; the replies are printed one per prompt (`--json` for one JSON
object per line). `--history 0` makes every prompt independent.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from spongebob import tools as builtin_tools
from spongebob.errors import UserError
from spongebob.generate import (
    TAGS,
    SamplingConfig,
    find_tool_calls,
    parse_reasoning,
)

MODES = ("pretrain", "chat", "reason")
USER_PROMPT = "你> "
BOT_PREFIX = "SpongeBob> "
THINK_LABEL = "[思考] "
ANSWER_LABEL = "[回答] "
TOOL_LABEL = "[工具] "
MAX_TOOL_ROUNDS = 4


def starts_thinking(reply: str) -> bool:
    """Does a reply open with a think block? Then a chat-mode reply is a reasoning one."""
    return reply.lstrip().startswith(TAGS[0])


class ReasonView:
    """Rewrites a streamed reasoning reply for display: `<think>` and `<answer>` become labels
    on their own lines, closing tags vanish, and the newlines that frame the blocks are
    dropped. Text that might be the start of a tag (a tokenizer without tag tokens emits `<`,
    `think`, `>` separately) is held back until it is known."""

    def __init__(
        self, opened: bool = False, answer_after_think: bool = False, detect: bool = False
    ) -> None:
        """`opened`: the prompt ended inside the think block (chatml), so the reply starts
        with its reasoning; `answer_after_think`: what follows `</think>` is the answer
        (chatml has no answer tags); `detect` (chat mode): rewrite only a reply that opens
        with `<think>` (see `starts_thinking`), pass any other through unchanged."""
        self.undecided = detect  # the reply's start is still arriving
        self.passthrough = False
        self.buf = ""
        self.pending_nl = 0  # trailing newlines held until more text follows
        self.after_tag = False
        self.line_start = True
        self.opened = opened
        self.answer_after_think = answer_after_think

    def feed(self, text: str) -> str:
        if self.passthrough:
            return text
        self.buf += text
        if self.undecided:
            head = self.buf.lstrip()
            if not head.startswith(TAGS[0]):
                if TAGS[0].startswith(head):
                    return ""  # only whitespace, or `<think>` still arriving
                self.passthrough = True
                text, self.buf = self.buf, ""
                return text
            self.undecided, self.buf = False, head  # the whitespace before it is no text
        out = []
        if self.opened:
            self.opened = False
            out.append(self._tag(TAGS[0]))
        while self.buf:
            lt = self.buf.find("<")
            if lt < 0:
                out.append(self._plain(self.buf))
                self.buf = ""
                break
            if lt > 0:
                out.append(self._plain(self.buf[:lt]))
                self.buf = self.buf[lt:]
            tag = next((t for t in TAGS if self.buf.startswith(t)), None)
            if tag is not None:
                out.append(self._tag(tag))
                self.buf = self.buf[len(tag) :]
                continue
            if any(t.startswith(self.buf) for t in TAGS):
                break  # maybe a tag still arriving
            out.append(self._plain(self.buf[0]))
            self.buf = self.buf[1:]
        return "".join(out)

    def flush(self) -> str:
        rest, self.buf = self.buf, ""
        return rest if self.passthrough or self.undecided else self._plain(rest)

    def _emit(self, s: str) -> str:
        if s:
            self.line_start = s.endswith("\n")
        return s

    def _tag(self, tag: str) -> str:
        self.pending_nl = 0
        self.after_tag = True
        opening = {TAGS[0]: THINK_LABEL, TAGS[2]: ANSWER_LABEL}  # <think>, <answer>
        if tag in opening:
            return self._emit(("" if self.line_start else "\n") + opening[tag])
        if tag == TAGS[1] and self.answer_after_think:
            return self._emit("\n" + ANSWER_LABEL)  # chatml: the answer follows </think>
        return ""

    def _plain(self, s: str) -> str:
        if self.after_tag:
            s = s.lstrip("\n")
            if not s:
                return ""
            self.after_tag = False
        core = s.rstrip("\n")
        if not core:
            self.pending_nl += len(s)
            return ""
        out = "\n" * self.pending_nl + core
        self.pending_nl = len(s) - len(core)
        return self._emit(out)


class ChatSession:
    """Turns user text into prompt ids for the mode, and keeps the conversation: the last
    `history` exchanges, each the user's message, any tool calls and results, and the reply."""

    def __init__(
        self,
        tokenizer,
        mode: str = "chat",
        history: int = 4,
        system: str | None = None,
        tools: list[str] | None = None,
    ) -> None:
        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r} (pretrain, chat, reason)")
        if history < 0:
            raise UserError(f"--history must be >= 0, not {history}")
        self.tok = tokenizer
        self.mode = mode
        self.history = history
        self.system = system
        self.tools = builtin_tools.pick(tools or [])
        self.turns: list[list[dict]] = []

    @property
    def template(self) -> str:
        return self.tok.template

    @property
    def opened(self) -> bool:
        """Does the prompt open the think block (chatml in reason mode)?"""
        return self.mode == "reason" and self.template == "chatml"

    def check(self) -> None:
        """Refuse what the tokenizer's template family cannot do."""
        if self.tools and self.template != "chatml":
            raise UserError(
                f"--tools needs a chatml-family tokenizer; this one's template is {self.template}"
            )
        if self.tools and self.mode == "pretrain":
            raise UserError("--tools works in chat and reason mode, not pretrain")

    def reset(self) -> None:
        self.turns.clear()

    def messages(self, user: str, pending: list[dict] | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns[-self.history :] if self.history else []:
            msgs += turn
        return [*msgs, {"role": "user", "content": user}, *(pending or [])]

    def prompt_ids(self, user: str, pending: list[dict] | None = None) -> list[int]:
        if not user.strip():
            raise UserError("empty prompt")
        if self.mode == "pretrain":
            return [self.tok.bos_id, *map(int, self.tok.encode(user))]
        msgs = self.messages(user, pending)
        ids = self.tok.encode_prompt(msgs, tools=self.tools or None, thinking=self.opened)
        return [int(i) for i in ids]

    def reasons(self, reply: str) -> bool:
        """Is `reply` a reasoning one: always in reason mode, in chat mode if it thinks."""
        return self.mode == "reason" or (self.mode == "chat" and starts_thinking(reply))

    def answer(self, reply: str) -> str:
        """What goes back into the history: the answer alone of a reasoning reply, any other
        as is, and never a reasoning tag: tags in the history teach the model to open its
        next reply with them (a demo model's second chat turn read `<think>\n</answer>`)."""
        if self.reasons(reply):
            reply = parse_reasoning(reply, self.template, self.opened).answer
        for tag in TAGS:
            reply = reply.replace(tag, "")
        return reply

    def record(self, user: str, reply: str, pending: list[dict] | None = None) -> None:
        if self.mode == "pretrain" or self.history == 0:
            return
        reply_msg = {"role": "assistant", "content": self.answer(reply)}
        self.turns.append([{"role": "user", "content": user}, *(pending or []), reply_msg])


def _pieces(stream: Iterator[str], session: ChatSession) -> Iterator[str]:
    view = None
    if session.mode != "pretrain":
        chatml, detect = session.template == "chatml", session.mode == "chat"
        view = ReasonView(session.opened, answer_after_think=chatml, detect=detect)
    for piece in stream:
        yield view.feed(piece) if view else piece
    if view:
        yield view.flush()


def _tool_calls(session: ChatSession, text: str):
    """The calls of a reply (none when tools are off or the blocks are not valid calls)."""
    return find_tool_calls(session.answer(text)) if session.tools else None


def reply_to(
    session: ChatSession, generator, user: str, cfg: SamplingConfig, out=None
) -> tuple[str, str]:
    """Generate the reply to `user`, streaming its display form to `out` when given, running
    the tools it calls and continuing after their results; record the turn. Returns (raw
    final reply, finish reason)."""
    pending: list[dict] = []  # this turn's tool calls and results
    for _ in range(MAX_TOOL_ROUNDS + 1):
        text, finish = _generate(session, generator, session.prompt_ids(user, pending), cfg, out)
        parsed = _tool_calls(session, text) if finish == "stop" else None
        if parsed is None or len(pending) >= 2 * MAX_TOOL_ROUNDS:
            break
        calls = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in parsed.calls]  # fmt: skip
        pending.append({"role": "assistant", "content": parsed.content, "tool_calls": calls})
        for c in parsed.calls:
            result = builtin_tools.run(c.name, c.arguments)
            pending.append({"role": "tool", "content": result})
            if out is not None:
                out.write(f"\n{TOOL_LABEL}{builtin_tools.describe(c.name, c.arguments, result)}\n")
                out.flush()
    session.record(user, text, pending)
    return text, finish


def _generate(session, generator, ids, cfg, out) -> tuple[str, str]:
    stream = generator.stream(ids, cfg)
    raw: list[str] = []
    result: list = []

    def tee() -> Iterator[str]:
        while True:
            try:
                piece = next(stream)
            except StopIteration as fin:
                result.append(fin.value)
                return
            raw.append(piece)
            yield piece

    for piece in _pieces(tee(), session):
        if piece and out is not None:
            out.write(piece)
            out.flush()
    return "".join(raw), result[0].finish if result else "interrupted"


# --- command line --------------------------------------------------------------------------


def add_commands(sub) -> None:
    """`spongebob chat`."""
    p = sub.add_parser(
        "chat",
        help="talk to a checkpoint (interactive REPL, or --prompt for scripts)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--mode", choices=MODES, default="chat")
    p.add_argument(
        "--history",
        type=int,
        default=4,
        metavar="N",
        help="earlier exchanges kept in the prompt (default 4; 0 = none)",
    )
    p.add_argument("--system", help="system prompt (default: the template's)")
    p.add_argument(
        "--tools",
        nargs="+",
        default=[],
        metavar="NAME",
        choices=sorted(builtin_tools.TOOLS),
        help="built-in tools the model may call (chatml family): calc",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="non-interactive: a user turn (repeatable)",
    )
    p.add_argument(
        "--prompts-file",
        type=Path,
        metavar="FILE",
        help="non-interactive: one user turn per line ('-' = stdin)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="non-interactive output as JSON lines (prompt, reply, think, answer)",
    )
    add_sampling_args(p)
    p.set_defaults(func=_cmd_chat)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which model (chat, eval) and where it runs: the device and kernels are runtime choices,
    never read from the checkpoint."""
    p.add_argument(
        "--ckpt",
        required=True,
        type=Path,
        metavar="PATH",
        help="run folder, stage folder, checkpoint dir or file, or exported HF dir",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        metavar="DIR",
        help="tokenizer dir (default: the one stored with the checkpoint)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument(
        "--kernels",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="op set: auto (default; Triton on CUDA, PyTorch elsewhere), torch or triton",
    )


def add_sampling_args(p: argparse.ArgumentParser, greedy: bool = False) -> None:
    """The sampling flags shared by chat and eval."""
    p.add_argument("--max-new-tokens", type=int, default=256 if greedy else 512)
    p.add_argument("--temperature", type=float, default=0.0 if greedy else 0.85, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 makes tokens already in the context less likely (1 = off)",
    )
    p.add_argument("--seed", type=int, help="make sampling reproducible")


def sampling_from_args(args) -> SamplingConfig:
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    cfg.check()
    return cfg


def _read_prompts(args) -> list[str] | None:
    """The non-interactive prompts, or None for the REPL."""
    prompts = list(args.prompt)
    for p in prompts:
        if not p.strip():
            raise UserError("empty prompt (--prompt '')")
    if args.prompts_file is not None:
        if str(args.prompts_file) == "-":
            lines = sys.stdin.read().splitlines()
        else:
            try:
                lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                raise UserError(f"{args.prompts_file}: not UTF-8 text") from None
        file_prompts = [ln for ln in lines if ln.strip()]
        if not file_prompts:
            raise UserError(f"{args.prompts_file}: no prompts in it")
        prompts += file_prompts
    if prompts:
        return prompts
    if not sys.stdin.isatty():
        lines = [ln for ln in sys.stdin.read().splitlines() if ln.strip()]
        if not lines:
            raise UserError("no prompts: stdin is empty (use --prompt or a terminal)")
        return lines
    return None


def _cmd_chat(args) -> int:
    prompts = _read_prompts(args)  # before loading: a bad flag fails fast
    cfg = sampling_from_args(args)
    session = ChatSession(None, args.mode, args.history, args.system, args.tools)
    from spongebob import checkpoint
    from spongebob.generate import Generator

    loaded = checkpoint.load(args.ckpt, args.device, tokenizer=args.tokenizer, kernels=args.kernels)
    model, tok, meta = loaded.model, loaded.tokenizer, loaded.meta
    session.tok = tok
    session.check()
    gen = Generator(model, tok)
    if prompts is None:
        return repl(session, gen, cfg, meta)
    for user in prompts:
        if args.json:
            text, finish = reply_to(session, gen, user, cfg)
            rec = {"prompt": user, "reply": text, "finish": finish}
            if session.reasons(text):
                r = parse_reasoning(text, tok.template, session.opened)
                rec.update(think=r.think, answer=r.answer, well_formed=r.well_formed)
            print(json.dumps(rec, ensure_ascii=False), flush=True)
        else:
            reply_to(session, gen, user, cfg, out=sys.stdout)
            print(flush=True)
    return 0


def repl(session: ChatSession, gen, cfg: SamplingConfig, meta: dict) -> int:
    """The interactive loop. Ctrl-C during a reply stops it; at the prompt it quits."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(
        f"SpongeBob chat · {session.mode} mode · {meta.get('path')}\n"
        "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply.",
        flush=True,
    )
    while True:
        try:
            line = input(USER_PROMPT)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(history cleared)", flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text} (/reset, /exit)", flush=True)
            continue
        sys.stdout.write(BOT_PREFIX)
        sys.stdout.flush()
        try:
            reply_to(session, gen, text, cfg, out=sys.stdout)
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except UserError as e:
            sys.stdout.write(f"(error: {e})")
        print(flush=True)
