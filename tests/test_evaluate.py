"""`spongebob eval`: perplexity over exactly the trained tokens, answer scoring, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from spongebob.errors import UserError
from spongebob.evaluate import (
    answer_accuracy,
    contains,
    perplexity,
    read_records,
    score_reply,
)

CHATS = [
    {
        "conversations": [
            {"role": "user", "content": "法国的首都是哪里？"},
            {"role": "assistant", "content": "法国的首都是巴黎。"},
        ]
    },
    {
        "conversations": [
            {"role": "system", "content": "简短回答。"},
            {"role": "user", "content": "1 + 2 = ?"},
            {
                "role": "assistant",
                "content": "<think>\n1 + 2 = 3\n</think>\n<answer>\n3\n</answer>",
            },
            {"role": "user", "content": "谢谢"},
            {"role": "assistant", "content": "不客气！"},
        ]
    },
]
TEXTS = [{"text": "<s>巴黎是法国的首都。</s>"}, {"text": "Water boils at 100 degrees."}]


def _manual_nll(model, ids, trained) -> tuple[float, int]:
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0]
    ce = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    keep = torch.tensor(trained[1:])
    return float(ce[keep].sum()), int(keep.sum())


def _jsonl(path, records) -> object:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def test_perplexity_counts_only_the_tokens_the_loss_trains(chat_tok, tmp_path):
    from test_generate import tiny_model

    model = tiny_model(seed=2, sharpen=1.0)
    nll = n = 0
    for rec in CHATS:
        ids, w = chat_tok.encode_conversation(rec["conversations"])
        a, b = _manual_nll(model, [int(i) for i in ids], [bool(x > 0) for x in w])
        nll, n = nll + a, n + b
    got = perplexity(model, chat_tok, _jsonl(tmp_path / "chat.jsonl", CHATS), seq_len=200)
    assert got["kind"] == "chat" and got["records"] == 2
    assert got["tokens"] == n
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    # The prompt is not scored: fewer tokens than the whole conversation.
    whole = sum(len(chat_tok.encode_conversation(r["conversations"])[0]) - 1 for r in CHATS)
    assert n < whole
    # Packing several conversations per row, or one per row, changes nothing.
    one_per_row = perplexity(model, chat_tok, tmp_path / "chat.jsonl", seq_len=200, batch_size=1)
    assert one_per_row["loss"] == pytest.approx(got["loss"], rel=1e-5)


def test_text_perplexity_scores_every_token_after_each_documents_start(chat_tok, tmp_path):
    from test_generate import tiny_model

    model = tiny_model(seed=2, sharpen=1.0)
    docs = [[int(i) for i in chat_tok.encode_document(r["text"])] for r in TEXTS]
    nll = n = 0
    for ids in docs:
        a, b = _manual_nll(model, ids, [False] + [True] * (len(ids) - 1))
        nll, n = nll + a, n + b
    # One row of exactly all the tokens: the stream drops no tail.
    seq_len = sum(len(d) for d in docs) - 1
    got = perplexity(model, chat_tok, _jsonl(tmp_path / "text.jsonl", TEXTS), seq_len=seq_len)
    assert got["kind"] == "text" and got["tokens"] == n
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)


def test_bits_per_byte_divide_the_nats_by_the_utf8_bytes_of_the_scored_text(chat_tok, tmp_path):
    from spongebob.evaluate import token_byte_lengths
    from test_generate import tiny_model

    nbytes = token_byte_lengths(chat_tok)
    for text in ("巴黎是法国的首都。", "Water boils at 100 degrees.", "emoji 🤖 + tabs\t"):
        ids = chat_tok.encode(text)
        assert int(nbytes[torch.as_tensor(ids, dtype=torch.long)].sum()) == len(text.encode())
    assert nbytes[chat_tok.eos_id] == 0 and nbytes[chat_tok.bos_id] == 0
    model = tiny_model(seed=2, sharpen=1.0)
    got = perplexity(model, chat_tok, _jsonl(tmp_path / "chat.jsonl", CHATS), seq_len=200)
    replies = [m["content"] for r in CHATS for m in r["conversations"] if m["role"] == "assistant"]
    assert got["bytes"] == sum(len(c.encode()) for c in replies)  # each </s> counts 0 bytes
    assert got["bpb"] == pytest.approx(got["loss"] * got["tokens"] / (math.log(2) * got["bytes"]))


def test_long_records_are_cut_and_counted(chat_tok, tmp_path):
    from test_generate import tiny_model

    conv = [
        {"role": "user", "content": "写长一点"},
        {"role": "assistant", "content": "很长。" * 60},
    ]
    _, w = chat_tok.encode_conversation(conv)
    path = _jsonl(tmp_path / "long.jsonl", [{"conversations": conv}])
    got = perplexity(tiny_model(), chat_tok, path, seq_len=40)
    assert got["truncated"] == 1
    assert got["tokens"] == sum(1 for x in w[1:41] if x > 0)


def test_numbers_match_only_the_final_whole_number_and_text_case_insensitively():
    assert contains("答案是13。", "13")
    assert not contains("答案是130。", "13") and not contains("113", "13")
    # A trace that passes through the key but concludes otherwise does not count.
    assert not contains("13 + 5 = 18", "13") and contains("8 + 5 = 13", "13")
    assert contains("是-7。", "-7") and not contains("7 - 14 = -7，答：7", "-7")
    assert not contains("1.35", "1") and contains("3.5 + 1 = 4.5", "4.5")
    assert contains("The capital is PARIS.", "Paris")
    assert not contains("anything", "")


def test_reply_scores_exact_contains_and_reasoning_format():
    ok = "<think>\n2 + 1 = 3\n</think>\n<answer>\n3\n</answer>"
    s = score_reply(ok, "3", ok, reasoning=True)
    assert s == {"exact": True, "contains": True, "well_formed": True}
    s = score_reply("<think>3</think> 3", "3", ok, reasoning=True)
    assert s["well_formed"] is False and s["contains"] is True
    s = score_reply("<think>a</think><answer>1</answer><answer>3</answer>", "3", ok, True)
    assert s["well_formed"] is False  # a tag twice is not well formed
    # A full sentence equal to the reference reply is exact; the key inside it is contained.
    s = score_reply("法国的首都是巴黎。", "巴黎", "法国的首都是巴黎。", reasoning=False)
    assert s == {"exact": True, "contains": True}
    s = score_reply("巴黎", "巴黎", "法国的首都是巴黎。", reasoning=False)
    assert s["exact"]
    s = score_reply("是伦敦。", "巴黎", "法国的首都是巴黎。", reasoning=False)
    assert s == {"exact": False, "contains": False}


def test_answer_accuracy_scores_generated_replies_per_task(chat_tok):
    from test_generate import Scripted

    reply = "<think>\n1 + 2 = 3\n</think>\n<answer>\n3\n</answer>"
    script = [int(i) for i in chat_tok.encode(reply, allow_special=True)] + [chat_tok.eos_id]
    records = [
        (1, {**CHATS[0], "answer": "巴黎", "task": "fact"}),
        (
            2,
            {
                "conversations": [
                    {"role": "user", "content": "1 + 2 = ?"},
                    {"role": "assistant", "content": reply},
                ],
                "answer": "3",
                "task": "arith",
            },
        ),
        (
            3,
            {
                "conversations": [
                    {"role": "user", "content": "2 + 2 = ?"},
                    {"role": "assistant", "content": reply.replace("3", "4")},
                ],
                "answer": "4",
                "task": "arith",
            },
        ),
        (4, TEXTS[0]),  # no answer: not generated
    ]
    from spongebob.generate import SamplingConfig

    # One record per batch: the scripted model replays its script from the start each time.
    out = {}
    for rec in records:
        res = answer_accuracy(
            Scripted(script, chat_tok.vocab_size),
            chat_tok,
            [rec],
            SamplingConfig(max_new_tokens=64, temperature=0),
        )
        out.update({r["line"]: r for r in res["rows"]})
    assert set(out) == {1, 2, 3}
    assert all(r["reply"] == reply for r in out.values())
    assert out[2]["exact"] and out[2]["contains"] and out[2]["well_formed"]
    assert not out[3]["exact"] and not out[3]["contains"] and out[3]["well_formed"]
    assert not out[1]["contains"] and "well_formed" not in out[1]


def test_task_budgets_cap_each_tasks_replies_and_batches_never_mix_tasks(chat_tok):
    from spongebob.generate import SamplingConfig
    from test_generate import Scripted

    # A model that never stops: every reply runs to its batch's budget.
    (word,) = [int(i) for i in chat_tok.encode("好")]
    records = []
    for line in range(1, 8):
        task = "fact" if line % 2 else "arith"
        user = {"role": "user", "content": f"问题{line}"}
        rec = {"conversations": [user, {"role": "assistant", "content": "1"}], "answer": "1"}
        records.append((line, {**rec, "task": task}))
    res = answer_accuracy(
        Scripted([word], chat_tok.vocab_size),
        chat_tok,
        records,
        SamplingConfig(max_new_tokens=12, temperature=0),
        batch_size=16,
        task_tokens={"fact": 5, "recall": 50},
    )
    lengths = {r["line"]: len(r["reply"]) for r in res["rows"]}
    assert lengths == {line: 5 if line % 2 else 12 for line in range(1, 8)}


def test_bad_lines_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(TEXTS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: invalid JSON"):
        list(read_records(f))
    f.write_text('{"conversations": [{"role": "robot", "content": "x"}]}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:1: bad message"):
        list(read_records(f))
    f.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="empty file"):
        list(read_records(f))


def test_eval_cli_prints_a_table_and_writes_json(tmp_path, tok_dir):
    from spongebob.demo_data import generate
    from test_generate import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", tok_dir)
    data = generate(tmp_path / "demo", scale=0.01)
    out = tmp_path / "result.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "spongebob",
            "eval",
            "--ckpt",
            str(ckpt),
            "--data",
            str(data["eval"]),
            str(data["pretrain"]),
            "--limit",
            "12",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr
    assert "eval.jsonl" in res.stdout and "pretrain.jsonl" in res.stdout and "ppl" in res.stdout
    result = json.loads(out.read_text())
    ev = result["files"][str(data["eval"])]
    assert ev["answers"]["summary"]["all"]["n"] == 12
    assert ev["perplexity"]["tokens"] > 0 and ev["perplexity"]["ppl"] > 1
    assert "answers" not in result["files"][str(data["pretrain"])]

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "spongebob",
            "eval",
            "--ckpt",
            str(ckpt),
            "--data",
            str(bad),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "bad.jsonl:1" in res.stderr


def test_a_tool_reply_counts_when_it_calls_calc_with_an_expression_of_the_answer():
    from spongebob.evaluate import calls_tool_correctly

    call = '<tool_call>\n{{"name": "{n}", "arguments": {{"expr": "{e}"}}}}\n</tool_call>'
    assert calls_tool_correctly(call.format(n="calc", e="23*47"), "1081")
    assert calls_tool_correctly("ok " + call.format(n="calc", e="1081"), "1081")
    assert not calls_tool_correctly(call.format(n="calc", e="23*46"), "1081")  # wrong value
    assert not calls_tool_correctly(call.format(n="search", e="23*47"), "1081")  # wrong tool
    assert not calls_tool_correctly("23*47 = 1081", "1081")  # answered, did not call
    assert not calls_tool_correctly("<tool_call>{not json</tool_call>", "1081")
    assert not calls_tool_correctly(call.format(n="calc", e="import os"), "1081")
