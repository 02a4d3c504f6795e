"""Template families (contracts.md §2): minimind2 and chatml render as `transformers` renders
their Jinja twins, give the ids of the HF tokenizer, and train exactly the assistant turns;
the data fields (reasoning_content, tools, tool_calls, tool messages); stop ids; parsing of
generated reasoning and tool calls.

With `SPONGEBOB_MINIMIND_DIR` pointing at a MiniMind `model/` folder (tokenizer.json and
tokenizer_config.json of jingyaogong/minimind; not part of this repository), the chatml family
is also compared with MiniMind's own template and tokenizer."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference as ref

CHATML_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": '查询城市天气 "now"\n<b>',
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["北京", "Paris"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7.5, "default": None},
                "unit": {"type": "string", "nullable": True, "ratio": 1e-05, "big": 1e16},
            },
            "required": ["city"],
        },
    },
}
CALC = {"name": "calc", "description": "", "parameters": {"expression": {"type": "string"}}}

# Every field, in the layouts MiniMind and OpenAI use.
CORPUS: list[dict] = [
    {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
    {
        "messages": [
            {"role": "system", "content": "你是助手。"},
            {"role": "user", "content": "1 + 2 = ?"},
            {"role": "assistant", "content": "\n3", "reasoning_content": "\n\n先算 1 + 2。\n"},
            {"role": "user", "content": "  再来 "},
            {"role": "assistant", "content": "<think>\n\n嗯\n\n</think>\n\n\n4 😀"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "x<think>a</think>b</think>c"},
            {"role": "system", "content": "mid-conversation system"},
            {"role": "user", "content": "\n\n"},
            {"role": "assistant", "content": "   spaces first", "reasoning_content": ""},
        ]
    },
    {
        "tools": [WEATHER, CALC],
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "北京和巴黎天气？"},
            {
                "role": "assistant",
                "content": "我查一下。",
                "reasoning_content": "要调用工具",
                "tool_calls": [
                    {"name": "get_weather", "arguments": {"city": "北京", "days": 2}},
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                ],
            },
            {"role": "tool", "content": '{"temp": 3, "unit": "°C"}'},
            {"role": "tool", "content": "rain\n"},
            {"role": "assistant", "content": "北京 3°C，巴黎下雨。"},
        ],
    },
    {
        "tools": [CALC],
        "messages": [
            {"role": "user", "content": "256 * 37"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "calc", "arguments": {"expression": "256 * 37"}},
                    }
                ],
            },
            {"role": "tool", "content": "9472"},
            {"role": "assistant", "content": "9472", "reasoning_content": "tool said so"},
            {"role": "user", "content": "谢谢"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"name": "calc", "arguments": {}},
                    {"name": "calc", "arguments": {"expression": "1/3", "x": [1.5, -2, True]}},
                ],
            },
        ],
    },
]


def _random_corpus(n: int, seed: int) -> list[dict]:
    """Random conversations (no literal chatml token strings in their text)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = ref.random_conversation(rng)
        for m in msgs:
            for t in CHATML_TOKENS:
                m["content"] = m["content"].replace(t, "")
            if m["role"] == "assistant" and rng.random() < 0.3:
                reasoning = ref.random_text(rng, 4)
                for t in CHATML_TOKENS:
                    reasoning = reasoning.replace(t, "")
                m["reasoning_content"] = reasoning
        out.append({"messages": msgs})
    return out


def _cases(gen: bool) -> list[dict]:
    cases = CORPUS + _random_corpus(40, seed=11 + gen)
    if gen:  # a prompt may end with tool responses or a user turn
        cases = cases + [{"tools": c.get("tools"), "messages": c["messages"][:-1]} for c in CORPUS]
    return cases


@pytest.fixture(scope="module")
def hf_chatml(chatml_tok_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(chatml_tok_dir))


def _hf_render(hf, case, gen, **kw):
    msgs = copy.deepcopy(case["messages"])
    return hf.apply_chat_template(
        msgs, tools=case.get("tools"), tokenize=False, add_generation_prompt=gen, **kw
    )


# --- the chatml family and transformers ---------------------------------------------------


