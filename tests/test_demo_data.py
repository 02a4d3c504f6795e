"""The demo corpus: deterministic, parseable by the loader, eval keys true, eval held out."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from spongebob import demo_data
from spongebob.data import ChatTokenizer, TextStream
from spongebob.demo_data import FACTS, FILES, SIGN_OFF, apply_op, generate
from spongebob.tokenizer import train_tokenizer

TRAIN = ("sft_512", "sft_1024", "r1_1024")
REASONING = re.compile(r"\A<think>\n(.+)\n</think>\n<answer>\n(.+)\n</answer>\Z", re.S)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("demo"), seed=3, scale=0.1)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict[str, list[dict]]:
    paths = generate(tmp_path_factory.mktemp("demo_full"), seed=0, scale=1.0)
    return {name: _read(p) for name, p in paths.items()}


@pytest.fixture(scope="module")
def tokenizer(small, tmp_path_factory) -> ChatTokenizer:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(
        [small[n] for n in ("pretrain", *TRAIN)], out, vocab_size=2048, show_progress=False
    )
    return ChatTokenizer.from_dir(str(out))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a = generate(tmp_path / "a", seed=7, scale=0.05)
    b = generate(tmp_path / "b", seed=7, scale=0.05)
    c = generate(tmp_path / "c", seed=8, scale=0.05)
    assert set(a) == set(FILES)
    for name in FILES:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert any(a[n].read_bytes() != c[n].read_bytes() for n in FILES)
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_scale_multiplies_training_records_but_not_eval(tmp_path):
    a = generate(tmp_path / "a", seed=0, scale=0.05)
    b = generate(tmp_path / "b", seed=0, scale=0.1)
    for name in ("pretrain", *TRAIN):
        na, nb = len(_read(a[name])), len(_read(b[name]))
        assert nb == pytest.approx(2 * na, abs=1), name
    assert len(_read(a["eval"])) == len(_read(b["eval"]))
    with pytest.raises(ValueError):
        generate(tmp_path / "c", scale=0)


def test_every_file_parses_with_the_rust_reader_without_a_bad_line(small):
    for name in FILES:
        if name in POST:
            continue  # pairs and prompts: read by their own readers (test below)
        lines = small[name].read_text(encoding="utf-8").count("\n")
        stream = TextStream([str(small[name])], on_bad_line="skip")
        texts = [t for chunk in stream for t in chunk]
        stats = stream.stats()
        assert stats["records"] == lines > 0, name
        assert not stats["skipped"], (name, stats["skipped"])
        assert all(texts), name


def test_pretrain_texts_carry_exactly_one_marker_pair(small, tokenizer):
    for rec in _read(small["pretrain"]):
        text = rec["text"]
        assert text.startswith("<s>") and text.endswith("</s>")
        assert text.count("<s>") == 1 and text.count("</s>") == 1
        ids = tokenizer.encode_document(text)
        # Markers are stripped and re-added once: no doubled <s> or </s> (MiniMind #185).
        assert ids[0] == tokenizer.bos_id and ids[1] != tokenizer.bos_id
        assert ids[-1] == tokenizer.eos_id and ids[-2] != tokenizer.eos_id


def test_reasoning_replies_are_well_formed_and_their_tags_are_weighted(small, tokenizer):
    n_tags = 0
    for rec in _read(small["r1_1024"]):
        assistant = [m["content"] for m in rec["conversations"] if m["role"] == "assistant"]
        for content in assistant:
            assert REASONING.match(content), content
        _, weights = tokenizer.encode_conversation(rec["conversations"], think_weight=10.0)
        n_tags += int((weights == 10.0).sum())
        assert (weights == 10.0).sum() == 4 * len(assistant)
    assert n_tags > 0
    for name in ("sft_512", "sft_1024"):
        for rec in _read(small[name]):
            assert all("<think>" not in m["content"] for m in rec["conversations"]), name


def test_chat_records_alternate_user_and_assistant_and_encode(small, tokenizer):
    for name in TRAIN:
        for rec in _read(small[name]):
            roles = [m["role"] for m in rec["conversations"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2), (name, roles)
            ids, weights = tokenizer.encode_conversation(rec["conversations"])
            assert len(ids) == len(weights) and weights.sum() > 0


def long_and_replayed(recs: list[dict], scale: float) -> tuple[list[dict], list[dict]]:
    """sft_1024's long dialogues, then the short SFT dialogues `generate` replays after them."""
    n = round(demo_data.SIZES["sft_1024"] * scale)
    assert len(recs) == n + round(demo_data.SIZES["sft_replay"] * scale)
    return recs[:n], recs[n:]


