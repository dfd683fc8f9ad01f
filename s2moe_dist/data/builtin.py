"""The built-in corpus: English-like text over the text8 alphabet, generated here.

A small hand-written lexicon and a toy grammar (noun phrases, past-tense verb phrases,
prepositional phrases, conjunctions, years spelled out digit by digit as text8 does) driven by
a seeded ``random.Random``: the same bytes on every machine, Python version and rank, no
download. Word frequencies are Zipf-like within each word class, so a character model has
real structure to learn (spelling, word order, agreement of articles), far below the 4.1 bits
of a unigram model, while the quickstart needs no data at all.
"""
from __future__ import annotations

import bisect
import functools
import random
from typing import List, Sequence

import numpy as np

from .vocab import TEXT8_BYTE_TO_ID

DEFAULT_CHARS = 1_500_000
DEFAULT_SEED = 1234

_W = {
    "det": "the the the a a this that every each some no another",
    "adj": "old new great small large early late first last main young ancient northern "
           "southern eastern western common modern royal local public early famous strong "
           "long short high low dark bright free wild quiet rich poor green red black white "
           "simple major minor central final single",
    "noun": "city king river war church people state world country army book island music "
            "language town empire school name system period century battle law game film "
            "party family station house garden ship road bridge mountain village forest "
            "temple market song story team leader student writer painter doctor farmer "
            "soldier council tower castle valley harbour museum library university theory "
            "process method machine engine computer number model form group society",
    "name": "john mary paris london rome france england germany china india egypt greece "
            "spain italy russia japan america europe africa alexander william henry charles "
            "elizabeth napoleon caesar newton darwin plato aristotle",
    "tverb": "built found wrote defeated founded destroyed described published opened "
             "ruled used studied visited discovered created joined won lost captured "
             "reached replaced controlled supported followed named changed produced held "
             "left moved",
    "iverb": "died lived arrived returned fell grew remained began ended appeared worked "
             "travelled failed rose survived",
    "adv": "later again also often quickly slowly soon together finally early never still",
    "prep": "in in of of of near with from after before during under across along against",
    "conj": "and and but while because although",
    "pron": "he she it they we",
    "digit": "zero one two three four five six seven eight nine",
}
_WORDS = {k: v.split() for k, v in _W.items()}


class _Chooser:
    """Zipf-weighted choice over a word list using only ``rng.random()`` (stable across
    Python versions, unlike ``choices``/``randrange`` whose algorithms may change)."""

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        total, self.cum = 0.0, []
        for rank in range(len(self.words)):
            total += 1.0 / (rank + 1)
            self.cum.append(total)
        self.total = total

    def __call__(self, rng: random.Random) -> str:
        i = bisect.bisect_right(self.cum, rng.random() * self.total)
        return self.words[min(i, len(self.words) - 1)]


_PICK = {k: _Chooser(v) for k, v in _WORDS.items()}


def _uniform(rng: random.Random, options: Sequence[str]) -> str:
    return options[min(int(rng.random() * len(options)), len(options) - 1)]


def _plural(noun: str) -> str:
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def _article(out: List[str]) -> None:
    """'a' -> 'an' before a vowel, fixed up once the next word is known."""
    if len(out) >= 2 and out[-2] == "a" and out[-1][0] in "aeiou":
        out[-2] = "an"


def _noun_phrase(rng: random.Random, out: List[str], depth: int = 0) -> bool:
    """Append a noun phrase; returns True when it is plural."""
    r = rng.random()
    if r < 0.15:
        out.append(_PICK["name"](rng))
        return False
    plural = r > 0.8
    if plural:
        det = "the" if rng.random() < 0.3 else _uniform(rng, ("many", "some", "these", "two", "three"))
    else:
        det = _PICK["det"](rng)
    out.append(det)
    for _ in range(int(rng.random() < 0.45) + int(rng.random() < 0.1)):
        out.append(_PICK["adj"](rng))
        _article(out)
    noun = _PICK["noun"](rng)
    out.append(_plural(noun) if plural else noun)
    _article(out)
    if depth == 0 and rng.random() < 0.2:
        out.append(_PICK["prep"](rng))
        _noun_phrase(rng, out, depth + 1)
    return plural


def _year(rng: random.Random, out: List[str]) -> None:
    year = 1000 + int(rng.random() * 1000)
    out.extend(_WORDS["digit"][int(c)] for c in str(year))


def _clause(rng: random.Random, out: List[str]) -> None:
    if rng.random() < 0.2:
        pron = _PICK["pron"](rng)
        out.append(pron)
        plural = pron in ("they", "we")
    else:
        plural = _noun_phrase(rng, out)
    r = rng.random()
    if r < 0.55:
        out.append(_PICK["tverb"](rng))
        _noun_phrase(rng, out)
    elif r < 0.8:
        out.append(_PICK["iverb"](rng))
        if rng.random() < 0.4:
            out.append(_PICK["adv"](rng))
    else:
        out.append(_uniform(rng, ("were", "are", "became") if plural else ("was", "is", "became")))
        if rng.random() < 0.5:
            out.append(_PICK["adj"](rng))
        elif plural:
            out.append(_plural(_PICK["noun"](rng)))
        else:
            out.append(_uniform(rng, ("a", "the")))
            out.append(_PICK["noun"](rng))
            _article(out)
    if rng.random() < 0.35:
        out.append(_PICK["prep"](rng))
        _noun_phrase(rng, out, 1)
    if rng.random() < 0.15:
        out.append("in")
        _year(rng, out)


def generate_text(num_chars: int = DEFAULT_CHARS, seed: int = DEFAULT_SEED) -> str:
    """Exactly ``num_chars`` characters of generated text over a-z and space."""
    rng = random.Random(seed)
    parts: List[str] = []
    length = 0
    while length < num_chars:
        words: List[str] = []
        _clause(rng, words)
        if rng.random() < 0.3:
            words.append(_PICK["conj"](rng))
            _clause(rng, words)
        sentence = " " + " ".join(words)
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)[:num_chars]


@functools.lru_cache(maxsize=4)
def builtin_tokens(num_chars: int = DEFAULT_CHARS, seed: int = DEFAULT_SEED) -> np.ndarray:
    """The built-in corpus as read-only text8 ids (uint8), generated once per process."""
    if num_chars < 1:
        raise ValueError(f"builtin_chars={num_chars!r} is invalid: must be an integer >= 1")
    raw = np.frombuffer(generate_text(num_chars, seed).encode("ascii"), dtype=np.uint8)
    ids = TEXT8_BYTE_TO_ID[raw]
    ids.setflags(write=False)
    return ids
