"""Earnings-call sentences with their own vocabulary, as SPGISpeech's are.

Numbers are spelled out as words (LibriSpeech transcripts hold no digits) and tickers
are read letter by letter: the transcript has single-letter words (``N V D A``).
espeak-ng says a lone upper-case letter by its name except ``A``, which it reads as
the article, so the spoken form gives ``A`` as a phoneme string.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from merge_core.app.corpus.text import Sentence

_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"))
# espeak-ng phoneme input: the letter name "ay", which plain "A" would not give
_LETTER_A = "[['eI]]"


def number_words(n: int) -> str:
    """``n`` (0 <= n < 10**12) in words, without "and", as American speakers read it.

    >>> number_words(0), number_words(15), number_words(40), number_words(1234567)
    ('zero', 'fifteen', 'forty', 'one million two hundred thirty four thousand five hundred sixty seven')
    """
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    scale, name = next((s, name) for s, name in _SCALES if n >= s)
    rest = "" if n % scale == 0 else " " + number_words(n % scale)
    return f"{number_words(n // scale)} {name}{rest}"


def decimal_words(value: float, places: int = 1) -> str:
    """``value`` rounded to ``places`` decimals, read digit by digit after "point".

    >>> decimal_words(12.5), decimal_words(3.0), decimal_words(0.25, 2)
    ('twelve point five', 'three', 'zero point two five')
    """
    whole, _, fraction = f"{value:.{places}f}".partition(".")
    fraction = fraction.rstrip("0")
    digits = " ".join(_ONES[int(d)] for d in fraction)
    return number_words(int(whole)) + (f" point {digits}" if digits else "")


def year_words(year: int) -> str:
    """A year as it is said: ``2024`` is "twenty twenty four", ``2005`` "two thousand five".

    >>> year_words(2024), year_words(2005), year_words(2010)
    ('twenty twenty four', 'two thousand five', 'twenty ten')
    """
    if year % 1000 < 10:
        return number_words(year)
    return f"{number_words(year // 100)} {number_words(year % 100)}"


def ticker_spoken(ticker: str) -> str:
    """What espeak-ng reads to spell ``ticker`` letter by letter.

    >>> ticker_spoken("NAV")
    "N [['eI]] V"
    """
    return " ".join(_LETTER_A if letter == "A" else letter for letter in ticker)


COMPANIES = (
    ("northwind holdings", "NWH"), ("blue heron capital", "BHC"), ("cedar ridge energy", "CRE"),
    ("halcyon semiconductor", "HSMC"), ("meridian health", "MDH"), ("pioneer freight", "PFRT"),
    ("silver arrow media", "SAM"), ("granite peak bancorp", "GPB"), ("lumen biosciences", "LUMB"),
    ("atlas industrial", "ATLI"), ("harbor lane retail", "HLR"), ("vantage software", "VNTG"),
    ("redwood insurance", "RWI"), ("summit airlines", "SMAL"), ("copperline mining", "CPLM"),
    ("evergreen utilities", "EVU"), ("orion payments", "ORPY"), ("keystone foods", "KSF"),
    ("bright harbor telecom", "BHT"), ("sable logistics", "SBLX"), ("quarry stone materials", "QSM"),
    ("tidewater pharma", "TDWP"), ("falcon aerospace", "FALC"), ("maple street lending", "MSL"),
)  # fmt: skip
SEGMENTS = (
    "cloud services", "consumer lending", "industrial automation", "wealth management",
    "specialty pharmaceuticals", "data center products", "freight brokerage", "commercial real estate",
    "payments processing", "renewable generation", "medical devices", "advertising",
)  # fmt: skip
TEMPLATES = (
    "{company} reported revenue of {money} for the {quarter} quarter of {year}",
    "shares of {ticker} {moved} {percent} in {session} trading",
    "diluted earnings per share were {cents} compared with {cents} a year ago",
    "the board declared a quarterly dividend of {cents} per share payable in {month}",
    "free cash flow came in at {money} up {percent} year over year",
    "{ticker} raised its full year revenue guidance to {money}",
    "gross margin expanded by {bps} basis points to {percent}",
    "our backlog grew to {money} driven by strong demand in {segment}",
    "net interest income declined {percent} sequentially on lower deposit balances",
    "{company} repurchased {count} million shares for a total of {money}",
    "operating expenses were {money} or {percent} of revenue",
    "we ended the quarter with {money} in cash and {money} of long term debt",
    "capital expenditures are expected to be roughly {money} in fiscal {year}",
    "analysts had expected earnings of {cents} per share on revenue of {money}",
    "{segment} sales grew {percent} organically while {segment} was flat",
    "{ticker} trades at {count} times forward earnings after the {moved_noun}",
    "we now expect operating margin between {percent} and {percent} for {year}",
    "{company} lowered its outlook citing softer demand in {segment}",
)


def _money(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"{decimal_words(rng.uniform(1, 40))} billion dollars"
    return f"{number_words(rng.randrange(10, 1000))} million dollars"


def _cents(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"{number_words(rng.randrange(2, 100))} cents"
    dollars = rng.randrange(1, 10)
    unit = "dollar" if dollars == 1 else "dollars"
    return f"{number_words(dollars)} {unit} and {number_words(rng.randrange(1, 100))} cents"


def _company(rng: random.Random) -> Sentence:
    name, _ = rng.choice(COMPANIES)
    return Sentence(text=name, spoken=name)


def _ticker(rng: random.Random) -> Sentence:
    _, ticker = rng.choice(COMPANIES)
    return Sentence(text=" ".join(ticker), spoken=ticker_spoken(ticker))


def _plain(make: Callable[[random.Random], str]) -> Callable[[random.Random], Sentence]:
    """A slot whose words are said as written."""

    def slot(rng: random.Random) -> Sentence:
        words = make(rng)
        return Sentence(text=words, spoken=words)

    return slot


SLOTS: dict[str, Callable[[random.Random], Sentence]] = {
    "company": _company,
    "ticker": _ticker,
    "money": _plain(_money),
    "cents": _plain(_cents),
    "percent": _plain(lambda rng: f"{decimal_words(rng.uniform(0.5, 45))} percent"),
    "bps": _plain(lambda rng: number_words(5 * rng.randrange(2, 60))),
    "count": _plain(lambda rng: number_words(rng.randrange(2, 60))),
    "year": _plain(lambda rng: year_words(rng.randrange(2019, 2031))),
    "quarter": _plain(lambda rng: rng.choice(("first", "second", "third", "fourth"))),
    "month": _plain(
        lambda rng: rng.choice(("january", "march", "april", "june", "july", "september", "october", "december"))
    ),
    "session": _plain(lambda rng: rng.choice(("early", "afternoon", "after hours", "premarket", "heavy"))),
    "moved": _plain(lambda rng: rng.choice(("rose", "fell", "gained", "declined", "climbed", "slipped", "jumped"))),
    "moved_noun": _plain(lambda rng: rng.choice(("selloff", "rally", "earnings beat", "guidance cut", "downgrade"))),
    "segment": _plain(lambda rng: rng.choice(SEGMENTS)),
}
_SLOT = re.compile(r"\{(\w+)\}")


def finance_sentence(rng: random.Random) -> Sentence:
    """One earnings-call sentence: a template with its slots filled from ``rng``.

    >>> s = finance_sentence(random.Random(3))
    >>> s.text == s.text.upper() and not any(c.isdigit() for c in s.text)
    True
    """
    template = rng.choice(TEMPLATES)
    filled = {m.start(): SLOTS[m[1]](rng) for m in _SLOT.finditer(template)}
    text = _SLOT.sub(lambda m: filled[m.start()].text, template)
    spoken = _SLOT.sub(lambda m: filled[m.start()].spoken, template)
    return Sentence(text=" ".join(text.upper().split()), spoken=spoken)


def finance_sentences(count: int, rng: random.Random) -> list[Sentence]:
    """``count`` distinct finance sentences (distinct transcripts), in the order drawn."""
    found: dict[str, Sentence] = {}
    while len(found) < count:
        sentence = finance_sentence(rng)
        found.setdefault(sentence.text, sentence)
    return list(found.values())