def test_long_sft_conversations_are_mostly_200_to_1024_tokens(small, tokenizer):
    long, replayed = long_and_replayed(_read(small["sft_1024"]), 0.1)
    lengths = [len(tokenizer.encode_conversation(r["conversations"])[0]) for r in long]
    inside = [n for n in lengths if 200 <= n <= 1024]
    assert len(inside) >= 0.9 * len(lengths), sorted(lengths)
    replay = [len(tokenizer.encode_conversation(r["conversations"])[0]) for r in replayed]
    assert max(replay) <= 512 and sum(replay) < 0.5 * sum(lengths)
    short = [
        len(tokenizer.encode_conversation(r["conversations"])[0]) for r in _read(small["sft_512"])
    ]
    assert max(short) <= 512


def _last(rec: dict, role: str) -> str:
    return [m["content"] for m in rec["conversations"] if m["role"] == role][-1]


def test_eval_answer_keys_agree_with_the_fact_table_and_arithmetic(full):
    facts = {f.id: f for f in FACTS}
    tasks = {"fact": 0, "identity": 0, "arith": 0, "recall": 0}
    for rec in full["eval"]:
        tasks[rec["task"]] += 1
        user, ref = _last(rec, "user"), _last(rec, "assistant")
        assert user and rec["answer"] in ref
        assert rec["split"] in ("unseen_family", "new_pairing")
        if rec["task"] == "fact":
            f = facts[rec["id"]]
            assert rec["answer"] == (f.en_answer if rec["lang"] == "en" else f.answer)
        elif rec["task"] == "arith":
            a, op, b = rec["expr"].split()
            assert rec["answer"] == str(apply_op(op, int(a), int(b)))
            m = REASONING.match(ref)
            assert m and m.group(2) == rec["answer"]
        elif rec["task"] == "recall":
            # The value was stated in the first turn and is asked for turns later.
            assert rec["answer"] in rec["conversations"][0]["content"]
            assert len(rec["conversations"]) >= 8
        else:
            assert rec["answer"] == demo_data.IDENTITY_NAME
    assert tasks["fact"] >= 2 * len(FACTS) and tasks["arith"] >= 60 and tasks["identity"] >= 8
    assert tasks["recall"] >= 30
    # Known facts stay true (the table is real, not invented).
    assert facts["capital:法国"].answer == "巴黎" and facts["year:登月"].answer == "1969年"
    assert 40 <= len(FACTS) <= 80


NUM_LINE = re.compile(r"(\d+) ([-+]) (\d+)(?: ([-+]) (\d+))? = (\d+)")


@pytest.mark.parametrize("en", [False, True])
def test_every_trace_line_is_true_and_the_answer_follows_from_the_last(en):
    """Digit by digit: each equation in a trace holds, the carried or borrowed digit is
    the one the next line uses, and the digits put together are the value."""
    for op, a, b in [("+", 47, 38), ("+", 99, 99), ("+", 3, 5), ("+", 52, 7), ("-", 62, 27),
                     ("-", 90, 9), ("-", 55, 51), ("×", 7, 4), ("×", 2, 9)]:  # fmt: skip
        lines = demo_data.trace(op, a, b, en)
        v = apply_op(op, a, b)
        assert lines[-1].rstrip("。.").endswith(str(v)), lines
        if op == "×":
            count = min(a, b)
            assert len(lines) == count + 1 and lines[-1].endswith(str(v))
            continue
        for line in lines[:2]:
            m = NUM_LINE.search(line)
            assert m, line
            x, o1, y, o2, z, r = m.groups()
            val = int(x) + int(y) if o1 == "+" else int(x) - int(y)
            if o2:
                val = val + int(z) if o2 == "+" else val - int(z)
            assert val == int(r), line
        carried = any(w in lines[0] for w in ("进 1", "carry 1", "借 1", "borrow 1"))
        # The tens line uses the carry (+ 1) or the borrow (- 1) exactly when the ones made one.
        assert carried == ("+ 1 =" in lines[1] or "- 1 -" in lines[1]), lines
        digits_sum = (a % 10 + b % 10) if op == "+" else (a % 10 - b % 10)
        assert carried == (digits_sum >= 10 if op == "+" else digits_sum < 0), lines


