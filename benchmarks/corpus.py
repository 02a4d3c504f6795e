"""The benchmarks' generated Chinese-heavy corpora (no dataset hub is reachable here).

A character inventory of the whole CJK block ranked by a Zipf-exponential law (top 100 ≈ 40 %
of text, top 1000 ≈ 88 %, top 3500 ≈ 99 %, like modern Chinese), an 80 000-word lexicon (1–4
characters) sampled by a Zipf law, person names, places and organisations, years, dates, amounts
and percentages, English words and sentences, and ~30 sentence templates with free clauses of
random words. Nearly every clause is new, so the number of distinct pre-tokens grows almost
linearly with the corpus, as in real data.

`ChineseCorpus(seed)` samples text; `lexicon_seed` fixes the "language", so two seeds give two
samples of one distribution (a training file and a held-out file).
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
from pathlib import Path

LEXICON_SEED = 20240607

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
        """A pretrain document (70 %) or a conversation, as in a mixed tokenizer corpus."""
        if self.rng.random() < 0.7:
            return self.document()
        return self.conversation()

    def document(self) -> dict:
        return {"text": f"<s>{self.paragraph(80, 1500)}</s>"}

    def conversation(self) -> dict:
        """1–3 turns; 15 % of answers carry a <think> block; no system turn (the template adds
        the default one)."""
        rng = self.rng
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


def write_jsonl(path: Path, size_mb: float, make_record) -> int:
    """Write records from `make_record()` until `path` holds about `size_mb` MB; returns the
    record count. Written under a temporary name, so an interrupted run leaves no half file."""
    limit = int(size_mb * 1e6)
    n = written = 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        while written < limit:
            line = json.dumps(make_record(), ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            n += 1
    tmp.rename(path)
    return n


def generate(path: Path, size_mb: float, seed: int) -> int:
    """The tokenizer benchmark's mixed corpus: documents and conversations."""
    return write_jsonl(path, size_mb, ChineseCorpus(seed).record)
