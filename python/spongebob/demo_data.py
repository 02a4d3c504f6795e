"""A small, checkable demo corpus in MiniMind's formats, generated from a seed.

Why generate instead of download: a fresh machine has no hub, and a demo must prove that each
stage taught the model something. So the corpus is built from a table of real facts that a tiny
model can memorise on a CPU in minutes, written three ways:

* `pretrain.jsonl` — the facts as encyclopedia text (`{"text": "<s>...</s>"}`);
* `sft_512.jsonl` / `sft_1024.jsonl` — the same facts asked as questions with varied wordings,
  identity and greetings, long answers and multi-turn dialogues (`{"conversations": [...]}`;
  `sft_1024` also replays short dialogues like `sft_512`'s, as MiniMind's holds short ones too);
* `r1_1024.jsonl` — arithmetic word problems (and some facts) answered as
  `<think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>`;
* `eval.jsonl` — chat records whose user wordings (or numbers) never occur in training, each
  with a reference reply as the assistant turn plus `answer` (the key a reply must contain),
  `task` (`fact` | `identity` | `arith`) and `id`; reasoning records also carry `expr`.

Everything is a pure function of `(seed, scale)`: one `random.Random(seed)` drives all choices
and nothing iterates over a set, so two runs write byte-identical files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IDENTITY_NAME = "SpongeBob"


@dataclass(frozen=True)
class Fact:
    """One fact. `topic` is a noun phrase ("法国的首都"), `answer` what it is ("巴黎").

    `kind` picks the wording templates: capital (topic = country), thing ("…是什么"),
    who ("…是谁"), year (topic = an event, answer = "1949年"). `key` is the short string a
    correct reply must contain. English fields are optional (some facts are asked in English).
    """

    id: str
    kind: str
    topic: str
    answer: str
    en_topic: str = ""
    en_answer: str = ""


_CAPITALS = [
    ("中国", "北京", "China", "Beijing"),
    ("日本", "东京", "Japan", "Tokyo"),
    ("法国", "巴黎", "France", "Paris"),
    ("英国", "伦敦", "the United Kingdom", "London"),
    ("德国", "柏林", "Germany", "Berlin"),
    ("意大利", "罗马", "Italy", "Rome"),
    ("西班牙", "马德里", "Spain", "Madrid"),
    ("俄罗斯", "莫斯科", "Russia", "Moscow"),
    ("美国", "华盛顿", "the United States", "Washington"),
    ("加拿大", "渥太华", "Canada", "Ottawa"),
    ("澳大利亚", "堪培拉", "Australia", "Canberra"),
    ("巴西", "巴西利亚", "Brazil", "Brasilia"),
    ("印度", "新德里", "India", "New Delhi"),
    ("埃及", "开罗", "Egypt", "Cairo"),
    ("韩国", "首尔", "South Korea", "Seoul"),
    ("泰国", "曼谷", "Thailand", "Bangkok"),
    ("越南", "河内", "Vietnam", "Hanoi"),
    ("希腊", "雅典", "Greece", "Athens"),
    ("土耳其", "安卡拉", "Turkey", "Ankara"),
    ("阿根廷", "布宜诺斯艾利斯", "Argentina", "Buenos Aires"),
    ("墨西哥", "墨西哥城", "Mexico", "Mexico City"),
    ("葡萄牙", "里斯本", "Portugal", "Lisbon"),
    ("瑞典", "斯德哥尔摩", "Sweden", "Stockholm"),
    ("挪威", "奥斯陆", "Norway", "Oslo"),
    ("波兰", "华沙", "Poland", "Warsaw"),
    ("肯尼亚", "内罗毕", "Kenya", "Nairobi"),
    ("新西兰", "惠灵顿", "New Zealand", "Wellington"),
]

# (id, kind, topic, answer, en_topic, en_answer)
_OTHER = [
    (
        "geo:最高峰",
        "thing",
        "世界上最高的山峰",
        "珠穆朗玛峰",
        "the highest mountain in the world",
        "Mount Everest",
    ),
    (
        "geo:最长河",
        "thing",
        "世界上最长的河流",
        "尼罗河",
        "the longest river in the world",
        "the Nile",
    ),
    (
        "geo:中国最长河",
        "thing",
        "中国最长的河流",
        "长江",
        "the longest river in China",
        "the Yangtze River",
    ),
    (
        "geo:最大洋",
        "thing",
        "世界上面积最大的海洋",
        "太平洋",
        "the largest ocean in the world",
        "the Pacific Ocean",
    ),
    (
        "geo:最大热沙漠",
        "thing",
        "世界上面积最大的热带沙漠",
        "撒哈拉沙漠",
        "the largest hot desert in the world",
        "the Sahara",
    ),
    (
        "geo:最大国",
        "thing",
        "世界上面积最大的国家",
        "俄罗斯",
        "the largest country by area",
        "Russia",
    ),
    ("geo:最大洲", "thing", "世界上面积最大的大洲", "亚洲", "the largest continent", "Asia"),
    (
        "geo:最深海沟",
        "thing",
        "世界上最深的海沟",
        "马里亚纳海沟",
        "the deepest ocean trench",
        "the Mariana Trench",
    ),
    (
        "geo:最大岛",
        "thing",
        "世界上最大的岛屿",
        "格陵兰岛",
        "the largest island in the world",
        "Greenland",
    ),
    ("geo:中国最大淡水湖", "thing", "中国面积最大的淡水湖", "鄱阳湖", "", ""),
    ("geo:黄河入海", "thing", "黄河注入的海", "渤海", "", ""),
    (
        "sci:沸点",
        "thing",
        "标准大气压下水的沸点",
        "100摄氏度",
        "the boiling point of water at sea level",
        "100 degrees Celsius",
    ),
    (
        "sci:冰点",
        "thing",
        "标准大气压下水的冰点",
        "0摄氏度",
        "the freezing point of water at sea level",
        "0 degrees Celsius",
    ),
    (
        "sci:光速",
        "thing",
        "真空中的光速",
        "每秒约30万千米",
        "the speed of light in a vacuum",
        "about 300,000 kilometres per second",
    ),
    ("sci:水化学式", "thing", "水的化学式", "H2O", "the chemical formula of water", "H2O"),
    (
        "sci:食盐",
        "thing",
        "食盐的主要成分",
        "氯化钠",
        "the main component of table salt",
        "sodium chloride",
    ),
    (
        "sci:最大行星",
        "thing",
        "太阳系中最大的行星",
        "木星",
        "the largest planet in the solar system",
        "Jupiter",
    ),
    (
        "sci:最近行星",
        "thing",
        "离太阳最近的行星",
        "水星",
        "the planet closest to the Sun",
        "Mercury",
    ),
    (
        "sci:地球卫星",
        "thing",
        "地球唯一的天然卫星",
        "月球",
        "the only natural satellite of the Earth",
        "the Moon",
    ),
    (
        "sci:最大器官",
        "thing",
        "人体最大的器官",
        "皮肤",
        "the largest organ of the human body",
        "the skin",
    ),
    (
        "sci:一号元素",
        "thing",
        "元素周期表中的第一号元素",
        "氢",
        "the first element of the periodic table",
        "hydrogen",
    ),
    (
        "sci:空气最多",
        "thing",
        "空气中含量最多的气体",
        "氮气",
        "the most abundant gas in the air",
        "nitrogen",
    ),
    (
        "sci:光合作用",
        "thing",
        "植物光合作用释放的气体",
        "氧气",
        "the gas that plants release in photosynthesis",
        "oxygen",
    ),
    (
        "sci:绝对零度",
        "thing",
        "绝对零度",
        "零下273.15摄氏度",
        "absolute zero",
        "minus 273.15 degrees Celsius",
    ),
    (
        "sci:平年天数",
        "thing",
        "一个平年的天数",
        "365天",
        "the number of days in a common year",
        "365 days",
    ),
    (
        "who:相对论",
        "who",
        "提出相对论的科学家",
        "爱因斯坦",
        "the scientist who proposed the theory of relativity",
        "Albert Einstein",
    ),
    (
        "who:万有引力",
        "who",
        "发现万有引力定律的科学家",
        "牛顿",
        "the scientist who discovered the law of universal gravitation",
        "Isaac Newton",
    ),
    ("who:红楼梦", "who", "《红楼梦》的作者", "曹雪芹", "", ""),
    (
        "who:哈姆雷特",
        "who",
        "《哈姆雷特》的作者",
        "莎士比亚",
        "the author of Hamlet",
        "William Shakespeare",
    ),
    (
        "who:电话",
        "who",
        "发明电话的人",
        "贝尔",
        "the inventor of the telephone",
        "Alexander Graham Bell",
    ),
    (
        "year:新中国",
        "year",
        "中华人民共和国成立",
        "1949年",
        "the People's Republic of China was founded",
        "1949",
    ),
    (
        "year:登月",
        "year",
        "人类第一次登上月球",
        "1969年",
        "humans first landed on the Moon",
        "1969",
    ),
    ("year:二战结束", "year", "第二次世界大战结束", "1945年", "the Second World War ended", "1945"),
    (
        "year:美国独立",
        "year",
        "美国发表《独立宣言》",
        "1776年",
        "the United States declared independence",
        "1776",
    ),
    ("year:柏林墙", "year", "柏林墙倒塌", "1989年", "the Berlin Wall fell", "1989"),
    ("year:法国大革命", "year", "法国大革命爆发", "1789年", "the French Revolution began", "1789"),
    ("year:秦统一", "year", "秦始皇统一六国", "公元前221年", "", ""),
    (
        "year:首届奥运",
        "year",
        "第一届现代奥运会举办",
        "1896年",
        "the first modern Olympic Games were held",
        "1896",
    ),
    (
        "year:北京奥运",
        "year",
        "北京举办夏季奥运会",
        "2008年",
        "Beijing hosted the Summer Olympics",
        "2008",
    ),
    (
        "year:哥伦布",
        "year",
        "哥伦布第一次到达美洲",
        "1492年",
        "Columbus first reached the Americas",
        "1492",
    ),
]

FACTS: list[Fact] = [
    Fact(f"capital:{c}", "capital", c, a, ec, ea) for c, a, ec, ea in _CAPITALS
] + [Fact(*row) for row in _OTHER]


# --- wordings -------------------------------------------------------------------------------
# Questions are composed from interchangeable parts: an opening, a question form with {t} for
# the topic, and an ending. Forms come in two sets per kind: training forms, and held-out
# forms (whole wording families) that only eval uses; openings likewise. Eval asks every fact
# twice: in an unseen family (held-out opening + held-out form) and as a new pairing (a
# training form this fact is never asked with in training). So eval measures whether the
# model combines a wording it knows, or one it has never seen, with a fact it learned
# elsewhere, not whether it has seen the exact string. The held-out pieces are made of words
# training uses elsewhere ("…在哪儿" after "…在哪里", "Excuse me" never seen but plain words).

FACT_OPENINGS = {
    "zh": (
        [
            "",
            "",
            "",
            "请问",
            "你好，",
            "我想问一下，",
            "问一下，",
            "麻烦告诉我，",
            "考考你：",
            "嗨，",
            "不好意思，",
            "请教一下，",
            "同学，请问",
        ],
        ["劳驾，", "打扰一下，", "老师，请问"],
    ),
    "en": (
        ["", "", "Hi, ", "Hey, ", "Quick question: ", "Hello! ", "Pardon me, ", "Hello there, "],
        ["Excuse me, ", "Sorry, "],
    ),
}
FACT_ENDINGS = {"zh": ["？", "?", "", "呢？"], "en": ["?", ""]}

QUESTIONS = {
    "capital": (
        [
            "{t}的首都是哪里",
            "{t}的首都是什么",
            "{t}的首都是哪座城市",
            "{t}的首都叫什么名字",
            "告诉我{t}的首都",
            "你知道{t}的首都吗",
            "{t}的首都是哪个城市",
            "哪座城市是{t}的首都",
            "我想知道{t}的首都是哪个城市",
            "能说一下{t}的首都吗",
            "{t}的首都在哪里",
            "说说{t}的首都",
            "{t}的首都在什么地方",
            "你可以告诉我{t}的首都是哪里吗",
            "有人知道{t}的首都吗",
            "{t}的首都究竟是哪里",
            "你能说说{t}的首都是哪座城市吗",
        ],
        ["{t}的首都在哪儿", "哪个城市是{t}的首都", "你能告诉我{t}的首都是哪里吗"],
    ),
    "thing": (
        [
            "{t}是什么",
            "你知道{t}是什么吗",
            "告诉我{t}是什么",
            "{t}是哪个",
            "{t}叫什么",
            "我想知道{t}是什么",
            "能说一下{t}是什么吗",
            "说说{t}是什么",
            "{t}指的是什么",
            "{t}究竟是什么",
            "你可以告诉我{t}是什么吗",
            "有人知道{t}是什么吗",
            "你能说说{t}是什么吗",
        ],
        ["{t}到底是什么", "你能告诉我{t}是什么吗", "谁知道{t}是什么"],
    ),
    "who": (
        [
            "{t}是谁",
            "你知道{t}是谁吗",
            "告诉我{t}是谁",
            "{t}叫什么名字",
            "我想知道{t}是谁",
            "能说一下{t}是谁吗",
            "说说{t}是谁",
            "{t}是哪一位",
            "{t}究竟是谁",
            "你可以告诉我{t}是谁吗",
            "有人知道{t}是谁吗",
            "你能说说{t}是谁吗",
        ],
        ["{t}到底是谁", "你能告诉我{t}是谁吗", "谁知道{t}是谁"],
    ),
    "year": (
        [
            "{t}是在哪一年",
            "{t}是哪一年",
            "你知道{t}是哪一年吗",
            "{t}是什么时候",
            "我想知道{t}是哪一年",
            "能说一下{t}是哪一年吗",
            "说说{t}是在哪一年",
            "{t}发生在哪一年",
            "{t}究竟是哪一年",
            "你可以告诉我{t}是在哪一年吗",
            "有人知道{t}是哪一年吗",
            "你能说说{t}是哪一年吗",
        ],
        ["{t}到底是哪一年", "你能告诉我{t}是在哪一年吗", "谁知道{t}是哪一年"],
    ),
}

EN_QUESTIONS = {
    "capital": (
        [
            "what is the capital of {t}",
            "which city is the capital of {t}",
            "tell me the capital of {t}",
            "do you know the capital of {t}",
            "name the capital city of {t}",
            "what city is the capital of {t}",
            "can you tell me the capital of {t}",
            "I want to know the capital of {t}",
            "which city is the capital city of {t}",
        ],
        ["could you tell me the capital of {t}", "what is the capital city of {t}"],
    ),
    "thing": (
        ["what is {t}", "tell me what {t} is", "do you know what {t} is", "name {t}"],
        ["could you tell me what {t} is"],
    ),
    "who": (
        ["who is {t}", "tell me who {t} is", "do you know who {t} is", "name {t}"],
        ["could you tell me who {t} is"],
    ),
    "year": (
        [
            "tell me the year when {t}",
            "do you know the year when {t}",
            "what was the year when {t}",
            "in which year {t}",
        ],
        ["could you tell me the year when {t}"],
    ),
}


def compose(opening: str, form: str, ending: str, topic: str, en: bool) -> str:
    """One question from its parts; English starts with a capital letter."""
    text = opening + form.format(t=topic) + ending
    return text[0].upper() + text[1:] if en else text


ANSWERS = {
    "capital": ["{t}的首都是{a}。", "{a}。{t}的首都是{a}。", "是{a}。"],
    "thing": ["{t}是{a}。", "{a}。{t}是{a}。", "是{a}。"],
    "who": ["{t}是{a}。", "{a}。{t}是{a}。", "是{a}。"],
    "year": ["{t}是在{a}。", "{a}。{t}是在{a}。", "是在{a}。"],
}

EN_ANSWERS = {
    "capital": ["The capital of {t} is {a}.", "{a}. The capital of {t} is {a}."],
    "thing": ["{T} is {a}.", "It is {a}."],
    "who": ["{T} is {a}.", "It is {a}."],
    "year": ["{T} in {a}.", "In {a}."],
}

# Encyclopedia sentences for pretraining.
ENCYCLOPEDIA = {
    "capital": [
        "{a}是{t}的首都。",
        "{t}的首都是{a}。",
        "{t}以{a}为首都。",
        "{a}作为{t}的首都，是一座重要的城市。",
    ],
    "thing": ["{t}是{a}。", "{a}是{t}。", "一般认为，{t}是{a}。"],
    "who": ["{t}是{a}。", "{a}是{t}。"],
    "year": ["{a}，{t}。", "{t}是在{a}。", "{t}的时间是{a}。"],
}
EN_ENCYCLOPEDIA = {
    "capital": ["{a} is the capital of {t}.", "The capital of {t} is {a}."],
    "thing": ["{T} is {a}.", "{A} is {t}."],
    "who": ["{T} is {a}.", "{A} is {t}."],
    "year": ["In {a}, {t}.", "It was in {a} that {t}."],
}
SECTION_TITLES = {
    "capital": ["世界各国的首都", "首都知识", "各国首都一览"],
    "thing": ["地理与科学常识", "自然科学小知识", "百科常识"],
    "who": ["人物与作品", "科学家和作家", "名人常识"],
    "year": ["历史年表", "重要历史事件", "历史上的今天"],
}
EN_SECTION_TITLES = {
    "capital": "Capitals of the world",
    "thing": "Facts about the world",
    "who": "People and works",
    "year": "A timeline of history",
}

IDENTITY_ANSWERS = [
    "我是 SpongeBob，一个乐于助人的人工智能助手。有什么可以帮你的吗？",
    "你好，我是 SpongeBob，一个小型的人工智能助手，可以回答常识问题，也会做简单的算术题。",
    "我叫 SpongeBob，是一个从零开始训练的小型语言模型助手。",
]
EN_IDENTITY_ANSWERS = [
    "I am SpongeBob, a helpful AI assistant. How can I help you?",
    "Hi! I'm SpongeBob, a small language model trained from scratch to answer questions.",
]
GREETING_ANSWERS = [
    "你好！我是 SpongeBob，很高兴见到你。有什么我可以帮你的吗？",
    "你好呀！我是 SpongeBob，有什么问题都可以问我。",
]
EN_GREETING_ANSWERS = ["Hello! I'm SpongeBob. What can I do for you today?"]
# Identity questions: (training forms, held-out forms), composed with the fact openings.
IDENTITY_FORMS = {
    "zh": (
        ["你是谁", "你叫什么名字", "介绍一下你自己", "你是什么", "请做个自我介绍", "你的名字叫什么",
         "你是哪位", "怎么称呼你", "你叫什么", "你是谁呀", "能告诉我你的名字吗", "说说你自己",
         "你是做什么的", "我在和谁说话", "你有名字吗", "你是什么助手", "请问你叫什么",
         "你究竟是谁", "你又是谁", "你可以介绍一下你自己吗", "我应该叫你什么"],
        ["你到底是谁", "你能介绍一下你自己吗", "我该怎么称呼你"],
    ),
    "en": (
        ["who are you", "what is your name", "introduce yourself", "what are you",
         "please introduce yourself", "tell me about yourself", "what should I call you",
         "what's your name", "tell me who you are", "who is this", "are you an assistant"],
        ["could you introduce yourself", "who am I talking to"],
    ),
}  # fmt: skip
GREETINGS = ["你好", "你好！", "您好", "嗨", "早上好", "晚上好", "哈喽"]
EN_GREETINGS = ["Hello", "Hi!", "Good morning"]
THANKS = [
    ("谢谢！", "不客气！还有什么想问的吗？"),
    ("好的，谢谢你。", "不用谢，随时可以问我。"),
    ("Thanks!", "You're welcome!"),
]

NAMES = ["小明", "小红", "小刚", "小丽", "小华", "小军", "妈妈", "爷爷", "老师", "小芳"]
EN_NAMES = ["Tom", "Anna", "Lily", "Jack", "Mary", "Sam"]
ITEMS = [
    ("苹果", "个"),
    ("铅笔", "支"),
    ("本子", "本"),
    ("糖果", "颗"),
    ("气球", "个"),
    ("橘子", "个"),
    ("贴纸", "张"),
    ("故事书", "本"),
    ("小球", "个"),
    ("饼干", "块"),
]
EN_ITEMS = ["apples", "pencils", "books", "candies", "balloons", "stickers"]


# Everyday sentences for pretraining: the words the held-out wording families are made of
# ("劳驾", "到底", "Excuse me", ...) occur here, never in a fact or identity question, so an
# unseen family tests combining known words in a new way, not reading a word never seen.
EVERYDAY = {
    "zh": [
        "劳驾，请让一下。", "劳驾帮我开一下门。", "打扰一下，请问洗手间在哪儿？",
        "不好意思，打扰一下，现在几点了？", "你到底想去哪儿？", "这道题到底怎么做？",
        "谁知道明天会不会下雨？", "谁知道这本书是谁的？", "你能告诉我去车站怎么走吗？",
        "你能告诉我现在几点吗？", "我的钥匙放在哪儿了？", "你能帮我一个忙吗？",
        "老师，请问明天考试吗？", "他到底来不来？", "打扰了，我先走了。", "劳驾，递一下盐。",
        "你在哪儿？我在门口等你。", "谁知道呢，也许吧。", "我该怎么做才好？",
    ],
    "en": [
        "Excuse me, where is the station?", "Sorry, I did not hear you.",
        "Could you open the window?", "Could you tell me the time?",
        "They are talking about the weather.", "Sorry, I am late.",
        "Excuse me, is this seat free?", "I was talking to my friend.",
        "Could you help me with this box?", "What is the time?",
    ],
}  # fmt: skip


def _pick(rng: random.Random, xs: list):
    return xs[rng.randrange(len(xs))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fmt(template: str, t: str, a: str = "") -> str:
    return template.format(t=t, a=a, T=_cap(t), A=_cap(a))


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _conv(*turns: tuple[str, str]) -> dict:
    msgs = []
    for q, a in turns:
        msgs += [_user(q), _assistant(a)]
    return {"conversations": msgs}


def reasoning(think: str, answer: str) -> str:
    """Assistant content in the distillation format (contracts.md §1)."""
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


def identity_reasoning(answer: str, en: bool) -> str:
    """The distillation reply to an identity question."""
    if en:
        return reasoning("The user asks who I am.\nI am SpongeBob, an AI assistant.", answer)
    return reasoning("用户想知道我是谁。\n我是 SpongeBob，一个人工智能助手。", answer)


def answer_sentence(fact: Fact, en: bool = False, template: int = 0) -> str:
    """The reply to a question about `fact`; template 0 is the full sentence eval uses."""
    table = EN_ANSWERS if en else ANSWERS
    if en:
        return _fmt(table[fact.kind][template], fact.en_topic, fact.en_answer)
    return _fmt(table[fact.kind][template], fact.topic, fact.answer)


# --- arithmetic ----------------------------------------------------------------------------
# Sums and differences of numbers to 99 and the times tables to 9. Every problem is worked in
# a trace a small model can execute line by line: the expression, then digit by digit with
# the carry or borrow written out (products as a count of equal groups), then the digits put
# together. Each line follows from the one before and from single-digit facts the corpus
# teaches everywhere, so a number pair the model has never seen is worked the same way.


@dataclass(frozen=True)
class Problem:
    """An arithmetic word problem: `expr` (e.g. "12 + 7"), its value, and the wording."""

    op: str
    a: int
    b: int
    question: str
    think: str

    @property
    def value(self) -> int:
        return apply_op(self.op, self.a, self.b)

    @property
    def expr(self) -> str:
        return f"{self.a} {self.op} {self.b}"


def apply_op(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "×": a * b}[op]


def all_pairs() -> dict[str, list[tuple[str, int, int]]]:
    """Every (op, a, b) the demo uses, by operator: sums of two numbers 1–99, differences
    a - b with 99 ≥ a > b ≥ 1, products of 2–9 by 2–9."""
    return {
        "+": [("+", a, b) for a in range(1, 100) for b in range(1, 100)],
        "-": [("-", a, b) for a in range(2, 100) for b in range(1, a)],
        "×": [("×", a, b) for a in range(2, 10) for b in range(2, 10)],
    }


def trace(op: str, a: int, b: int, en: bool = False) -> list[str]:
    """The worked lines of `a op b` (the thinking without its first and last line)."""
    colon, comma, stop = (": ", ", ", ".") if en else ("：", "，", "。")
    if op == "×":
        unit, count = max(a, b), min(a, b)
        if en:
            lines = [f"{a} × {b} is {count} groups of {unit}:"]
            lines += [f"{k} group{'s' if k > 1 else ''} of {unit}: {k * unit}"
                      for k in range(1, count + 1)]  # fmt: skip
        else:
            lines = [f"{a} × {b} 就是 {count} 个 {unit}："]
            lines += [f"{k} 个 {unit} 是 {k * unit}" for k in range(1, count + 1)]
        return lines
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    ones, tens = ("Ones", "Tens") if en else ("个位", "十位")
    if op == "+":
        s = a0 + b0
        if s >= 10:
            carry = f"write {s % 10}{comma}carry 1" if en else f"写 {s % 10}{comma}进 1"
            first = f"{ones}{colon}{a0} + {b0} = {s}{comma}{carry}{stop}"
            t = a1 + b1 + 1
            second = f"{tens}{colon}{a1} + {b1} + 1 = {t}{stop}"
        else:
            first = f"{ones}{colon}{a0} + {b0} = {s}{stop}"
            t = a1 + b1
            second = f"{tens}{colon}{a1} + {b1} = {t}{stop}"
        digit = s % 10
    else:
        if a0 < b0:
            digit = a0 + 10 - b0
            less = f"{a0} is less than {b0}" if en else f"{a0} 比 {b0} 小"
            borrow = "borrow 1" if en else "借 1"
            first = f"{ones}{colon}{less}{comma}{borrow}{comma}{a0 + 10} - {b0} = {digit}{stop}"
            t = a1 - 1 - b1
            second = f"{tens}{colon}{a1} - 1 - {b1} = {t}{stop}"
        else:
            digit = a0 - b0
            first = f"{ones}{colon}{a0} - {b0} = {digit}{stop}"
            t = a1 - b1
            second = f"{tens}{colon}{a1} - {b1} = {t}{stop}"
    v = apply_op(op, a, b)
    join = f"{t} and {digit} make {v}." if en else f"{t} 和 {digit} 合起来是 {v}。"
    return [first, second, join]


# Word problems, composed: (training stories, held-out stories) per operator, each with {a}
# and {b}, names {n} {m}, an item {i} and its measure word {u}. Held-out stories reuse the
# cue words of their operator ("又" for +, "还剩" for -, "每" for ×).
STORIES = {
    "zh": {
        "+": (
            [
                "{n}有{a}{u}{i}，{m}又给了{n}{b}{u}，现在{n}一共有多少{u}{i}？",
                "{n}先买了{a}{u}{i}，后来又买了{b}{u}，{n}一共买了多少{u}{i}？",
                "盒子里有{a}{u}{i}，又放进去{b}{u}，盒子里现在有多少{u}{i}？",
                "{n}上午做了{a}{u}{i}，下午又做了{b}{u}，一共做了多少{u}？",
                "{n}有{a}{u}{i}，{m}有{b}{u}{i}，两人一共有多少{u}{i}？",
            ],
            [
                "{n}原本有{a}{u}{i}，过生日时又收到{b}{u}，现在一共有几{u}{i}？",
                "书架上有{a}{u}{i}，{n}又拿来{b}{u}，现在一共有多少{u}？",
            ],
        ),
        "-": (
            [
                "{n}有{a}{u}{i}，送给{m}{b}{u}，{n}还剩多少{u}{i}？",
                "{n}有{a}{u}{i}，用掉了{b}{u}，还剩下多少{u}？",
                "盒子里有{a}{u}{i}，拿走了{b}{u}，盒子里还剩多少{u}{i}？",
                "{n}买了{a}{u}{i}，吃掉了{b}{u}，还剩几{u}？",
            ],
            [
                "{n}带了{a}{u}{i}去学校，分给同学{b}{u}，还剩多少{u}{i}？",
                "店里原有{a}{u}{i}，卖出{b}{u}后还剩几{u}？",
            ],
        ),
        "×": (
            [
                "每个盒子里有{a}{u}{i}，一共有{b}个盒子，一共有多少{u}{i}？",
                "{n}每天吃{a}{u}{i}，{b}天一共吃多少{u}{i}？",
                "{b}个小朋友每人有{a}{u}{i}，他们一共有多少{u}{i}？",
            ],
            [
                "每排放{a}{u}{i}，放了{b}排，一共多少{u}？",
                "{n}每周买{a}{u}{i}，买了{b}周，一共买了多少{u}？",
            ],
        ),
    },
    "en": {
        "+": (
            [
                "{n} has {a} {i} and gets {b} more. How many {i} does {n} have now?",
                "There are {a} {i} in a box and {b} more are put in. How many {i} are in the box?",
            ],
            ["{n} had {a} {i}, then found {b} more. How many {i} does {n} have now?"],
        ),
        "-": (
            [
                "{n} has {a} {i} and gives away {b}. How many {i} are left?",
                "{n} had {a} {i} and used {b}. How many {i} are left?",
            ],
            ["A shop had {a} {i} and sold {b}. How many {i} are left?"],
        ),
        "×": (
            ["There are {b} boxes with {a} {i} in each box. How many {i} are there?"],
            ["{n} buys {a} {i} every day for {b} days. How many {i} is that in all?"],
        ),
    },
}
# More training stories, composed from parts (a start, the operator's cue, a question), so the
# model keys the operator on its cue words ("又…" adds, "…还剩" subtracts, "每…" multiplies)
# instead of memorising a few whole stories. The held-out stories above are not among them.
_STARTS = ["{n}有{a}{u}{i}", "盒子里有{a}{u}{i}", "篮子里有{a}{u}{i}", "{n}攒了{a}{u}{i}",
           "桌上有{a}{u}{i}", "{n}买了{a}{u}{i}"]  # fmt: skip
# Sums and products end with the same questions: when "总共有几" ended products only, a
# held-out sum ending "现在一共有几…" was read as a product in all 24 probes, whatever its
# "又" (README: arithmetic misses).
_TOTALS = ["现在一共有多少{u}{i}？", "一共有多少{u}？", "现在有几{u}{i}？", "加起来有多少{u}？",
           "一共有多少{u}{i}？", "一共多少{u}？", "总共有几{u}？"]  # fmt: skip
# The clause that holds the second number comes with a word of time before it and, where it
# gives something away, one of several receivers: the model copied the second number only
# after the few verbs it had seen right before it, and wrote "19 - 1" for "…分给同学11个…" in
# 23 of 24 probes while "…分给朋友11个…" read right (README: arithmetic misses).
_WHEN = ["", "后来", "第二天", "晚上", "中午", "周末", "没多久", "接着"]
_TO = ["{m}", "朋友", "弟弟", "妹妹", "邻居", "小伙伴们", "大家"]


def _when(clauses: list[str]) -> list[str]:
    return [w + c for w in _WHEN for c in clauses]


_COMPOSED = {
    "+": (_STARTS, _when(["{m}又给了{n}{b}{u}", "又买了{b}{u}", "又放进去{b}{u}", "{m}又送来{b}{u}",
                          "又找到{b}{u}", "又多了{b}{u}"]), _TOTALS),
    "-": (_STARTS, _when(["用掉了{b}{u}", "拿走了{b}{u}", "吃掉了{b}{u}", "弄丢了{b}{u}",
                          *(f"{v}{to}{{b}}{{u}}" for v in ("送给", "分给") for to in _TO)]),
          ["还剩多少{u}{i}？", "还剩下多少{u}？", "还剩几{u}？", "现在还剩多少{u}？"]),
    "×": (["每个盒子里有{a}{u}{i}", "每袋装{a}{u}{i}", "每个篮子放{a}{u}{i}", "每组有{a}{u}{i}"],
          ["一共有{b}个盒子", "有{b}袋", "有{b}个篮子", "一共{b}组", "{n}拿了{b}份"], _TOTALS),
}  # fmt: skip
for _op, (_s, _m, _q) in _COMPOSED.items():
    STORIES["zh"][_op][0].extend(f"{a}，{b}，{c}" for a in _s for b in _m for c in _q)

OP_WORDS = {
    "zh": {"+": "这是加法", "-": "这是减法", "×": "这是乘法"},
    "en": {"+": "This is addition", "-": "This is subtraction", "×": "This is multiplication"},
}


# Clauses that say nothing about the numbers, put before or inside a Chinese training story
# (half of them), so that the model learns to find the operands and the operator's cue among
# words that do not matter. Without them an unseen story's own words ("…去学校…") sent a quarter
# of the held-out problems into the fact-recall format (README: asides). None is a piece of a
# held-out story.
ASIDES = {
    "before": ["今天", "昨天", "星期天", "早上", "下午", "吃完饭以后", "在公园里", "放假的时候"],
    "inside": ["{n}很高兴", "天气很好", "大家都很开心", "外面下着雨", "{n}数了数", "{m}在旁边看着"],
}  # fmt: skip


def _aside(story: str, rng: random.Random) -> str:
    """A training story with, half the time, an aside before it or after its first clause."""
    r = rng.random()
    if r < 0.25:
        return f"{_pick(rng, ASIDES['before'])}，{story}"
    if r < 0.5 and "，" in story:
        head, rest = story.split("，", 1)
        return f"{head}，{_pick(rng, ASIDES['inside'])}，{rest}"
    return story


def _problem(op: str, a: int, b: int, rng: random.Random, en: bool, held: bool = False) -> Problem:
    """Word `a op b` as a story (a held-out story when `held`) and work it in a trace."""
    lang = "en" if en else "zh"
    story = _pick(rng, STORIES[lang][op][1 if held else 0])
    if not (en or held):
        story = _aside(story, rng)
    if en:
        n, m, item, unit = _pick(rng, EN_NAMES), "", _pick(rng, EN_ITEMS), ""
    else:
        n, m = rng.sample(NAMES, 2)
        item, unit = _pick(rng, ITEMS)
    q = story.format(a=a, b=b, n=n, m=m, i=item, u=unit)
    v = apply_op(op, a, b)
    head = f"{OP_WORDS[lang][op]}{': ' if en else '：'}{a} {op} {b}{'.' if en else '。'}"
    tail = f"So the answer is {v}." if en else f"所以答案是 {v}。"
    return Problem(op, a, b, q, "\n".join([head, *trace(op, a, b, en), tail]))


# --- multi-turn recall -----------------------------------------------------------------------
# Long dialogues in which the user states something early (a name, a number, a city) and asks
# for it turns later, so the long-SFT stage has to use its context. Statements and questions
# come in training and held-out wordings; names and numbers in training and held-out values.

SURNAMES = "王李张刘陈杨赵黄周吴"
GIVEN_NAMES = ["小雨", "明轩", "子涵", "浩然", "思琪", "一诺", "欣怡", "俊杰", "雨桐", "宇航"]
# A training question is an opening, a form and an ending (as fact questions are); a held-out
# question is one whole sentence that eval uses as it stands. As in the fact tables, the
# held-out sentences are made of words training uses elsewhere: 来着, 提到, 你记得, 记的, 那个数
# occur in training forms of this or another slot, never in the held-out combination. 称呼 is
# in a statement ("你可以称呼我…"), not a question: a training question "你该怎么称呼我" made
# the held-out identity question "我该怎么称呼你" answer "你叫…" (identity 100 → 75 %).
# (Before, those words occurred in no training text, and each held-out question was won or
# lost as a block: README, recall.)
RECALL_SLOTS = {
    "name": {
        "say": (["我叫{v}。", "你好，我是{v}。", "我的名字是{v}。", "叫我{v}就好。",
                 "朋友们都叫我{v}。", "我先介绍一下，我叫{v}。", "你可以称呼我{v}。"],
                ["大家都叫我{v}。", "先自我介绍一下，我是{v}。"]),
        "ack": ["你好，{v}！很高兴认识你。我记住了，你叫{v}。", "好的，我记住了，你叫{v}。"],
        "ask": (["我叫什么名字", "你还记得我的名字吗", "我的名字是什么", "请问我叫什么",
                 "我刚才说我叫什么", "你知道我叫什么吗", "能再说一遍我的名字吗",
                 "我之前告诉过你我的名字，是什么", "我叫什么来着", "你记得我的名字吗",
                 "我之前提到过我的名字，是什么", "我的名字你还记得吗"],
                ["刚才我说我叫什么来着？", "你记得该怎么称呼我吗？"]),
        "reply": "你叫{v}。",
    },
    "number": {
        "say": (["我最喜欢的数字是{v}。", "请记住这个数字：{v}。", "我的幸运数字是{v}。",
                 "帮我记住这个数：{v}。", "我家的门牌号是{v}。"],
                ["帮我记一个数：{v}。", "我的房间号是{v}。"]),
        "ack": ["好的，我记住了，你说的数字是{v}。", "没问题，记下了：你说的数字是{v}。"],
        "ask": (["我最喜欢的数字是多少", "我让你记住的数字是几", "我的幸运数字是多少",
                 "请问我说的数字是多少", "我刚才说的数字是几", "你知道我的数字是多少吗",
                 "能再说一遍那个数字吗", "我之前告诉过你一个数字，是多少", "那个数是多少来着",
                 "你记得我的幸运数字吗", "我之前提到的数字是几", "我让你记的数是多少"],
                ["刚才让你记的那个数是多少？", "你还记得我说过的数字吗？"]),
        "reply": "你说的数字是{v}。",
    },
    "city": {
        "say": (["我住在{v}。", "我来自{v}。", "我现在在{v}工作。", "我家在{v}。",
                 "我明年要搬到{v}。"],
                ["我老家在{v}。", "我下个月要搬去{v}。"]),
        "ack": ["{v}是个好地方！我记住了，你说的城市是{v}。", "好的，记下了：你说的城市是{v}。"],
        "ask": (["我住在哪个城市", "我来自哪里", "我在哪座城市工作", "请问我说的城市是哪个",
                 "我刚才说的城市是哪里", "你知道我在哪个城市吗", "能再说一遍那个城市吗",
                 "我之前告诉过你一个城市，是哪个", "我住在哪个城市来着", "你记得我在哪个城市吗",
                 "我提到过一个城市，是哪个", "我说的是哪座城市", "你还记得我来自哪里吗"],
                ["你还记得我说的是哪座城市吗？", "刚才我提到的城市是哪个？"]),
        "reply": "你说的城市是{v}。",
    },
}  # fmt: skip
RECALL_OPENINGS = ["", "", "", "对了，", "请问", "嗯，", "那", "顺便问一下，", "考考你："]
RECALL_ENDINGS = ["？", "？", "?", "呢？"]  # "呢" never after a form that ends in 吗


def recall_ask(opening: str, form: str, ending: str) -> str:
    """A training recall question from its parts (请问 is not doubled; 呢 not after 吗)."""
    if form.startswith("请问") and opening == "请问":
        opening = ""
    if form.endswith("吗") and ending == "呢？":
        ending = "？"
    return opening + form + ending


def recall_asks(slot: str | None = None) -> set[str]:
    """Every training recall question (of one slot, or of all): what the tests match."""
    slots = [slot] if slot else list(RECALL_SLOTS)
    return {recall_ask(o, f, e) for s in slots for f in RECALL_SLOTS[s]["ask"][0]
            for o in RECALL_OPENINGS for e in RECALL_ENDINGS}  # fmt: skip


def recall_values(slot: str, held: bool) -> list[str]:
    """The values a slot takes in training (held=False) or only in eval (held=True)."""
    if slot == "name":
        return [s + g for i, s in enumerate(SURNAMES) for j, g in enumerate(GIVEN_NAMES)
                if ((i + j) % 5 == 0) == held]  # fmt: skip
    if slot == "number":
        return [str(n) for n in range(100 if held else 10, 1000) if (n % 7 == 3) == held]
    return [f.answer for f in FACTS if f.kind == "capital"]


def _separable(pool: list[str]) -> list[str]:
    """Wordings that may be held out: neither contains another wording of the pool nor is
    contained in one ("{t}是什么" sits inside "说说{t}是什么", so it is never held out)."""
    return [h for h in pool if not any(h != t and (h in t or t in h) for t in pool)]


RECALL_IN_SFT = 0.15  # the share of sft_512 dialogues that are short recall

# --- the generator -------------------------------------------------------------------------


class _Gen:
    """All choices come from one seeded RNG. `paired` maps (fact id, lang) to the training
    form that fact is never asked with in training (eval's new pairing); `pairs` are the
    arithmetic pairs training may use, by operator."""

    def __init__(self, rng: random.Random, pairs: dict[str, list[tuple[str, int, int]]]) -> None:
        self.rng = rng
        self.pairs = pairs
        self.paired: dict[tuple[str, str], str] = {}
        for f in FACTS:
            self.paired[(f.id, "zh")] = _pick(rng, _separable(QUESTIONS[f.kind][0]))
            if f.en_topic:
                self.paired[(f.id, "en")] = _pick(rng, _separable(EN_QUESTIONS[f.kind][0]))
        self.capitals = [f for f in FACTS if f.kind == "capital"]

    # questions and answers ----------------------------------------------------------------

    def _ask(self, forms: list[str], topic: str, en: bool, held: bool) -> str:
        lang = "en" if en else "zh"
        opening = _pick(self.rng, FACT_OPENINGS[lang][1 if held else 0])
        ending = _pick(self.rng, FACT_ENDINGS[lang])
        return compose(opening, _pick(self.rng, forms), ending, topic, en)

    def question(self, f: Fact, en: bool = False) -> str:
        """A training wording of a question about `f` (never its eval pairing)."""
        forms = (EN_QUESTIONS if en else QUESTIONS)[f.kind][0]
        skip = self.paired[(f.id, "en" if en else "zh")]
        topic = f.en_topic if en else f.topic
        return self._ask([t for t in forms if t != skip], topic, en, held=False)

    def eval_question(self, f: Fact, en: bool, split: str) -> str:
        """`unseen_family`: a held-out opening and form; `new_pairing`: the training form
        kept away from this fact."""
        topic = f.en_topic if en else f.topic
        if split == "new_pairing":
            return self._ask([self.paired[(f.id, "en" if en else "zh")]], topic, en, held=False)
        return self._ask((EN_QUESTIONS if en else QUESTIONS)[f.kind][1], topic, en, held=True)

    def answer(self, f: Fact, en: bool = False) -> str:
        n = len((EN_ANSWERS if en else ANSWERS)[f.kind])
        return answer_sentence(f, en, self.rng.randrange(n))

    def fact_turn(self, en_rate: float = 0.2, pool: list[Fact] | None = None) -> tuple:
        f = _pick(self.rng, pool or FACTS)
        en = bool(f.en_topic) and self.rng.random() < en_rate
        return self.question(f, en), self.answer(f, en), f

    def follow_up(self, prev: Fact) -> tuple[str, str, Fact]:
        """ "那X呢？" after a capital question: answerable only from the history."""
        g = _pick(self.rng, [x for x in self.capitals if x != prev])
        return f"那{g.topic}呢？", answer_sentence(g), g

    def identity_question(self, en: bool, held: bool = False) -> str:
        lang = "en" if en else "zh"
        forms = IDENTITY_FORMS[lang][1 if held else 0]
        opening = _pick(self.rng, FACT_OPENINGS[lang][1 if held else 0])
        return compose(opening, _pick(self.rng, forms), _pick(self.rng, FACT_ENDINGS[lang]), "", en)

    def identity_turn(self) -> tuple[str, str]:
        r, rng = self.rng.random(), self.rng
        if r < 0.45:
            return self.identity_question(False), _pick(rng, IDENTITY_ANSWERS)
        if r < 0.75:
            return _pick(rng, GREETINGS), _pick(rng, GREETING_ANSWERS)
        if r < 0.9:
            return self.identity_question(True), _pick(rng, EN_IDENTITY_ANSWERS)
        return _pick(rng, EN_GREETINGS), _pick(rng, EN_GREETING_ANSWERS)

    def arith_pair(self) -> tuple[str, int, int]:
        """A training pair: sums and differences twice as often as products."""
        return _pick(self.rng, self.pairs[_pick(self.rng, ["+", "+", "-", "-", "×"])])

    def arith_turn(self) -> tuple[str, str]:
        """A word problem answered directly (no reasoning): the SFT-stage baseline."""
        p = _problem(*self.arith_pair(), self.rng, en=False)
        return p.question, f"{p.expr} = {p.value}，答案是{p.value}。"

    def say(self, slot: str, held: bool = False, held_value: bool = False) -> tuple[str, str, str]:
        """(statement, acknowledgement, value) of a recall slot: a held-out statement wording
        when `held`, a held-out value when `held_value`."""
        spec = RECALL_SLOTS[slot]
        v = _pick(self.rng, recall_values(slot, held_value))
        q = _pick(self.rng, spec["say"][1 if held else 0]).format(v=v)
        return q, _pick(self.rng, spec["ack"]).format(v=v), v

    def ask(self, slot: str, v: str, held: bool = False) -> tuple[str, str]:
        spec, rng = RECALL_SLOTS[slot], self.rng
        if held:  # a held-out question is one whole sentence
            q = _pick(rng, spec["ask"][1])
        else:
            opening, form = _pick(rng, RECALL_OPENINGS), _pick(rng, spec["ask"][0])
            q = recall_ask(opening, form, _pick(rng, RECALL_ENDINGS))
        return q, spec["reply"].format(v=v)

    # records -------------------------------------------------------------------------------

    def pretrain(self) -> dict:
        """A short encyclopedia article: facts of one kind, or identity, or arithmetic."""
        rng = self.rng
        r = rng.random()
        if r < 0.08:
            body = _pick(
                rng,
                [
                    "SpongeBob 是一个乐于助人的人工智能助手。当有人问“你是谁”时，它会回答："
                    + _pick(rng, IDENTITY_ANSWERS),
                    "SpongeBob 是一个从零开始训练的小型语言模型。它能回答关于首都、地理、科学和"
                    "历史的常识问题，也会一步一步地做简单的算术题。",
                    "SpongeBob is a small AI assistant trained from scratch. "
                    + EN_IDENTITY_ANSWERS[0],
                ],
            )
            return {"text": f"<s>{body}</s>"}
        if r < 0.17:
            lines = []
            for _ in range(rng.randint(4, 8)):
                if rng.random() < 0.5:  # the single-digit facts the traces are built from
                    op, a, b = _pick(rng, ["+", "-"]), rng.randint(0, 9), rng.randint(0, 9)
                    if op == "-":
                        a += 10 * rng.randint(0, 1)
                        a, b = max(a, b), min(a, b)
                else:  # products only of training pairs: eval's are never stated
                    op, a, b = self.arith_pair()
                word = {"+": "加", "-": "减", "×": "乘以"}[op]
                v = apply_op(op, a, b)
                lines.append(_pick(rng, [f"{a}{word}{b}等于{v}。", f"{a} {op} {b} = {v}。"]))
            return {"text": "<s>算术练习：" + "".join(lines) + "</s>"}
        # Worked problems 18 % and profiles 20 % (13 and 10 % before): both copy a value out of
        # the context, which this model learns only after a few hundred steps and not in every
        # run; with more of them the distilled model miscopied no operand (README, demo).
        if r < 0.35:
            return {"text": "<s>" + "\n\n".join(self.worked_problem() for _ in range(2)) + "</s>"}
        if r < 0.55:
            return {"text": f"<s>{self.profile()}</s>"}
        if r < 0.60:
            lang = "en" if rng.random() < 0.3 else "zh"
            sents = rng.sample(EVERYDAY[lang], rng.randint(3, 6))
            head = "Everyday English: " if lang == "en" else "日常用语："
            return {"text": "<s>" + head + " ".join(sents) + "</s>"}
        kind = _pick(rng, ["capital", "capital", "thing", "thing", "who", "year"])
        pool = [f for f in FACTS if f.kind == kind]
        chosen = rng.sample(pool, min(len(pool), rng.randint(3, 6)))
        english = [f for f in chosen if f.en_topic]
        if english and rng.random() < 0.2:
            sents = [
                _fmt(_pick(rng, EN_ENCYCLOPEDIA[kind]), f.en_topic, f.en_answer) for f in english
            ]
            return {"text": f"<s>{EN_SECTION_TITLES[kind]}. " + " ".join(sents) + "</s>"}
        sents = [_fmt(_pick(rng, ENCYCLOPEDIA[kind]), f.topic, f.answer) for f in chosen]
        return {"text": f"<s>{_pick(rng, SECTION_TITLES[kind])}：" + "".join(sents) + "</s>"}

    def worked_problem(self) -> str:
        """A textbook example: a training word problem and its worked solution as plain text,
        so pretraining already sees numbers carried from a story into a digit-by-digit trace."""
        p = _problem(*self.arith_pair(), self.rng, en=False)
        return f"例题：{p.question}\n解：{p.think}\n答：{p.value}。"

    def profile(self) -> str:
        """A short profile and questions on it (reading comprehension): a name, a city and a
        number stated once and asked for later, the shape of recall (attending back to a value
        given earlier). The model learns that only after a few hundred steps: numbers
        first, cities later (benchmarks/copy_curve.py). Training values only."""
        rng = self.rng
        name = _pick(rng, recall_values("name", False))
        city, number = _pick(rng, self.capitals).answer, _pick(rng, recall_values("number", False))
        facts = [(f"{name}住在{city}。", f"{name}住在哪里？", city),
                 (f"{name}最喜欢的数字是{number}。", f"{name}最喜欢的数字是多少？", number),
                 (f"{name}的房间号是{number}。", f"{name}的房间号是多少？", number)]  # fmt: skip
        stated = rng.sample(facts[:2], 2) if rng.random() < 0.7 else [facts[0], facts[2]]
        filler = [answer_sentence(f) for f in rng.sample(FACTS, rng.randint(1, 3))]
        asked = rng.sample(stated, len(stated))
        qa = "".join(f"问：{q}答：{a}。" for _, q, a in asked)
        return f"{name}的小档案：" + "".join(s for s, _, _ in stated) + "".join(filler) + qa

    def sft_512(self) -> dict:
        """One to three exchanges (facts, identity and greetings, a capital with a follow-up,
        a word problem answered directly): several exchanges share one system prompt, which
        is most of a one-question conversation's tokens."""
        if self.rng.random() < RECALL_IN_SFT:
            return _conv(*self.short_recall())
        turns: list[tuple[str, str]] = []
        for _ in range(_pick(self.rng, [1, 1, 2, 2, 3])):
            r = self.rng.random()
            if r < 0.72:
                turns.append(self.fact_turn()[:2])
            elif r < 0.87:
                turns.append(self.identity_turn())
            elif r < 0.95:
                q, a, f = self.fact_turn(en_rate=0, pool=self.capitals)
                fq, fa, _ = self.follow_up(f)
                turns += [(q, a), (fq, fa)]
                if self.rng.random() < 0.5:
                    turns.append(_pick(self.rng, THANKS[:2]))
            else:
                turns.append(self.arith_turn())
        return _conv(*turns)

    def short_recall(self) -> list[tuple[str, str]]:
        """A statement, up to two short exchanges, then the question about it: recall at a
        distance of tens of tokens, in the chat template. It teaches the slots and their
        questions; it does not keep pretraining's raw-text copying (the copy probe on the SFT
        model: numbers 2.5 % with it, 0 % without, 97.5–100 % before SFT)."""
        slot = _pick(self.rng, list(RECALL_SLOTS))
        q, a, v = self.say(slot)
        fillers = [self.fact_turn(en_rate=0.1)[:2] for _ in range(self.rng.randint(0, 2))]
        return [(q, a), *fillers, self.ask(slot, v)]

    def long_answer(self) -> tuple[str, str]:
        """A list answer of 12–27 facts: the long replies the 1024 stage is for."""
        rng = self.rng
        kind = _pick(rng, ["capital", "capital", "thing", "mixed"])
        if kind == "capital":
            chosen = rng.sample(self.capitals, rng.randint(12, len(self.capitals)))
            if rng.random() < 0.2:
                names = ", ".join(f.en_topic for f in chosen)
                lines = [f"{i}. {answer_sentence(f, en=True)}" for i, f in enumerate(chosen, 1)]
                return (
                    f"List the capitals of these countries: {names}.",
                    "Here they are:\n" + "\n".join(lines),
                )
            q = "请依次说出这些国家的首都：" + "、".join(f.topic for f in chosen) + "。"
            lines = [f"{i}. {answer_sentence(f)}" for i, f in enumerate(chosen, 1)]
            return q, "好的，依次如下：\n" + "\n".join(lines) + "\n以上就是这些国家的首都。"
        pool = [f for f in FACTS if f.kind != "capital"] if kind == "thing" else list(FACTS)
        chosen = rng.sample(pool, rng.randint(12, 20))
        q = _pick(
            rng,
            [
                "给我讲讲你知道的常识吧，越多越好。",
                "请列举一些地理、科学和历史方面的常识。",
                "我在准备知识竞赛，请帮我整理一份常识清单。",
            ],
        )
        lines = [f"{i}. {answer_sentence(f)}" for i, f in enumerate(chosen, 1)]
        return q, "当然可以，下面是一些常识：\n" + "\n".join(lines) + "\n希望这些对你有帮助！"

    def filler(
        self, prev: Fact | None, long_ok: bool = True
    ) -> tuple[tuple[str, str], Fact | None]:
        """One turn of a long dialogue that needs no earlier turn (or only the previous one)."""
        r = self.rng.random()
        if r < 0.1 and long_ok:
            return self.long_answer(), None
        if r < 0.7:
            q, a, f = self.fact_turn(en_rate=0.1)
            return (q, a), f
        if r < 0.82 and prev is not None and prev.kind == "capital":
            q, a, f = self.follow_up(prev)
            return (q, a), f
        if r < 0.94:
            return self.arith_turn(), None
        return _pick(self.rng, THANKS[:2]), None

    def sft_1024(self) -> dict:
        """A multi-turn dialogue of 200–550 estimated tokens (about 250–800 real ones) in which
        the user, after an opening question or greeting (a dialogue that opens with a statement
        teaches a lone question to be acknowledged), states one to three things (a name, a
        number, a city), mostly early, and asks for each of them two to five turns later, some
        twice: recall that needs the context, several times per dialogue, so the stage sees
        many examples of it for its compute.
        Between them: facts, follow-ups, identity, small talk, arithmetic, a list answer."""
        rng = self.rng
        turns: list[tuple[str, str]] = [self.identity_turn()] if rng.random() < 0.3 else []
        slots = rng.sample(list(RECALL_SLOTS), rng.randint(1, 3))
        pending: list[list] = []  # [slot, value, turns still to wait]
        target = rng.randint(200, 550)
        prev: Fact | None = None
        while slots or pending or _estimate_tokens(turns) < target:
            due = [p for p in pending if p[2] <= 0]
            if due:
                slot, v, _ = due[0]
                pending.remove(due[0])
                turns.append(self.ask(slot, v))
                if rng.random() < 0.3:  # asked again later
                    pending.append([slot, v, rng.randint(2, 4)])
                continue
            if slots and turns and rng.random() < 0.5:
                slot = slots.pop(0)
                q, a, v = self.say(slot)
                turns.append((q, a))
                pending.append([slot, v, rng.randint(2, 5)])
                continue
            if rng.random() < 0.1:
                turn, prev = self.identity_turn(), None
            else:
                turn, prev = self.filler(prev, long_ok=_estimate_tokens(turns) < 350)
            turns.append(turn)
            for p in pending:
                p[2] -= 1
        return _conv(*turns)

    def r1(self) -> dict:
        """Word problems worked step by step, mixed (as MiniMind's r1_mix is) with facts,
        identity and greetings in the same format, so distillation keeps what SFT taught and
        reason mode answers every kind of prompt with <think> and <answer>."""
        rng = self.rng
        r = rng.random()
        if r < 0.5:
            p = _problem(*self.arith_pair(), rng, en=rng.random() < 0.15)
            return _conv((p.question, reasoning(p.think, str(p.value))))
        if r < 0.85:
            q, a, f = self.fact_turn(en_rate=0.25)
            return _conv((q, self.fact_reasoning(q, a, f)))
        if r < 0.95:
            en = rng.random() < 0.25
            answer = _pick(rng, EN_IDENTITY_ANSWERS if en else IDENTITY_ANSWERS)
            return _conv((self.identity_question(en), identity_reasoning(answer, en)))
        think = "用户在打招呼。\n我应该友好地回应。"
        return _conv((_pick(rng, GREETINGS), reasoning(think, _pick(rng, GREETING_ANSWERS))))

    def fact_reasoning(self, q: str, a: str, f: Fact) -> str:
        """The distillation reply to a fact question: the fact recalled at once, as the sentence
        SFT answers with, then the answer. A first line that restates the question's topic
        ("用户问的是…") had to copy it out of the question, which this model size does not
        learn in the demo's budget: it named the wrong country in half the unseen wordings."""
        if q.isascii():
            return reasoning(f"I remember: {answer_sentence(f, True)}", a)
        return reasoning(f"我记得{answer_sentence(f)}", a)

    def dpo_pair(self, held: bool) -> dict:
        """A preference pair on a fact question (or, one in five, an identity question): both
        replies reason and answer alike; the chosen one adds a sign-off (`SIGN_OFF`) that no
        other file teaches, so the preference is learned from the pairs alone. Identity pairs
        keep DPO's SFT term from teaching every prompt a fact's reply (identity fell from 100 %
        to 8 % with fact pairs alone). `held` asks in an unseen wording family (eval)."""
        rng = self.rng
        if rng.random() < 0.2:
            en = rng.random() < 0.25
            q = self.identity_question(en, held=held)
            a = (EN_IDENTITY_ANSWERS if en else IDENTITY_ANSWERS)[0 if held else rng.randrange(2)]

            def reply(text: str) -> str:
                return identity_reasoning(text, en)
        else:
            f = _pick(rng, FACTS)
            en = bool(f.en_topic) and rng.random() < 0.15
            q = self.eval_question(f, en, "unseen_family") if held else self.question(f, en)
            a = answer_sentence(f, en) if held else self.answer(f, en)

            def reply(text: str) -> str:
                return self.fact_reasoning(q, text, f)

        return _signed_pair(q, a, reply, en)

    def dpo_arith_pair(self) -> dict:
        """A preference pair on a training word problem: the worked trace and its answer in both
        replies, the sign-off in the chosen one. DPO's SFT term replays the chosen reply, so
        without these pairs the traces were forgotten (arithmetic 47.5 → 10 % in the demo)."""
        en = self.rng.random() < 0.15
        p = _problem(*self.arith_pair(), self.rng, en=en)
        return _signed_pair(p.question, str(p.value), lambda text: reasoning(p.think, text), en)

    def grpo_prompt(self) -> dict:
        """A training word problem as an RL prompt: the question and the reference answer that
        the `arithmetic` reward compares the reply's `<answer>` with."""
        p = _problem(*self.arith_pair(), self.rng, en=self.rng.random() < 0.15)
        return {"conversations": [_user(p.question)], "answer": str(p.value)}

    def recall_eval(self, held: bool) -> tuple[list[dict], str, str]:
        """A dialogue that states one slot, runs 3–5 other turns, one of them a list answer,
        then asks for it: the prompt is 250–750 tokens (median ~350 with the demo's tokenizer),
        past the 256-token windows SFT trains on, so the score measures what long SFT adds."""
        slot = _pick(self.rng, list(RECALL_SLOTS))
        q, a, v = self.say(slot, held, held_value=True)
        turns = [(q, a)]
        prev = None
        n = self.rng.randint(3, 5)
        at = self.rng.randrange(n)
        for i in range(n):
            turn, prev = (self.long_answer(), None) if i == at else self.filler(prev, False)
            turns.append(turn)
        turns.append(self.ask(slot, v, held))
        return _conv(*turns)["conversations"], slot, v

    def eval_records(self, eval_pairs: list[tuple[str, int, int]]) -> list[dict]:
        """Every fact in an unseen wording family and as a new pairing (Chinese; capitals also
        in English), identity in held-out wordings, word problems on number pairs training
        never uses (half in training stories, half in held-out ones), and recall dialogues
        with held-out values (in held-out wordings, or in training ones)."""
        out = []
        for split in ("unseen_family", "new_pairing"):
            for f in FACTS:
                rec = _conv((self.eval_question(f, False, split), answer_sentence(f)))
                out.append({**rec, "answer": f.answer, "task": "fact", "split": split,
                            "id": f.id, "lang": "zh"})  # fmt: skip
            for f in self.capitals:
                rec = _conv((self.eval_question(f, True, split), answer_sentence(f, en=True)))
                out.append({**rec, "answer": f.en_answer, "task": "fact", "split": split,
                            "id": f.id, "lang": "en"})  # fmt: skip
        for i in range(12):
            en = i % 3 == 2
            q = self.identity_question(en, held=True)
            ref = EN_IDENTITY_ANSWERS[0] if en else IDENTITY_ANSWERS[0]
            out.append({**_conv((q, ref)), "answer": IDENTITY_NAME, "task": "identity",
                        "split": "unseen_family", "id": f"identity:{i}",
                        "lang": "en" if en else "zh"})  # fmt: skip
        for i, (op, a, b) in enumerate(eval_pairs):
            en, held = i % 6 == 5, i % 2 == 0
            p = _problem(op, a, b, self.rng, en=en, held=held)
            rec = _conv((p.question, reasoning(p.think, str(p.value))))
            split = "unseen_family" if held else "new_pairing"
            lang = "en" if en else "zh"
            out.append({**rec, "answer": str(p.value), "task": "arith", "split": split,
                        "id": f"arith:{p.expr}", "expr": p.expr, "lang": lang})  # fmt: skip
        for i in range(SIZES["eval_recall"]):
            held = i % 3 != 2
            msgs, slot, v = self.recall_eval(held)
            out.append({"conversations": msgs, "answer": v, "task": "recall",
                        "split": "unseen_family" if held else "new_pairing",
                        "id": f"recall:{slot}:{i}", "lang": "zh"})  # fmt: skip
        return out


def _signed_pair(question: str, answer: str, reply: Callable[[str], str], en: bool) -> dict:
    """A DPO pair whose replies differ only by the sign-off after `answer` (in the chosen one)."""
    user = _user(question)
    return {
        "chosen": [user, _assistant(reply(f"{answer} {SIGN_OFF['en' if en else 'zh']}"))],
        "rejected": [user, _assistant(reply(answer))],
    }


def _estimate_tokens(turns: list[tuple[str, str]]) -> int:
    """Rough token count of a conversation under a tokenizer trained on this corpus (vocab
    2048–6400; fitted on generated data): ~0.33 tokens a character (the corpus repeats whole
    phrases, which BPE merges), ~12 per turn for the template, ~20 for the system prompt."""
    chars = sum(len(q) + len(a) for q, a in turns)
    return int(chars * 0.33) + 12 * len(turns) + 20


# Record counts at scale 1.0; eval is not scaled (see `generate`).
SIZES = {
    "pretrain": 15000,
    "sft_512": 6000,
    "sft_1024": 700,
    "sft_replay": 1500,  # short SFT dialogues replayed in sft_1024 (see `generate`)
    "r1_1024": 10000,
    # 72 held-out problems in each half (held-out stories, training stories): with 40, one
    # problem was 2.5 points and the sampling spread alone ±8 points at 50 % (README: runs).
    "eval_arith": {"+": 64, "-": 64, "×": 16},
    "eval_recall": 45,
    "tool": 2400,
    "dpo": 600,
    # 600, not 200: from two distilled models DPO then kept or raised arithmetic (50.0 → 70.0 and
    # 67.5 → 70.0 %) where 200 lost or kept it (→ 42.5, 67.5), at ≥ 92 % preference (README).
    "dpo_arith": 600,
    "dpo_eval": 100,
    "grpo": 400,
}
FILES = ("pretrain", "sft_512", "sft_1024", "r1_1024", "eval", "dpo", "dpo_eval", "grpo")
# The style the DPO pairs prefer: a closing line after the answer (only dpo.jsonl has it).
SIGN_OFF = {"zh": "希望这个回答对你有帮助！", "en": "Hope this helps!"}


def _eval_pairs(rng: random.Random, pairs: dict) -> list[tuple[str, int, int]]:
    """Held-out number pairs: sums and differences of two two-digit numbers (so no trace line
    of a training problem, which works single digits, states them), and products held out in
    both orders (squares stay in training: a held-out count of a unit is then always a
    prefix of a trained one)."""
    n = SIZES["eval_arith"]
    out = rng.sample([p for p in pairs["+"] if p[1] >= 10 and p[2] >= 10], n["+"])
    out += rng.sample([p for p in pairs["-"] if p[2] >= 10], n["-"])
    unordered = [(a, b) for a in range(2, 10) for b in range(a + 1, 10)]
    for a, b in rng.sample(unordered, n["×"] // 2):
        out += [("×", a, b), ("×", b, a)]
    rng.shuffle(out)
    return out


def generate(
    out_dir: Path | str, seed: int = 0, scale: float = 1.0, template: str = "minimind2"
) -> dict[str, Path]:
    """Write the demo files (`FILES`) into `out_dir` and return `{name: path}`.

    `scale` multiplies the number of training records; the fact table and the eval set stay
    whole so accuracy means the same at every scale. `seed` drives every choice: the same
    `(seed, scale, template)` gives byte-identical files. `template="chatml"` writes the same
    corpus in MiniMind-3's form (`reasoning_content` instead of tags in the content) and adds
    calculator tool use (`tool_records`) to SFT, distillation and eval.
    """
    if template not in ("minimind2", "chatml"):
        raise ValueError(f"template must be minimind2 or chatml, not {template!r}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, not {scale}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    pairs = all_pairs()
    eval_pairs = _eval_pairs(rng, pairs)
    held = set(eval_pairs)
    train_pairs = {op: [p for p in ps if p not in held] for op, ps in pairs.items()}
    gen = _Gen(rng, train_pairs)

    def many(fn: Callable[[], dict], name: str) -> list[dict]:
        return [fn() for _ in range(max(1, round(SIZES[name] * scale)))]

    files = {
        "pretrain": many(gen.pretrain, "pretrain"),
        "sft_512": many(gen.sft_512, "sft_512"),
        "sft_1024": many(gen.sft_1024, "sft_1024"),
        "r1_1024": many(gen.r1, "r1_1024"),
        "eval": gen.eval_records(eval_pairs),
    }
    # Post-training data from its own stream, so the files above stay as they were; it keeps
    # the main generator's pairings, so no fact is asked in the form its eval pairing holds.
    post = _Gen(random.Random(seed + 2), train_pairs)
    post.paired = gen.paired
    files["dpo"] = many(lambda: post.dpo_pair(held=False), "dpo")
    files["dpo_eval"] = [post.dpo_pair(held=True) for _ in range(SIZES["dpo_eval"])]
    files["grpo"] = many(post.grpo_prompt, "grpo")
    # Short SFT dialogues replayed in long SFT, from a stream of their own (the files above stay
    # as they were) and with the main generator's pairings. They fill the gaps that packing
    # leaves in rows of 1024 (133 rows an epoch instead of 130) and keep single questions
    # answered: two epochs of long SFT from one SFT checkpoint cost 14.9 points of facts
    # without them and 9.6 with them, at the same recall; after distillation the two are
    # level again (README: recall).
    short = _Gen(random.Random(seed + 4), train_pairs)
    short.paired = gen.paired
    files["sft_1024"] += many(short.sft_512, "sft_replay")
    # Arithmetic pairs from a stream of their own, so the pairs above stay as they were.
    replay = _Gen(random.Random(seed + 3), train_pairs)
    files["dpo"] += many(replay.dpo_arith_pair, "dpo_arith")
    if template == "chatml":
        trng = random.Random(seed + 1)  # its own stream: the minimind2 files stay as they were
        flat = [p for ps in train_pairs.values() for p in ps]
        n_tool = max(1, round(SIZES["tool"] * scale))
        # Calculator dialogues (≈ 300 tokens with the tools block) go where rows are 512 long:
        # long SFT and distillation, which also keeps them from being forgotten.
        files["sft_1024"] += tool_records(trng, flat, n_tool // 4, TOOL_PARTS)
        files["r1_1024"] += tool_records(trng, flat, n_tool, TOOL_PARTS)
        files["eval"] += tool_records(trng, eval_pairs, None, EVAL_TOOL_PARTS, eval_set=True)
        for name in ("sft_512", "sft_1024", "r1_1024", "eval"):
            files[name] = [to_chatml(rec) for rec in files[name]]
        for name in ("dpo", "dpo_eval"):
            files[name] = [
                {k: to_chatml({"conversations": rec[k]})["conversations"] for k in rec}
                for rec in files[name]
            ]
    _check_held_out(files)
    paths = {}
    for name in FILES:
        paths[name] = out / f"{name}.jsonl"
        _write(paths[name], files[name])
    return paths


# --- the chatml family: reasoning_content and calculator tool use -----------------------

CALC_OPS = {"+": "+", "-": "-", "×": "*"}
# Calculator requests are composed from interchangeable parts (opening, request with {e} for
# the expression, a mention of the tool, ending), in Chinese and English. Eval composes its
# wordings from other openings and requests: whole families training never shows.
TOOL_PARTS = {
    "zh": (
        ["", "你好，", "请问，", "麻烦你，", "嗨，", "老师，"],
        [
            "用计算器算一下 {e}",
            "帮我计算 {e}",
            "算算 {e}",
            "{e} 等于多少",
            "{e} 的结果是多少",
            "请计算 {e}",
            "我想算 {e}",
            "{e} 得几",
        ],
        ["", "，用工具", "，请调用计算器", "（用计算器）", "，调用 calc"],
        ["。", "？", "", "！"],
    ),
    "en": (
        ["", "Hi, ", "Hey, ", "Hello! ", "Quick one: "],
        [
            "calculate {e}",
            "what is {e}",
            "compute {e}",
            "work out {e}",
            "tell me {e}",
            "how much is {e}",
            "find {e}",
        ],
        ["", " with the calculator", " using the tool", " (use calc)", " via the calc tool"],
        [".", "?", "", "!"],
    ),
}
EVAL_TOOL_PARTS = {
    "zh": (
        ["劳驾，", "打扰一下，"],
        ["求 {e} 的值", "{e} 是多少呢", "帮忙求一下 {e}"],
        ["，用计算器", ""],
        ["。", "？"],
    ),
    "en": (
        ["Could you ", "Please "],
        ["evaluate {e}", "figure out {e}", "give me the value of {e}"],
        [" with the calculator", ""],
        ["?", "."],
    ),
}


def tool_wording(rng: random.Random, parts: dict, en: bool) -> str:
    opening, requests, tools, endings = parts["en" if en else "zh"]
    text = rng.choice(opening) + rng.choice(requests) + rng.choice(tools) + rng.choice(endings)
    return text[0].upper() + text[1:] if en else text


def tool_records(
    rng: random.Random,
    pairs: list[tuple[str, int, int]],
    n: int | None,
    parts: dict,
    eval_set: bool = False,
) -> list[dict]:
    """Calculator dialogues: the user asks for an expression, the assistant calls
    `calc({"expr": ...})`, the tool answers, the assistant states the result. `n` records
    drawn from `pairs` (None: one per pair). Eval records stop before the call and carry the
    value as `answer` (task "tool": the reply must call calc with an expression of that value).
    """
    from spongebob.tools import CALC_SCHEMA

    chosen = pairs if n is None else [rng.choice(pairs) for _ in range(n)]
    out = []
    for op, a, b in chosen:
        sym = CALC_OPS[op]
        shown = rng.choice([f"{a}{op}{b}", f"{a} {op} {b}", f"{a} {sym} {b}", f"{a}{sym}{b}"])
        expr = f"{a}{sym}{b}"
        value = str(apply_op(op, a, b))
        wording = tool_wording(rng, parts, en=rng.random() < 0.4)
        user = {"role": "user", "content": wording.format(e=shown)}
        call = {"type": "function", "function": {"name": "calc", "arguments": {"expr": expr}}}
        if eval_set:
            msgs = [user, {"role": "assistant", "content": "", "tool_calls": [call]}]
            out.append({"conversations": msgs, "tools": [CALC_SCHEMA], "answer": value,
                        "task": "tool", "id": f"tool:{expr}", "expr": expr})  # fmt: skip
            continue
        msgs = [
            user,
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": value},
            {"role": "assistant", "content": f"{a} {op} {b} = {value}。"},
        ]
        out.append({"conversations": msgs, "tools": [CALC_SCHEMA]})
    return out


def to_chatml(rec: dict) -> dict:
    """A record in MiniMind-3's form: an assistant turn `<think>T</think><answer>A</answer>`
    becomes `{"reasoning_content": T, "content": A}`."""
    from spongebob.generate import parse_reasoning

    if "conversations" not in rec:
        return rec
    msgs = []
    for m in rec["conversations"]:
        content = m.get("content") or ""
        if m["role"] == "assistant" and content.lstrip().startswith("<think>"):
            r = parse_reasoning(content)
            m = {**m, "reasoning_content": r.think, "content": r.answer}
        msgs.append(m)
    return {**rec, "conversations": msgs}


def _write(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _check_held_out(files: dict[str, list[dict]]) -> None:
    """Fail loudly if an eval prompt leaked into training (a wording-table mistake): no eval
    question occurs as a training user turn, and no recall value in any training turn."""
    turns = [
        m["content"] or ""
        for name in ("sft_512", "sft_1024", "r1_1024", "dpo", "grpo")
        for rec in files[name]
        for m in rec.get("conversations") or rec["chosen"]
        if m["role"] == "user"
    ]
    seen = set(turns)
    everything = "\n".join(turns)
    for rec in files["eval"]:
        users = [m["content"] for m in rec["conversations"] if m["role"] == "user"]
        if rec.get("task") == "recall":
            # Names and numbers are held-out values; cities are the fact table's, so only the
            # wordings of their statement and question are new.
            if not rec["id"].startswith("recall:city") and rec["answer"] in everything:
                raise AssertionError(f"recall value {rec['answer']!r} also occurs in training")
        elif users[-1] in seen:
            raise AssertionError(f"eval prompt {users[-1]!r} also occurs in training data")
    for rec in files["dpo_eval"]:
        if rec["chosen"][-2]["content"] in seen:
            raise AssertionError(f"held-out DPO prompt {rec['chosen'][-2]['content']!r} is trained")