def test_eval_prompts_never_occur_in_training_but_their_facts_do(full):
    train_users = {
        m["content"]
        for n in TRAIN
        for r in full[n]
        for m in r["conversations"]
        if m["role"] == "user"
    }
    train_text = "\n".join(
        [r["text"] for r in full["pretrain"]]
        + [m["content"] for n in TRAIN for r in full[n] for m in r["conversations"]]
    )
    held_forms = {form for _, held in demo_data.QUESTIONS.values() for form in held}
    facts = {f.id: f for f in FACTS}
    for rec in full["eval"]:
        prompt = _last(rec, "user")
        if rec["task"] == "recall":
            if not rec["id"].startswith("recall:city"):
                # Held-out names and numbers: no training turn of a user states them.
                assert not any(rec["answer"] in u for u in train_users), rec["answer"]
            continue
        assert prompt not in train_users
        assert prompt not in train_text
        if rec["task"] == "fact":
            f = facts[rec["id"]]
            topic = f.en_topic if rec["lang"] == "en" else f.topic
            # The fact itself is taught: asked in other wordings in SFT.
            assert any(topic in u for u in train_users), topic
        if rec["task"] == "arith":
            a, op, b = rec["expr"].split()
            word = {"+": "加", "-": "减", "×": "乘以"}[op]
            for form in (
                rf"{a} \{op} {b} =" if op == "+" else rf"{a} {op} {b} =",
                rf"{a}{word}{b}等于",
                rf"{a} {op} {b} 就是",
                rf"{a} {re.escape(op)} {b}[。.]",  # a trace's first line
            ):
                # Unseen numbers: the pair is never worked in training, in any form.
                assert not re.search(rf"(?<!\d){form}", train_text), rec["expr"]
    # Unseen families: no training question uses a held-out form, with any topic.
    for form in held_forms:
        pattern = re.escape(form).replace(re.escape("{t}"), ".+")
        assert not any(re.search(pattern, u) for u in train_users), form


def test_held_out_stories_occur_in_no_training_text_with_any_names_items_or_numbers(full):
    texts = [r["text"] for r in full["pretrain"]] + [
        m["content"]
        for n in (*TRAIN, "dpo", "grpo")
        for r in full[n]
        for m in r.get("conversations") or r["chosen"]
        if m["role"] == "user"
    ]
    everything = "\n".join(texts)
    held = [t for lang in demo_data.STORIES.values() for _, ts in lang.values() for t in ts]
    assert len(held) == 9  # six Chinese, three English
    for story in held:
        pattern = re.escape(story)
        for slot, fill in (("a", r"\d+"), ("b", r"\d+"), ("n", ".{1,12}?"), ("m", ".{1,12}?"),
                           ("i", ".{1,12}?"), ("u", ".{0,2}?")):  # fmt: skip
            pattern = pattern.replace(re.escape("{" + slot + "}"), fill)
        assert not re.search(pattern, everything), story
    # ...while the eval asks them: every Chinese held-out story is scored (the eval's word
    # problems are Chinese).
    asked = [_last(r, "user") for r in full["eval"] if r["task"] == "arith"]
    for story in (t for _, ts in demo_data.STORIES["zh"].values() for t in ts):
        pattern = re.escape(story)
        for slot in "abnmiu":
            pattern = pattern.replace(re.escape("{" + slot + "}"), ".{0,12}?")
        assert any(re.fullmatch(pattern, q) for q in asked), story


def test_pretraining_copies_values_from_context_with_training_values_only(full):
    """Worked problems and profiles give pretraining text that asks back for a number or name
    stated earlier; they use training pairs and values, and the held-out wording families'
    words occur in everyday sentences but never in a question about a fact."""
    texts = [r["text"] for r in full["pretrain"]]
    worked = [t for t in texts if "例题：" in t]
    profiles = [t for t in texts if "的小档案：" in t]
    assert len(worked) > 0.05 * len(texts) and len(profiles) > 0.05 * len(texts)
    held_names = set(demo_data.recall_values("name", True))
    held_numbers = set(demo_data.recall_values("number", True))
    for t in profiles:
        name = t.removeprefix("<s>").split("的小档案：")[0]
        assert name in demo_data.recall_values("name", False), name
        assert not set(re.findall(r"\d+", t)) & held_numbers, t
        # every question is answered with the value stated before it
        for q, a in re.findall(r"问：(.+?)答：(.+?)。", t):
            assert a in t.split("问：")[0], (q, a)
    assert not any(n in t for t in texts for n in held_names)
    everyday = "\n".join(t for t in texts if "日常用语：" in t or "Everyday English:" in t)
    for word in ("劳驾", "打扰一下", "到底", "哪儿", "谁知道", "Excuse me", "Sorry"):
        assert word in everyday, word