def test_a_tokenizer_trained_for_chatml_has_minimind_s_specials_and_is_found_as_chatml(
    chatml_tok_dir, chatml_tok, hf_chatml
):
    from spongebob.data import template_info

    assert chatml_tok.template == "chatml"
    for i, t in enumerate(CHATML_TOKENS):
        assert chatml_tok.token_to_id(t) == i
    assert (chatml_tok.pad_id, chatml_tok.bos_id, chatml_tok.eos_id) == (0, 1, 2)
    assert (chatml_tok.pad_token, chatml_tok.bos_token, chatml_tok.eos_token) == tuple(
        CHATML_TOKENS[:3]
    )
    assert chatml_tok.stop_ids == [2, 0]
    assert chatml_tok.reasoning_tags == ("<think>", "</think>")
    config = json.loads((chatml_tok_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chatml_tok.chat_template
    assert chatml_tok.chat_template == template_info("chatml")["chat_template"]
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == tuple(
        CHATML_TOKENS[1:3] + CHATML_TOKENS[:1]
    )
    # As in MiniMind, the first three are special; the tags survive skip_special_tokens.
    assert hf_chatml.decode([1, 3, 5, 2], skip_special_tokens=True) == "<think><tool_call>"
    assert chatml_tok.decode([1, 3, 2], skip_special_tokens=True) == "<think>"


@pytest.mark.parametrize("trainer", ["bounded", "plain"])
def test_tokenizer_train_cli_with_template_chatml(tmp_path, train_corpus, trainer):
    from tokenizers import Tokenizer

    from spongebob.data import ChatTokenizer

    out = tmp_path / "tok"
    cmd = [
        sys.executable,
        "-m",
        "spongebob",
        "tokenizer",
        "train",
        "--data",
        *map(str, train_corpus),
    ]
    cmd += ["--vocab-size", "400", "--out", str(out), "--template", "chatml", "--trainer", trainer]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    added = {t.content: t.special for t in hf.get_added_tokens_decoder().values()}
    assert list(added) == CHATML_TOKENS
    assert [added[t] for t in CHATML_TOKENS] == [True] * 3 + [False] * 6
    assert [hf.token_to_id(t) for t in CHATML_TOKENS] == list(range(9))
    tok = ChatTokenizer.from_dir(str(out))
    assert (tok.template, tok.stop_ids, tok.vocab_size) == ("chatml", [2, 0], 400)
    info = subprocess.run(
        [sys.executable, "-m", "spongebob", "tokenizer", "info", str(out), "--json"],
        capture_output=True,
        text=True,
    )
    got = json.loads(info.stdout)
    assert got["template"] == "chatml"
    assert got["specials"] == {t: i for i, t in enumerate(CHATML_TOKENS)}


@pytest.mark.parametrize("gen", [False, True])
def test_chatml_render_and_ids_equal_transformers_on_every_field(chatml_tok, hf_chatml, gen):
    for case in _cases(gen):
        msgs, tools = case["messages"], case.get("tools")
        expected = _hf_render(hf_chatml, case, gen)
        got = chatml_tok.render(msgs, add_generation_prompt=gen, tools=tools)
        assert got == expected, case
        hf_ids = hf_chatml(expected, add_special_tokens=False)["input_ids"]
        if gen:
            ids = chatml_tok.encode_prompt(msgs, tools=tools)
        else:
            ids, _ = chatml_tok.encode_conversation(msgs, tools=tools)
        assert list(ids) == hf_ids, case


def test_chatml_open_thinking_prompt_equals_transformers(chatml_tok, hf_chatml):
    case = CORPUS[3]
    expected = _hf_render(hf_chatml, case, True, open_thinking=True)
    assert expected.endswith("<|im_start|>assistant\n<think>\n")
    msgs, tools = case["messages"], case["tools"]
    assert chatml_tok.render(msgs, True, tools=tools, thinking=True) == expected
    ids = chatml_tok.encode_prompt(msgs, tools=tools, thinking=True)
    assert list(ids) == hf_chatml(expected, add_special_tokens=False)["input_ids"]


def test_minimind2_render_equals_transformers_with_reasoning_content(chat_tok, tok_dir):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    msgs = [
        {"role": "user", "content": "1 + 2"},
        {"role": "assistant", "content": "<answer>\n3\n</answer>", "reasoning_content": "想"},
        {"role": "user", "content": "q", "reasoning_content": "not rendered on a user turn"},
    ]
    for gen in (False, True):
        expected = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert chat_tok.render(msgs, add_generation_prompt=gen) == expected
    assert "<s>assistant\n<think>\n想\n</think>\n<answer>\n3\n</answer></s>" in expected
    ids, w = chat_tok.encode_conversation(msgs[:2], think_weight=10.0)
    inline_think = "<think>\n想\n</think>\n" + msgs[1]["content"]
    inline = [msgs[0], {"role": "assistant", "content": inline_think}]
    ids2, w2 = chat_tok.encode_conversation(inline, think_weight=10.0)
    assert list(ids) == list(ids2) and np.array_equal(w, w2)


# --- masks ---------------------------------------------------------------------------------


def _trained_text(msgs: list[dict], drop_empty: bool = False) -> list[str]:
    """Each assistant turn's trained text, by the template's rules (what the mask covers)."""
    out = []
    for m in msgs:
        if m["role"] != "assistant":
            continue
        content = m.get("content") or ""
        reasoning = m.get("reasoning_content")
        if reasoning is None:
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1]
                reasoning = reasoning.lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        reasoning = reasoning.strip("\n")
        answer = content.lstrip("\n")
        if drop_empty and not reasoning:
            # The header's "\n" and an answer's leading whitespace can be one pre-token (the
            # GPT-2 split leaves a run's last space to the word after it); it counts as the
            # answer, which is what the model must write.
            lead = len(answer) - len(answer.lstrip())
            text = "\n" if lead >= 2 or (lead and lead == len(answer)) else ""
        else:
            text = f"<think>\n{reasoning}\n</think>\n\n"
        text += answer
        for k, call in enumerate(m.get("tool_calls") or []):
            f = call.get("function") or call
            args = f["arguments"]
            args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            text += ("\n" if k or content else "") + "<tool_call>\n"
            text += f'{{"name": "{f["name"]}", "arguments": {args}}}\n</tool_call>'
        out.append(text + "<|im_end|>")
    return out


def _spans(ids, weights) -> list[list[int]]:
    """Runs of consecutive trained tokens."""
    spans, cur = [], []
    for i, w in zip(ids, weights, strict=True):
        if w > 0:
            cur.append(int(i))
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


@pytest.mark.parametrize("empty_think", ["keep", "drop"])
def test_chatml_trains_each_assistant_turn_and_weighs_its_think_tags(chatml_tok_dir, empty_think):
    from spongebob.data import ChatTokenizer

    tok = ChatTokenizer.from_dir(str(chatml_tok_dir), empty_think=empty_think)
    assert tok.empty_think == empty_think
    drop = empty_think == "drop"
    think, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    for case in CORPUS + _random_corpus(30, seed=5):
        msgs = case["messages"]
        ids, w = tok.encode_conversation(msgs, think_weight=10.0, tools=case.get("tools"))
        # Labels predict the next token: weight i belongs to the token at i (its class).
        spans = _spans(ids, w)
        expected = _trained_text(msgs, drop_empty=drop)
        assert [tok.decode(s) for s in spans] == expected, case
        tags = [i for i, x in zip(ids, w, strict=True) if x == 10.0]
        assert all(t in (think, end) for t in tags)
        assert len(tags) == 2 * sum(t.startswith("<think>") for t in expected)
        assert set(np.unique(w)) <= {0.0, 1.0, 10.0}
        # Nothing of system, tools, user or tool turns, and no header, is trained.
        untrained = tok.decode([i for i, x in zip(ids, w, strict=True) if x == 0])
        assert untrained.count("<|im_start|>") == tok.render(msgs, tools=case.get("tools")).count(
            "<|im_start|>"
        )
        if drop:
            assert "<think>\n\n</think>" not in tok.decode(list(ids))


def test_the_loader_serves_chatml_conversations_with_their_tools(tmp_path, chatml_tok, make_ds):
    path = tmp_path / "tools.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for case in CORPUS:
            obj = {"conversations": case["messages"], "id": 3}
            if "tools" in case:
                obj["tools"] = case["tools"]
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        # MiniMind's own layout: tools on the system message, tool_calls as strings.
        minimind = [
            {"role": "system", "content": "# Tools ...", "tools": json.dumps([CALC])},
            {"role": "user", "content": "256 * 37"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": json.dumps([{"name": "calc", "arguments": {"expression": "x"}}]),
            },
            {"role": "tool", "content": "9472"},
            {"role": "assistant", "content": "9472"},
        ]
        f.write(json.dumps({"conversations": minimind}, ensure_ascii=False) + "\n")
    encoded = [
        chatml_tok.encode_conversation(c["messages"], 1.0, tools=c.get("tools")) for c in CORPUS
    ]
    as_openai = [
        {**m, "tool_calls": json.loads(m["tool_calls"])} if "tool_calls" in m else m
        for m in minimind
    ]
    as_openai[0] = {"role": "system", "content": "# Tools ..."}
    encoded.append(chatml_tok.encode_conversation(as_openai, 1.0, tools=[CALC]))
    assert "# Tools ...\n\n# Tools" in chatml_tok.render(as_openai, tools=[CALC])
    ds = make_ds([path], chatml_tok, "chat", seq_len=2048, batch_size=1, cache_dir=tmp_path)
    docs = []
    for batch in ds:
        ids, labels, pos = (batch[k][0].numpy() for k in ("input_ids", "labels", "position_ids"))
        real = [i for i in range(len(ids)) if not (ids[i] == 0 and pos[i] == 0)]
        starts = [i for i in real if pos[i] == 0]
        ends = [*starts[1:], real[-1] + 1]
        for a, b in zip(starts, ends, strict=True):
            docs.append((ids[a:b].tolist(), labels[a:b].tolist()))
    want = []
    for ids, w in encoded:
        ids = [int(i) for i in ids]
        labels = [ids[t + 1] if w[t + 1] > 0 else -100 for t in range(len(ids) - 1)]
        want.append((ids, [*labels, -100]))
    assert sorted(docs) == sorted(want)
    assert ds.stats()["documents"] == len(encoded)


def test_chatml_caches_and_fingerprints_are_apart_from_minimind2_and_each_option(
    tmp_path, chatml_tok_dir, make_ds
):
    from spongebob.data import ChatTokenizer

    objs = [{"conversations": c["messages"]} for c in CORPUS[:3]]
    path = ref.write_jsonl(tmp_path / "c.jsonl", objs)
    keep = ChatTokenizer.from_dir(str(chatml_tok_dir))
    drop = ChatTokenizer.from_dir(str(chatml_tok_dir), empty_think="drop")
    a = make_ds([path], keep, "chat", seq_len=256, batch_size=1, cache_dir=tmp_path / "cache")
    b = make_ds([path], drop, "chat", seq_len=256, batch_size=1, cache_dir=tmp_path / "cache")
    assert a.fingerprint != b.fingerprint
    assert a.stats()["tokens"] > b.stats()["tokens"]
    assert len(list((tmp_path / "cache").glob("*.tok"))) == 2


# --- records and errors --------------------------------------------------------------------


def test_malformed_tool_fields_are_file_line_errors_and_minimind2_refuses_tools(
    tmp_path, chatml_tok_dir, tok_dir
):
    from spongebob.data_cmd import check_files

    good = {"conversations": CORPUS[3]["messages"], "tools": CORPUS[3]["tools"]}
    bad_calls = {
        "conversations": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{x"}]},
        ]
    }
    bad_tools = {"conversations": CORPUS[0]["messages"], "tools": "[not json"}
    path = ref.write_jsonl(tmp_path / "t.jsonl", [good, bad_calls, bad_tools])
    reports, problems = check_files([path], chatml_tok_dir)
    assert reports[0]["records"] == 1 and reports[0]["bad"] == 2
    assert problems[0].startswith(f"{path}:2: bad record: `tool_calls[].arguments`")
    assert problems[1].startswith(f"{path}:3: bad record: `tools`")
    # Without a tokenizer the same parser finds the same lines.
    assert check_files([path])[1] == problems
    # The minimind2 family renders no tools: a clear error per line, also with --template.
    _, problems = check_files([path], tok_dir)
    assert "the minimind2 template has no tools; use --template chatml" in problems[0]
    from spongebob.errors import UserError

    with pytest.raises(UserError, match="missing special token <s>"):
        check_files([path], chatml_tok_dir, template="minimind2")


def test_messages_from_python_pass_the_file_checks(chatml_tok, chat_tok):
    with pytest.raises(ValueError, match="arguments"):
        chatml_tok.render(
            [{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": 3}]}]
        )
    with pytest.raises(ValueError, match="tools"):
        chatml_tok.render([{"role": "user", "content": "q"}], tools={"name": "f"})
    with pytest.raises(ValueError, match="unknown role"):
        chatml_tok.render([{"role": "bot", "content": "q"}])
    with pytest.raises(ValueError, match="no tools"):
        chat_tok.encode_prompt([{"role": "user", "content": "q"}], tools=[CALC])
    # Unknown keys stay ignored.
    msgs = [{"role": "user", "content": "q", "name": "x"}, {"role": "assistant", "content": "a"}]
    bare = [{k: m[k] for k in ("role", "content")} for m in msgs]
    assert chatml_tok.render(msgs) == chatml_tok.render(bare)


def test_template_override_and_data_check_cli(tmp_path, chatml_tok_dir, tok_dir):
    from spongebob.data import ChatTokenizer

    with pytest.raises(ValueError, match="missing special token <s>"):
        ChatTokenizer.from_dir(str(chatml_tok_dir), template="minimind2")
    with pytest.raises(ValueError, match="unknown template"):
        ChatTokenizer.from_dir(str(chatml_tok_dir), template="llama")
    # A folder without tokenizer_config.json: the vocab decides.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((chatml_tok_dir / "tokenizer.json").read_bytes())
    assert ChatTokenizer.from_dir(str(bare)).template == "chatml"
    assert ChatTokenizer.from_dir(str(tok_dir)).template == "minimind2"
    objs = [{"conversations": CORPUS[4]["messages"], "tools": [CALC]}]
    path = ref.write_jsonl(tmp_path / "c.jsonl", objs)
    run = [sys.executable, "-m", "spongebob", "data", "check", str(path), "--json"]
    out = subprocess.run([*run, "--tokenizer", str(chatml_tok_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["files"][0]["records"] == 1
    minimind2 = [*run, "--tokenizer", str(tok_dir), "--template", "minimind2"]
    out = subprocess.run(minimind2, capture_output=True, text=True)
    assert out.returncode == 1 and "use --template chatml" in out.stdout


# --- generation side -----------------------------------------------------------------------


def test_chatml_pretraining_documents_are_framed_by_im_start_and_im_end(chatml_tok):
    body = list(chatml_tok.encode("你好 world"))
    for text in ("你好 world", "<|im_start|>你好 world<|im_end|>"):
        assert list(chatml_tok.encode_document(text)) == [1, *body, 2]


def test_stop_ids_are_the_family_s(chatml_tok, chat_tok):
    from spongebob.generate import Generator, SamplingConfig

    class Cfg:
        vocab_size = 10

    class M:
        config = Cfg()

    assert Generator(M(), chatml_tok)._stop_ids(SamplingConfig()) == [2, 0]
    assert Generator(M(), chat_tok)._stop_ids(SamplingConfig()) == [chat_tok.eos_id]
    assert chat_tok.stop_ids == [chat_tok.eos_id]
    assert Generator(M(), chatml_tok)._stop_ids(SamplingConfig(stop_ids=[7])) == [7]


def test_parse_reasoning_reads_both_families():
    from spongebob.generate import parse_reasoning

    r = parse_reasoning("<think>\n想一想\n</think>\n\n答案", "chatml")
    assert (r.think, r.answer, r.well_formed) == ("想一想", "答案", True)
    r = parse_reasoning("想一想\n</think>\n\n答案", "chatml")  # <think> ended the prompt
    assert (r.think, r.answer, r.well_formed) == ("想一想", "答案", True)
    r = parse_reasoning("\n\n</think>\n\n直接回答", "chatml")
    assert (r.think, r.answer, r.well_formed) == ("", "直接回答", True)
    assert not parse_reasoning("a</think>b</think>c", "chatml").well_formed
    assert not parse_reasoning("x <think>a</think>b", "chatml").well_formed
    assert not parse_reasoning("<think>a</think><answer>b</answer>", "chatml").well_formed
    r = parse_reasoning("<think>still thinking", "chatml")
    assert (r.think, r.answer, r.well_formed) == ("still thinking", "", False)
    r = parse_reasoning("no tags", "chatml")
    assert (r.think, r.answer, r.well_formed) == ("", "no tags", False)
    # minimind2 unchanged: a think block without answer tags is not well formed.
    r = parse_reasoning("<think>\nx\n</think>\n<answer>\ny\n</answer>")
    assert (r.think, r.answer, r.well_formed) == ("x", "y", True)
    assert not parse_reasoning("<think>3</think> 3").well_formed
    with pytest.raises(ValueError, match="unknown template"):
        parse_reasoning("x", "llama")


def test_generated_tool_calls_are_parsed_into_name_and_arguments(chatml_tok):
    from spongebob.generate import ToolCallError, parse_tool_call, parse_tool_calls

    # What the template renders for a call is what the parser reads back.
    msgs = CORPUS[3]["messages"][:3]
    rendered = chatml_tok.render(msgs, tools=CORPUS[3]["tools"])
    reply = rendered.rsplit("</think>\n\n", 1)[1].removesuffix("<|im_end|>\n")
    got = parse_tool_calls(reply)
    assert got.content == "我查一下。"
    assert [(c.name, c.arguments) for c in got.calls] == [
        ("get_weather", {"city": "北京", "days": 2}),
        ("get_weather", {"city": "Paris"}),
    ]
    block = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>'
    assert parse_tool_call(block).arguments == {"a": 1}
    assert parse_tool_call('{"function": {"name": "f"}}').arguments == {}
    assert parse_tool_calls("plain").calls == []
    unclosed = parse_tool_calls('ok <tool_call>\n{"name": "f", "arguments": {}}')
    assert (unclosed.content, unclosed.calls[0].name) == ("ok", "f")
    for bad, words in [
        ("<tool_call>\n{oops}\n</tool_call>", "not valid JSON"),
        ("<tool_call>[1]</tool_call>", "JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', "no function name"),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "must be a JSON object"),
        ('<tool_call>{"name": "f", "arguments": "{x"}</tool_call>', "arguments are not valid JSON"),
    ]:
        with pytest.raises(ToolCallError, match=words):
            parse_tool_calls(bad)


# --- MiniMind's own files (only where given) -------------------------------------------------

MINIMIND_DIR = os.environ.get("SPONGEBOB_MINIMIND_DIR")


@pytest.mark.skipif(not MINIMIND_DIR, reason="SPONGEBOB_MINIMIND_DIR (MiniMind's model/) not set")
@pytest.mark.parametrize("gen", [False, True])
def test_chatml_equals_minimind_s_template_and_tokenizer(gen):
    import transformers

    from spongebob.data import ChatTokenizer

    d = Path(MINIMIND_DIR)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    tok = ChatTokenizer.from_dir(str(d))  # found as chatml from its tokenizer_config.json
    assert tok.template == "chatml"
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == tuple(CHATML_TOKENS[:3])
    for case in _cases(gen):
        expected = _hf_render(hf, case, gen)  # MiniMind's own Jinja
        ours = _hf_render(hf, case, gen, chat_template=tok.chat_template)
        assert ours == expected, case
        assert tok.render(case["messages"], gen, tools=case.get("tools")) == expected
        hf_ids = hf(expected, add_special_tokens=False)["input_ids"]
        if gen:
            ids = tok.encode_prompt(case["messages"], tools=case.get("tools"))
        else:
            ids, _ = tok.encode_conversation(case["messages"], tools=case.get("tools"))
        assert list(ids) == hf_ids, case


def test_sft_trains_minimind3_records_and_the_family_follows_the_checkpoint(
    tmp_path, chatml_tok_dir
):
    """MiniMind-3 SFT records (reasoning_content, tools, tool_calls, tool turns) train with a
    chatml tokenizer folder that has no tokenizer_config.json (the family comes from
    `--template chatml`); the checkpoint then carries the chatml template, so the next stage,
    chat and export use it without being told."""
    import shutil

    from spongebob import checkpoint
    from spongebob.config import stage_config
    from spongebob.export import export_hf
    from spongebob.train import train

    bare = tmp_path / "tok"
    bare.mkdir()
    shutil.copy(chatml_tok_dir / "tokenizer.json", bare / "tokenizer.json")
    data = ref.write_jsonl(
        tmp_path / "sft.jsonl",
        [{"conversations": c["messages"], "tools": c.get("tools")} for c in CORPUS] * 4,
    )
    common = dict(data=[str(data)], out=str(tmp_path / "run"), preset="tiny", seq_len=256,
                  batch_size=2, accum=1, max_steps=2, device="cpu", progress=False,
                  kernels="torch", attention="sdpa")  # fmt: skip
    train(stage_config("sft", tokenizer=str(bare), template="chatml", init="none", **common))
    loaded = checkpoint.load(tmp_path / "run" / "sft", "cpu")
    assert loaded.tokenizer.template == "chatml"
    stops = {loaded.tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert set(loaded.tokenizer.stop_ids) == stops
    train(stage_config("sft-long", **{**common, "max_steps": 1}))  # from sft, no flags
    assert checkpoint.load(tmp_path / "run" / "sft-long", "cpu").tokenizer.template == "chatml"
    hf = export_hf(tmp_path / "run" / "sft-long", tmp_path / "hf")
    assert "<|im_start|>" in json.loads((hf / "tokenizer_config.json").read_text())["chat_template"]
