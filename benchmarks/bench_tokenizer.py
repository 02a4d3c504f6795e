"""Tokenizer-training benchmark: the plain HF trainer against the bounded-memory trainer.

    python benchmarks/bench_tokenizer.py                          # 50, 100, 200 MB
    python benchmarks/bench_tokenizer.py --sizes 5 --max-memory 300MB     # quick smoke run

Generates one Chinese-heavy jsonl corpus (pretrain documents and chat records, in MiniMind's
formats) and uses prefixes of it for the sizes asked, so the distinct clauses grow with the
size as they do in real data. A held-out file is drawn from the same distribution (same
lexicon, another sampling seed). Each training runs in its own subprocess, so its peak RSS
(/proc VmHWM) is its own; compression (characters per token) is measured afterwards on the
held-out text. Prints a markdown table and writes JSON (machine, versions, date).

The generator: a character inventory of the whole CJK block ranked by a Zipf-exponential law
(top 100 ≈ 40 % of text, top 1000 ≈ 88 %, top 3500 ≈ 99 %, like modern Chinese), an 80 000-word
lexicon (1–4 characters) sampled by a Zipf law, person names, places and organisations, years,
dates, amounts and percentages, English words and sentences, and ~30 sentence templates with
free clauses of random words. Nearly every clause is new, so the number of distinct pre-tokens
grows almost linearly with the corpus (the case that makes byte-level BPE on Chinese expensive).
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import itertools
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "tokenizer.json"
LEXICON_SEED = 20240607

# --------------------------------------------------------------------------------------------
# corpus generation

_COMMON = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说"
    "产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使"
    "点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明"
    "看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料"
    "象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指"
    "几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶"
    "油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议"
    "声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影"
    "算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何"
)
_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡"
    "余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯"
    "龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
)
_SUFFIX_PLACE = ["市", "省", "县", "镇", "区", "村", "山", "河", "湖", "岛"]
_SUFFIX_ORG = ["公司", "大学", "研究所", "医院", "银行", "委员会", "协会", "中心", "学院", "集团"]
_UNITS = ["元", "个", "次", "人", "公里", "吨", "天", "小时", "分钟", "本", "件", "家"]
_EN_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their been has when who will "
    "more no if out so said what up its about into than them can only other new some could "
    "time these two may then do first any my now such like our over man me even most made "
    "after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three model "
    "data training learning neural network token language python rust loader batch system "
    "user assistant answer question however example result method function value memory "
    "corpus vocabulary compression benchmark server client request response error file "
    "version update release build test debug deploy cloud storage database query index search "
    "market price company product service customer design research science energy health "
    "policy history"
).split()
_PUNCT_END = "。。。。！？"


def _gb2312(hi_lo: int, hi_hi: int) -> list[str]:
    out = []
    for hi in range(hi_lo, hi_hi + 1):
        for lo in range(0xA1, 0xFF):
            try:
                ch = bytes([hi, lo]).decode("gb2312")
            except UnicodeDecodeError:
                continue
            if "\u4e00" <= ch <= "\u9fff":
                out.append(ch)
    return out


def _cjk_block() -> list[str]:
    return [chr(c) for c in range(0x4E00, 0x9FA6)]


def _zipf_cum(n: int, s: float, offset: float = 1.0) -> list[float]:
    cum, total = [], 0.0
    for r in range(n):
        total += (r + offset) ** -s
        cum.append(total)
    return cum


class ChineseCorpus:
    """Random Chinese-heavy text. `lexicon_seed` fixes the language; `seed` the sampling."""

    def __init__(self, seed: int, lexicon_seed: int = LEXICON_SEED):
        lex = random.Random(lexicon_seed)
        # Rank order: hand-picked common characters, then GB2312 level 1 (the 3755 common
        # ones), level 2, then the rest of the CJK block, each group shuffled.
        common = list(dict.fromkeys(_COMMON))
        seen = set(common)
        self.chars = list(common)
        for group in (_gb2312(0xB0, 0xD7), _gb2312(0xD8, 0xF7), _cjk_block()):
            group = [ch for ch in group if ch not in seen]
            seen.update(group)
            lex.shuffle(group)
            self.chars += group
        self.char_cum = list(
            itertools.accumulate(
                (r + 15) ** -0.8 * math.exp(-r / 1200) + 1e-7 for r in range(len(self.chars))
            )
        )
        words: dict[str, None] = dict.fromkeys(common[:150])  # function words rank first
        while len(words) < 80_000:
            n = lex.choices([1, 2, 3, 4], weights=[20, 58, 13, 9])[0]
            words["".join(lex.choices(self.chars, cum_weights=self.char_cum, k=n))] = None
        self.words = list(words)
        self.word_cum = _zipf_cum(len(self.words), 1.0, 2.0)
        self.given = [
            "".join(lex.choices(self.chars[:2500], cum_weights=self.char_cum[:2500], k=k))
            for k in lex.choices([1, 2], weights=[3, 7], k=20_000)
        ]
        self.places = [self._w(lex) + self._w(lex) for _ in range(3000)]
        self.orgs = [self._w(lex) + self._w(lex) + lex.choice(_SUFFIX_ORG) for _ in range(3000)]
        self.en_cum = _zipf_cum(len(_EN_WORDS), 1.0, 3.0)
        self.rng = random.Random(seed)

    def _w(self, rng) -> str:
        return self.words[bisect.bisect(self.word_cum, rng.random() * self.word_cum[-1])]

    # slots
    def word(self) -> str:
        return self._w(self.rng)

    def clause(self, lo: int = 3, hi: int = 11) -> str:
        rng = self.rng
        return "".join(rng.choices(self.words, cum_weights=self.word_cum, k=rng.randint(lo, hi)))

    def name(self) -> str:
        return self.rng.choice(_SURNAMES) + self.rng.choice(self.given)

    def place(self) -> str:
        return self.rng.choice(self.places[:1500] if self.rng.random() < 0.8 else self.places) + (
            self.rng.choice(_SUFFIX_PLACE)
        )

    def org(self) -> str:
        return self.rng.choice(self.orgs)

    def english(self, lo: int = 1, hi: int = 4) -> str:
        rng = self.rng
        return " ".join(rng.choices(_EN_WORDS, cum_weights=self.en_cum, k=rng.randint(lo, hi)))

    def number(self) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.4:
            return str(rng.randint(1, 100))
        if r < 0.7:
            return str(rng.randint(100, 99_999))
        if r < 0.85:
            return f"{rng.randint(1, 999)}.{rng.randint(0, 99)}"
        return f"{rng.randint(1, 9)},{rng.randint(0, 999):03d},{rng.randint(0, 999):03d}"

    def sentence(self) -> str:
        rng, c = self.rng, self.clause
        t = rng.randrange(32)
        if t < 8:
            s = "，".join(c() for _ in range(rng.randint(1, 4))) + rng.choice(_PUNCT_END)
        elif t == 8:
            y, m = rng.randint(1900, 2030), rng.randint(1, 12)
            s = f"{self.name()}在{y}年{m}月来到{self.place()}，{c()}。"
        elif t == 9:
            s = (
                f"根据{self.org()}的统计，{rng.randint(1990, 2030)}年{self.place()}的{self.word()}"
                f"增长了{rng.randint(0, 99)}.{rng.randint(0, 9)}%，{c()}。"
            )
        elif t == 10:
            s = f"“{c()}，”{self.name()}说，“{c()}！”"
        elif t == 11:
            s = f"《{self.word()}{self.word()}》是{self.name()}的{self.word()}，{c()}。"
        elif t == 12:
            s = f"{c()}（{self.english(1, 3)}），{c()}。"
        elif t == 13:
            s = f"问：{c()}吗？答：{c()}。"
        elif t == 14:
            s = f"第{rng.randint(1, 300)}章 {c(2, 6)}\n"
        elif t == 15:
            s = f"{c(2, 5)}：{c(1, 3)}、{c(1, 3)}、{c(1, 3)}。"
        elif t == 16:
            s = self.english(6, 20).capitalize() + rng.choice([". ", "? ", ", "])
        elif t == 17:
            s = f"价格为{self.number()}{rng.choice(_UNITS)}，{c()}！"
        elif t == 18:
            s = f"{self.org()}宣布，{c()}，预计{self.number()}{rng.choice(_UNITS)}。"
        elif t == 19:
            s = f"{rng.randint(1, 12)}月{rng.randint(1, 28)}日，{self.name()}和{self.name()}{c()}。"
        elif t == 20:
            s = f"{c()}的 {self.english(1, 2)} {c()}。"
        elif t == 21:
            s = f"{self.number()}、{c(2, 6)}；"
        elif t == 22:
            where = rng.choice("东南西北")
            s = f"{self.place()}位于{self.place()}以{where}{self.number()}公里，{c()}。"
        elif t == 23:
            s = f"{c()}，{c()}，因此{c()}。"
        elif t == 24:
            s = f"如果{c()}，那么{c()}。"
        elif t == 25:
            s = f"虽然{c()}，但是{c()}。"
        elif t == 26:
            s = f"{self.name()}：“{c()}？”\n"
        elif t == 27:
            v = self.english(1, 1)
            s = f"`{v}_{self.english(1, 1)}({rng.randint(0, 64)})` {c()}。"
        elif t == 28:
            s = f"{c()}——{c()}。"
        elif t == 29:
            s = f"{c()}…{c(1, 4)}。"
        elif t == 30:
            s = f"截至{rng.randint(2000, 2030)}年底，共有{self.number()}{rng.choice(_UNITS)}{c()}。"
        else:
            s = f"{c()}，{self.english(2, 6)}，{c()}。"
        return s

    def paragraph(self, lo: int, hi: int) -> str:
        target = self.rng.randint(lo, hi)
        out, n = [], 0
        while n < target:
            s = self.sentence()
            if self.rng.random() < 0.05:
                s += "\n"
            out.append(s)
            n += len(s)
        return "".join(out)

    def record(self) -> dict:
        rng = self.rng
        if rng.random() < 0.7:
            return {"text": f"<s>{self.paragraph(80, 1500)}</s>"}
        conv = []
        for _ in range(rng.choices([1, 2, 3], weights=[6, 3, 1])[0]):
            conv.append({"role": "user", "content": self.paragraph(8, 150)})
            if rng.random() < 0.15:
                ans = (
                    f"<think>\n{self.paragraph(40, 300)}\n</think>\n"
                    f"<answer>\n{self.paragraph(20, 200)}\n</answer>"
                )
            else:
                ans = self.paragraph(20, 450)
            conv.append({"role": "assistant", "content": ans})
        return {"conversations": conv}


def generate(path: Path, size_mb: float, seed: int) -> int:
    """Write about `size_mb` MB of records to `path`; returns the record count."""
    g = ChineseCorpus(seed)
    limit = int(size_mb * 1e6)
    n = written = 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        while written < limit:
            line = json.dumps(g.record(), ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            n += 1
    tmp.rename(path)
    return n


def prefix_file(src: Path, dst: Path, size_mb: float) -> Path:
    """The first whole lines of `src` up to `size_mb` MB."""
    limit = int(size_mb * 1e6)
    with src.open("rb") as f, dst.open("wb") as out:
        n = 0
        for line in f:
            if n >= limit:
                break
            out.write(line)
            n += len(line)
    return dst


def read_texts(path: Path) -> list[str]:
    """The texts a trainer sees: text records (one marker pair stripped) and chat contents."""
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            if "text" in obj:
                t = obj["text"]
                t = t[3:] if t.startswith("<s>") else t
                out.append(t[:-4] if t.endswith("</s>") else t)
            else:
                out += [m["content"] for m in obj["conversations"]]
    return out


# --------------------------------------------------------------------------------------------
# one measured training (in a subprocess)


def _rss_mb() -> dict:
    out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                out["vmhwm_mb" if line.startswith("VmHWM") else "vmrss_mb"] = (
                    int(line.split()[1]) / 1024
                )
    except OSError:
        pass
    return out


def worker(spec: dict) -> dict:
    from spongebob.tokenizer import train_tokenizer

    rss_start = _rss_mb()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    t0 = time.perf_counter()
    train_tokenizer(
        [Path(spec["data"])],
        Path(spec["out"]),
        vocab_size=spec["vocab_size"],
        show_progress=False,
        trainer=spec["trainer"],
        max_memory=spec["max_memory"],
    )
    wall = time.perf_counter() - t0
    return {
        **spec,
        "wall_s": wall,
        "loadavg_before": load,
        "rss_start": rss_start,
        "rss_peak": _rss_mb(),
    }


def run_in_subprocess(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {**spec, "failed": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["log"] = proc.stderr.strip().splitlines()
    return res


def chars_per_token(tok_dir: Path, texts: list[str]) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return sum(len(t) for t in texts) / tokens


def mem_available_mb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


# --------------------------------------------------------------------------------------------
# report


def peak_mb(r: dict) -> float:
    return r["rss_peak"].get("vmhwm_mb", r["rss_peak"]["ru_maxrss_mb"])


def table(results: list[dict]) -> str:
    lines = [
        "| corpus | trainer | peak RSS (MB) | × plain | wall (s) | × plain "
        "| chars/token (held-out) | vs plain |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    plain = {r["size_mb"]: r for r in results if r["trainer"] == "plain" and "failed" not in r}
    for r in results:
        name = r["trainer"] + (f" ({r['max_memory']})" if r["trainer"] == "bounded" else "")
        if "failed" in r:
            lines.append(f"| {r['size_mb']:.0f} MB | {name} | {r['failed'][:60]} | | | | | |")
            continue
        p = plain.get(r["size_mb"])
        if p is not None and r is not p:
            rss = f"{peak_mb(r) / peak_mb(p):.3f}"
            wall = f"{r['wall_s'] / p['wall_s']:.3f}"
            cpt = f"{100 * (r['chars_per_token'] / p['chars_per_token'] - 1):+.2f} %"
        else:
            rss = wall = cpt = "—"
        lines.append(
            f"| {r['size_mb']:.0f} MB | {name} | {peak_mb(r):.0f} | {rss} | {r['wall_s']:.1f} "
            f"| {wall} | {r['chars_per_token']:.4f} | {cpt} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[50, 100, 200], metavar="MB")
    p.add_argument("--max-memory", default="512MB", help="the bounded trainer's cap")
    p.add_argument("--vocab-size", type=int, default=6400)
    p.add_argument("--heldout-mb", type=float, default=3.0)
    p.add_argument("--trainers", nargs="+", default=["plain", "bounded"])
    p.add_argument(
        "--plain-ram-factor",
        type=float,
        default=95.0,
        help="skip the plain trainer when MemAvailable < this × the corpus (default 95)",
    )
    p.add_argument(
        "--scratch", type=Path, default=Path(tempfile.gettempdir()) / "spongebob_bench_tokenizer"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--regen", action="store_true", help="regenerate the corpora")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return 0

    scratch = args.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    biggest = max(args.sizes)
    full = scratch / f"corpus_{biggest:g}mb.jsonl"
    heldout = scratch / "heldout.jsonl"
    for path, size, seed in ((full, biggest, 1), (heldout, args.heldout_mb, 99)):
        if args.regen or not path.exists():
            t = time.perf_counter()
            n = generate(path, size, seed)
            print(
                f"generated {path} ({n} records, {time.perf_counter() - t:.0f}s)", file=sys.stderr
            )
    held_texts = read_texts(heldout)

    results = []
    for size in sorted(args.sizes):
        data = full if size == biggest else scratch / f"corpus_{size:g}mb.jsonl"
        if data != full and (args.regen or not data.exists()):
            prefix_file(full, data, size)
        size_mb = data.stat().st_size / 1e6
        for trainer in args.trainers:
            spec = dict(
                trainer=trainer,
                size_mb=size_mb,
                data=str(data),
                out=str(scratch / f"tok_{trainer}_{size:g}mb"),
                vocab_size=args.vocab_size,
                max_memory=args.max_memory,
            )
            need = args.plain_ram_factor * size_mb
            if trainer == "plain" and mem_available_mb() < need:
                r = {
                    **spec,
                    "failed": f"skipped: needs ~{need / 1024:.1f} GB, "
                    f"{mem_available_mb() / 1024:.1f} GB available",
                }
            else:
                r = run_in_subprocess(spec)
            if "failed" not in r:
                r["chars_per_token"] = chars_per_token(Path(r["out"]), held_texts)
                print(
                    f"{size_mb:6.0f} MB {trainer:8s} peak {peak_mb(r):7.0f} MB  "
                    f"{r['wall_s']:7.1f} s  {r['chars_per_token']:.4f} chars/token",
                    file=sys.stderr,
                )
            else:
                print(f"{size_mb:6.0f} MB {trainer:8s} {r['failed']}", file=sys.stderr)
            results.append(r)

    plain = {r["size_mb"]: r for r in results if r["trainer"] == "plain" and "failed" not in r}
    for r in results:
        pr = plain.get(r["size_mb"])
        if r["trainer"] != "plain" and pr is not None and "failed" not in r:
            r["vs_plain"] = {
                "peak_rss": peak_mb(r) / peak_mb(pr),
                "wall": r["wall_s"] / pr["wall_s"],
                "chars_per_token": r["chars_per_token"] / pr["chars_per_token"],
            }
    md = table(results)
    print(md)
    report = {
        "benchmark": "tokenizer",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(("tokenizers", "spongebob")),
        "command": "python benchmarks/bench_tokenizer.py " + " ".join(argv or sys.argv[1:]),
        "heldout": {"path": str(heldout), "chars": sum(len(t) for t in held_texts)},
        "results": results,
        "table": md,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