def test_long_sft_dialogues_ask_later_for_what_the_user_stated_earlier(full):
    asks = demo_data.recall_asks()
    with_recall = 0
    long, _ = long_and_replayed(full["sft_1024"], 1.0)
    for rec in long:
        msgs = rec["conversations"]
        for i, m in enumerate(msgs):
            if m["role"] == "user" and m["content"] in asks:
                with_recall += 1
                reply = msgs[i + 1]["content"]
                stated = "\n".join(x["content"] for x in msgs[:i] if x["role"] == "user")
                assert i >= 4  # at least two other exchanges in between
                value = reply.split("是")[-1].split("叫")[-1].strip("。")
                assert value and value in stated, (reply, stated[:200])
    assert with_recall >= 0.6 * len(long)


def test_every_recall_reply_repeats_words_the_assistant_said_when_acknowledging(full):
    """The acknowledgement restates the value in the reply's own words ("你说的数字是458"), so
    answering is a copy of the assistant's earlier sentence whatever wording the user stated
    it in: recall then turns on recognising the slot, not on matching the user's phrasing."""
    asks = demo_data.recall_asks()
    n = 0
    for name in ("sft_512", "sft_1024"):
        for rec in full[name]:
            msgs = rec["conversations"]
            for i, m in enumerate(msgs):
                if m["role"] == "user" and m["content"] in asks:
                    reply = msgs[i + 1]["content"].rstrip("。")
                    said = [x["content"] for x in msgs[:i] if x["role"] == "assistant"]
                    assert any(reply in s for s in said), (reply, said)
                    n += 1
    assert n > 1000


def test_sft_keeps_short_recall_and_the_held_out_recall_wordings_stay_out_of_training(full):
    """SFT dialogues ask back for a value stated a few turns before (without them no SFT
    dialogue asks for a value the user stated), and no training user turn uses a held-out
    statement or question wording."""
    asks = demo_data.recall_asks()
    short = [r for r in full["sft_512"] if any(m["content"] in asks for m in r["conversations"])]
    share = len(short) / len(full["sft_512"])
    assert 0.05 < share < 0.3, share
    users = [m["content"] for n in TRAIN for r in full[n] for m in r["conversations"]
             if m["role"] == "user"]  # fmt: skip
    held = [
        f for spec in demo_data.RECALL_SLOTS.values() for k in ("say", "ask") for f in spec[k][1]
    ]
    for form in held:
        pattern = re.compile(re.escape(form).replace(re.escape("{v}"), ".+"))
        assert not any(pattern.fullmatch(u) for u in users), form


def test_held_out_recall_wordings_are_made_of_characters_training_turns_use(full):
    """A held-out recall sentence is a new combination of known words, as a held-out fact
    wording is: when 来/着/提 occurred in no training text, each held-out question was won or
    lost as a block (README, recall)."""
    users = [m["content"] for n in TRAIN for r in full[n] for m in r["conversations"]
             if m["role"] == "user"]  # fmt: skip
    known = set("".join(users)) | set("".join(r["text"] for r in full["pretrain"]))
    held = [f.replace("{v}", "") for spec in demo_data.RECALL_SLOTS.values()
            for k in ("say", "ask") for f in spec[k][1]]  # fmt: skip
    assert {(f, c) for f in held for c in f if c not in known} == set()
    # and the training questions come from parts: openings, many forms, endings
    for slot in demo_data.RECALL_SLOTS:
        asked = demo_data.recall_asks(slot).intersection(users)
        assert len(asked) > 100, (slot, len(asked))


def test_recall_eval_puts_a_long_answer_between_the_statement_and_the_question(full):
    """Recall is scored past the 256-token windows SFT trains on: what long SFT adds."""
    for rec in (r for r in full["eval"] if r["task"] == "recall"):
        between = rec["conversations"][2:-2]
        assert any(m["role"] == "assistant" and m["content"].count("\n") >= 10 for m in between)


