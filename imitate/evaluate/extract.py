"""Read the answer out of a generated text: a final number (GSM8K), a choice letter, or a regex group.

    rule = parse_rule("auto")                     # or "last-number", "first-number", "marker:The answer is",
                                                  #    "regex:Answer: (\\w+)", "choice"
    extract("So 3 + 4 = 7.\\n#### 7", rule)       # "7"
    is_correct(extract(text, rule), "7")          # numbers compare by value: "7.00", "$7", "7" are equal

Rules:
- `auto` (default): after the last `####` or "answer is" (any case), the last number of that sentence ("The
  answer is 9 * 3 = 27." reads 27), else the next number; without a marker, the last number — GSM8K's worked
  answers end `#### N`, chat models say "The answer is N" or just end on it.
- `last-number` / `first-number`: the last / first number in the text.
- `marker:TEXT`: as `auto` with TEXT (case-insensitive) as the marker; none if TEXT is absent.
- `regex:PATTERN`: the first group (or the whole match) of the last match of PATTERN.
- `choice`: a capital choice letter A–J ("The answer is (B)", "Answer: C", "B) Paris", "**D**"); a lower-case
  letter is not read as one ("the answer is a dog").

Numbers are normalised to a canonical string (`normalise_number`): thousands separators, a leading `$`/`€`/`£`,
a trailing `%` or `.` are dropped, the Unicode minus is a minus, `18.0`/`18.00` is `18`, `0.50` is `0.5`,
fractions `3/4` become `0.75` (a non-terminating one stays `2/3`), so equal values compare equal as strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from imitate.errors import InputError

RULES = ("auto", "last-number", "first-number", "marker:TEXT", "regex:PATTERN", "choice")
# A number: optional sign and currency, digits with optional thousands commas, optional decimals or a fraction.
_NUMBER = re.compile(
    r"(?<![\w.])([-−]?)(?:[$€£]\s?)?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:\s?/\s?(\d+)(?![\d.,]\d))?"
)
_MARKERS = re.compile(r"####|answer\s+is", re.I)
_SENTENCE_END = re.compile(r"\n|[.!?;](?=\s|$)")
_CHOICE_PATTERNS = [
    re.compile(r"(?i:answer)\s*(?:is|:)?\s*(?:(?i:option)\s*)?[(\[*]*([A-J])\b(?![\w'])"),
    re.compile(r"^\s*[(\[*]*([A-J])[)\].:*]", re.M),
    re.compile(r"^\s*[(\[*]*([A-J])\s*$", re.M),
    re.compile(r"\(([A-J])\)"),
]


@dataclass(frozen=True)
class Rule:
    kind: str  # auto | last-number | first-number | marker | regex | choice
    arg: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


def parse_rule(spec: str | None) -> Rule:
    spec = (spec or "auto").strip()
    if spec in ("auto", "last-number", "first-number", "choice"):
        return Rule(spec)
    kind, sep, arg = spec.partition(":")
    if sep and kind in ("marker", "regex") and arg:
        if kind == "regex":
            try:
                re.compile(arg)
            except re.error as exc:
                raise InputError(f"--extract regex:{arg}: not a regular expression ({exc})") from exc
        return Rule(kind, arg)
    raise InputError(f"--extract {spec!r}: unknown rule", hint=f"one of: {', '.join(RULES)}")


def normalise_number(text: str) -> str | None:
    """A canonical string for the number `text` holds, or None when it is not one number."""
    m = _NUMBER.fullmatch(text.strip().rstrip(".%").strip())
    return _canonical(m) if m else None


def _canonical(m: re.Match[str]) -> str | None:
    sign, digits, denominator = m.group(1), m.group(2).replace(",", ""), m.group(3)
    try:
        value = Fraction(Decimal(digits))
    except (InvalidOperation, ValueError):
        return None
    if denominator is not None:
        if int(denominator) == 0:
            return None
        value /= int(denominator)
    if sign:
        value = -value
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:  # not a terminating decimal: keep the exact fraction
        return f"{value.numerator}/{value.denominator}"
    return format(Decimal(value.numerator) / Decimal(value.denominator), "f").rstrip("0").rstrip(".")


def numbers(text: str) -> list[str]:
    """Every number in `text`, normalised, in order."""
    return [c for c in (_canonical(m) for m in _NUMBER.finditer(text)) if c is not None]


def extract(text: str, rule: Rule) -> str | None:
    """The answer `rule` reads from `text`, normalised (None when there is none)."""
    if rule.kind == "choice":
        return choice_letter(text)
    if rule.kind == "regex":
        found = list(re.finditer(rule.arg, text))
        if not found:
            return None
        last = found[-1]
        value = last.group(1) if last.re.groups else last.group(0)
        return normalise_answer(value or "")
    if rule.kind == "first-number":
        found = numbers(text)
        return found[0] if found else None
    if rule.kind in ("marker", "auto"):
        pattern = re.compile(re.escape(rule.arg), re.I) if rule.kind == "marker" else _MARKERS
        hits = list(pattern.finditer(text))
        if hits:
            tail = text[hits[-1].end() :]
            # The last number of the marker's own sentence: "the answer is 9 * 3 = 27." reads 27, not 9.
            sentence = numbers(_SENTENCE_END.split(tail, maxsplit=1)[0])
            after = sentence or numbers(tail)
            if after or rule.kind == "marker":
                return (sentence[-1] if sentence else after[0]) if after else None
        elif rule.kind == "marker":
            return None
    found = numbers(text)
    return found[-1] if found else None


def choice_letter(text: str) -> str | None:
    for pattern in _CHOICE_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper() if pattern is _CHOICE_PATTERNS[0] else found[0].upper()
    return None


def normalise_answer(text: str) -> str:
    """A number's canonical form, else the text case-folded with spaces collapsed and end punctuation dropped."""
    number = normalise_number(text)
    if number is not None:
        return number
    return " ".join(text.casefold().split()).strip(" .!?\"'*")


def is_correct(predicted: str | None, gold: str) -> bool:
    return predicted is not None and normalise_answer(predicted) == normalise_answer(gold)


def gold_number(answer: str) -> str | None:
    """The final answer of a GSM8K worked answer: what follows its last `####` (None without one)."""
    head, sep, tail = answer.rpartition("####")
    if not sep or not tail.strip():
        return None
    return normalise_answer(tail.strip())
