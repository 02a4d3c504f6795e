"""Issue 7: the bounded-memory tokenizer trainer (`spongebob tokenizer train`, the default).

On a small Chinese-heavy corpus whose plain training would need more than the cap: the peak
RSS of the CLI process stays under `--max-memory`, the result round-trips every line, has the
specials at 0..6 and loads in HF `tokenizers` and `transformers`. When the corpus fits the
budget, the bounded trainer's output is the plain trainer's, byte for byte.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SPECIALS = ["<unk>", "<s>", "</s>", "<think>", "</think>", "<answer>", "</answer>"]
CAP_MB = 300


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "spongebob"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("spongebob")
    return [found] if found else [sys.executable, "-m", "spongebob"]


# The CLI's `main`, then the process's own peak RSS (VmHWM is per address space, unlike a
# child's ru_maxrss, which also counts the forking parent's pages).
_MEASURED = (
    "import sys\n"
    "from spongebob.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]\n"
    "print(f'VmHWM_kB {hwm}', file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def run_measured(*args, timeout: float = 120) -> tuple[int, str, float]:
    """Run `spongebob ARGS...`; return (exit code, stderr, the process's peak RSS in MB)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to measure peak RSS")
    res = subprocess.run(
        [sys.executable, "-c", _MEASURED, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = res.stderr.splitlines()
    peak = [float(ln.split()[1]) / 1024 for ln in lines if ln.startswith("VmHWM_kB ")]
    return res.returncode, res.stderr, peak[0] if peak else float("nan")


def _hanzi() -> list[str]:
    out = []
    for hi in range(0xB0, 0xD8):  # GB2312 level 1: the 3755 common characters
        for lo in range(0xA1, 0xFF):
            try:
                out.append(bytes([hi, lo]).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    return out


EN = "the model data token memory train corpus system user answer value python rust".split()


def _clause(rng: random.Random, chars: list[str], cum: list[float]) -> str:
    s = "".join(rng.choices(chars, cum_weights=cum, k=rng.randint(2, 16)))
    r = rng.random()
    if r < 0.1:
        s += f" {rng.choice(EN)} {rng.randint(0, 99999)}"
    elif r < 0.13:
        s += rng.choice(["😀", "<s>", "</s>", "<think>", "\t", "  ", "\n"])
    return s


def write_corpus(path: Path, size_mb: float, seed: int) -> list[str]:
    """Chinese-heavy pretrain + chat jsonl; returns every text in it (as trained on)."""
    rng = random.Random(seed)
    chars = _hanzi()
    rng.shuffle(chars)
    weights, total = [], 0.0
    for r in range(len(chars)):
        total += 1.0 / (r + 10)
        weights.append(total)
    texts, size = [], 0
    with path.open("w", encoding="utf-8") as f:
        while size < size_mb * 1e6:
            para = "".join(
                _clause(rng, chars, weights) + rng.choice("，，。！？；、")
                for _ in range(rng.randint(2, 30))
            )
            if rng.random() < 0.7:
                obj = {"text": f"<s>{para}</s>"}
                texts.append(para)
            else:
                q = _clause(rng, chars, weights) + "？"
                obj = {
                    "conversations": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": para},
                    ]
                }
                texts += [q, para]
            line = json.dumps(obj, ensure_ascii=rng.random() < 0.1) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("bounded")
    path = d / "corpus.jsonl"
    return path, write_corpus(path, 5.0, seed=7)


@pytest.fixture(scope="module")
def capped(corpus, tmp_path_factory) -> tuple[Path, str, float]:
    out = tmp_path_factory.mktemp("capped_tok")
    rc, err, peak = run_measured(
        "tokenizer", "train", "--data", corpus[0], "--vocab-size", 2000,
        "--out", out, "--max-memory", f"{CAP_MB}MB",
    )  # fmt: skip
    assert rc == 0, err
    return out, err, peak


def test_peak_memory_stays_under_the_cap_on_a_corpus_that_needs_more(capped):
    _, err, peak = capped
    print(f"peak RSS {peak:.0f} MB (cap {CAP_MB} MB)\n{err}")
    assert peak <= CAP_MB, f"peak RSS {peak:.0f} MB > cap {CAP_MB} MB\n{err}"
    # The cap did bind: the count table was pruned. (The plain trainer's peak on this corpus,
    # 4.2 MB of text, measured 480 MB.)
    assert "rare pieces cut" in err, err


def test_capped_tokenizer_round_trips_every_line(capped, corpus):
    from spongebob.tokenizer import load

    tok = load(capped[0])
    for text in corpus[1]:
        ids = tok.encode(text)
        assert tok.decode(ids.tolist()) == text


def test_capped_tokenizer_has_specials_and_loads_in_hf_and_transformers(capped, corpus):
    from tokenizers import Tokenizer

    out = capped[0]
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 2000
    for i, t in enumerate(SPECIALS):
        assert tok.token_to_id(t) == i
    sample = corpus[1][:200]
    for text in sample:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    # Characters get merged (a Hanzi is 3 byte tokens unmerged; 2000 tokens can't hold all
    # 3755 of them, so about one token a character).
    chars = sum(len(t) for t in sample)
    tokens = sum(len(tok.encode(t).ids) for t in sample)
    assert chars / tokens > 0.8

    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf.convert_tokens_to_ids(SPECIALS) == list(range(7))
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    rendered = hf.apply_chat_template(msgs, tokenize=False)
    assert rendered.endswith("<s>user\n你好</s>\n<s>assistant\n你好！</s>\n")


def test_bounded_equals_plain_when_the_corpus_fits(train_corpus, tmp_path):
    from spongebob.tokenizer import train_tokenizer

    plain = train_tokenizer(
        train_corpus, tmp_path / "plain", vocab_size=800, show_progress=False, trainer="plain"
    )
    bounded = train_tokenizer(train_corpus, tmp_path / "bounded", vocab_size=800)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (plain / name).read_bytes() == (bounded / name).read_bytes(), name


def test_capped_training_is_reproducible_across_thread_counts(corpus, capped, tmp_path):
    out = tmp_path / "t1"
    rc, err, peak = run_measured(
        "tokenizer", "train", "--data", corpus[0], "--vocab-size", 2000,
        "--out", out, "--max-memory", f"{CAP_MB}MB", "--threads", 1,
    )  # fmt: skip
    assert rc == 0, err
    assert peak <= CAP_MB
    assert (out / "tokenizer.json").read_bytes() == (capped[0] / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-memory", "10MB"], "too small"),
        (["--max-memory", "lots"], "bad memory size"),
        (["--trainer", "nope"], "invalid choice"),
    ],
)
def test_bad_trainer_flags_fail_with_one_line(tmp_path, flags, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "你好 world"}\n', encoding="utf-8")
    res = subprocess.run(
        [*_cli(), "tokenizer", "train", "--data", str(data), "--out", str(tmp_path / "o"), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert message in res.stderr, res.stderr
    assert not (tmp_path / "o" / "tokenizer.json").exists()