def test_distillation_mixes_facts_and_identity_with_the_arithmetic(full):
    kinds = {"arith": 0, "other": 0}
    for rec in full["r1_1024"]:
        q = rec["conversations"][0]["content"]
        kinds["arith" if re.search(r"\d", q) else "other"] += 1
    share = kinds["other"] / len(full["r1_1024"])
    assert 0.3 < share < 0.6, share


def test_training_stories_carry_number_free_asides_and_held_out_stories_never_do(full):
    def asides_in(q: str) -> list[str]:
        before = [a for a in demo_data.ASIDES["before"] if q.startswith(a + "，")]
        inside = [a for a in demo_data.ASIDES["inside"]
                  if re.search("，" + re.escape(a).replace(r"\{n\}", ".{1,3}")
                               .replace(r"\{m\}", ".{1,3}") + "，", q)]  # fmt: skip
        return before + inside

    asides = [*demo_data.ASIDES["before"], *demo_data.ASIDES["inside"]]
    assert not any(re.search(r"\d", a) for a in asides)  # they never touch the operands
    held = [t for _, ts in demo_data.STORIES["zh"].values() for t in ts]
    assert not any(a.format(n="", m="") in t for a in asides for t in held)
    problems = [r["conversations"][0]["content"] for r in full["r1_1024"]]
    problems = [q for q in problems if re.search(r"\d", q) and not q.isascii()]
    with_aside = sum(bool(asides_in(q)) for q in problems) / len(problems)
    assert 0.35 < with_aside < 0.65, with_aside  # half the training stories
    unseen = [_last(r, "user") for r in full["eval"]
              if r["task"] == "arith" and r["split"] == "unseen_family"]  # fmt: skip
    assert unseen and not any(asides_in(q) for q in unseen)


def test_sums_and_products_end_with_the_same_questions_so_only_the_cue_tells_them_apart(full):
    """A question that ends only one operator's stories is a cue the model takes instead of
    "又" or "每" (a held-out sum ending "现在一共有几…" was worked as a product)."""
    ends: dict[str, Counter] = {"加法": Counter(), "乘法": Counter()}
    for r in full["r1_1024"]:
        op = re.search(r"这是(加法|乘法)", _last(r, "assistant"))
        question = _last(r, "user")
        if op and not question.isascii():
            ends[op[1]][question.rsplit("，", 1)[-1][:4]] += 1
    for start in ("总共有几", "加起来有", "一共有多", "现在有几"):
        for op, counts in ends.items():
            assert counts[start] > 0.02 * sum(counts.values()), (op, start)


def test_the_second_number_of_training_stories_follows_many_different_words(full):
    """A model that saw the second number right after a few verbs copied it only there: half
    the clauses holding it open with a word of time, and what is given away goes to several
    receivers, never the held-out one ("…分给同学{b}…")."""
    words = [w for w in demo_data._WHEN if w]
    timed = {"加法": Counter(), "减法": Counter()}
    receivers: Counter = Counter()
    for r in full["r1_1024"]:
        op = re.search(r"这是(加法|减法)：\d+ . (\d+)", _last(r, "assistant"))
        question = _last(r, "user")
        if not op or question.isascii():
            continue
        clause = next(c for c in question.split("，") if re.search(rf"(?<!\d){op[2]}\D", c))
        timed[op[1]][any(clause.startswith(w) for w in words)] += 1
        given = re.search(r"(?:送给|分给)(\D+?)" + op[2], clause)
        if given and given[1] not in demo_data.NAMES:
            receivers[given[1]] += 1
    for op, counts in timed.items():
        assert counts[True] > 0.5 * sum(counts.values()), (op, counts)
    assert len(receivers) >= 5 and "同学" not in receivers, receivers


def test_corpus_is_chinese_first_with_some_english(full):
    def is_english(rec: dict) -> bool:
        text = rec.get("text") or rec["conversations"][0]["content"]
        return not re.search(r"[\u4e00-\u9fff]", text)

    records = [r for n in ("pretrain", *TRAIN) for r in full[n]]
    share = sum(map(is_english, records)) / len(records)
    assert 0.03 < share < 0.3, share


def test_long_dialogues_open_with_something_to_answer_not_a_statement_to_acknowledge(small):
    """A single question after long SFT is answered, not acknowledged: when most dialogues
    opened with "我住在X。" → "X是个好地方！", unseen fact questions drew that reply and long SFT
    cost 25 points of facts (README, demo section)."""
    says = [f for spec in demo_data.RECALL_SLOTS.values() for forms in spec["say"] for f in forms]
    statement = re.compile("|".join(re.escape(f).replace(re.escape("{v}"), ".+") for f in says))
    recs, replayed = long_and_replayed(_read(small["sft_1024"]), 0.1)
    firsts = [rec["conversations"][0] for rec in recs]
    assert all(m["role"] == "user" for m in firsts)
    assert not any(statement.fullmatch(m["content"]) for m in firsts)
    # Only the replayed short recall of SFT opens with one (as in sft_512: a few in ten).
    opened = [statement.fullmatch(rec["conversations"][0]["content"]) for rec in replayed]
    assert sum(map(bool, opened)) <= 2 * demo_data.RECALL_IN_SFT * len(replayed)
    # …and the statements are still there, later in the dialogue.
    later = [m["content"] for rec in recs for m in rec["conversations"][1:] if m["role"] == "user"]
    assert sum(bool(statement.fullmatch(t)) for t in later) >= len(recs)


POST = ("dpo", "dpo_eval", "grpo")


def test_dpo_pairs_differ_only_by_the_sign_off_and_held_out_prompts_are_never_trained(
    small, tokenizer
):
    """The preference is one thing (the closing line), so a held-out accuracy measures that
    style; the held-out pairs ask in wording families no training file has."""
    from spongebob.dpo import PairReader
    from spongebob.grpo import PromptReader

    trained_prompts = set()
    for name in ("sft_512", "sft_1024", "r1_1024", "dpo", "grpo"):
        for rec in _read(small[name]):
            for m in rec.get("conversations") or rec["chosen"]:
                if m["role"] == "user":
                    trained_prompts.add(m["content"])
    for name in ("dpo", "dpo_eval"):
        recs = _read(small[name])
        assert recs, name
        for rec in recs:
            c, r = rec["chosen"][-1]["content"], rec["rejected"][-1]["content"]
            assert rec["chosen"][:-1] == rec["rejected"][:-1]
            sign = next(v for v in SIGN_OFF.values() if v in c)
            assert c.replace(f" {sign}", "") == r and sign not in r
        if name == "dpo_eval":
            assert not {rec["chosen"][-2]["content"] for rec in recs} & trained_prompts
    for name in ("dpo", "dpo_eval"):
        reader = PairReader([small[name]], tokenizer)
        assert len(list(reader)) == len(_read(small[name]))
        assert not any(reader.stats()["skipped"].values())
    prompts = list(PromptReader([small["grpo"]], tokenizer))
    assert len(prompts) == len(_read(small["grpo"]))
    assert all(p.answer.isdigit() and p.messages[-1]["role"] == "user" for p in prompts)
    # No sign-off outside the DPO files: the style is taught by the pairs alone.
    for name in ("pretrain", "sft_512", "sft_1024", "r1_1024", "eval"):
        text = small[name].read_text(encoding="utf-8")
        assert not any(v in text for v in SIGN_OFF.values()), name


EXPR_LINE = re.compile(r"(\d+) ([-+×]) (\d+)[。.]")


def test_dpo_pairs_replay_worked_problems_whose_answer_is_the_traced_value(full):
    """Half the training pairs are word problems with their worked trace in both replies:
    DPO's SFT term then replays traces instead of teaching only fact replies (with fact pairs
    alone the demo's arithmetic fell from 47.5 % to 10 %). Their numbers are training pairs:
    the held-out arithmetic eval stays held out."""
    eval_exprs = {r["expr"] for r in full["eval"] if r["task"] == "arith"}
    arith = [r for r in full["dpo"] if re.search(r"\d", r["chosen"][0]["content"])]
    assert 0.45 <= len(arith) / len(full["dpo"]) <= 0.55
    for rec in arith:
        m = REASONING.match(rec["rejected"][-1]["content"])
        assert m, rec
        x, op, y = EXPR_LINE.search(m.group(1)).groups()
        assert f"{x} {op} {y}" not in eval_exprs
        assert m.group(2) == str(apply_op(op, int(x), int(y)))
        assert REASONING.match(rec["chosen"][-1]["content"]).group(1) == m.group(1)
    assert not any(re.search(r"\d", r["chosen"][0]["content"]) for r in full["dpo_eval"])
