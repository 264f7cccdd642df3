"""LLM-as-judge, the pure part: the versioned judge prompts, verdict parsing, the both-orders rule, the tables.

    prompts = load_judge_prompts()                       # prompts/judge.yaml, sha256 checked
    text = prompts.single.render(question=q, answer=a)   # or prompts.pairwise.render(question, answer_a, answer_b)
    parse_rating("... Rating: [[7]]")                    # Parsed(7.0, None)
    parse_choice("... [[B]]")                            # Parsed("B", None)
    combine("A", "B")                                    # ("win", True): X shown first won, X shown second won

Parsing is strict about the shape the prompt asks for and forgiving about the noise around it (Markdown, spaces,
"7/10", a verdict repeated). A reply with no verdict, two different verdicts on its last line, or a rating off
the 1-10 scale is `Parsed(None, reason)`: the caller re-asks it a bounded number of times and then records it as
unparsed. An unparsed reply is never turned into a score.

Pairwise comparisons are asked in both orders (X as A, then X as B), because LLM judges favour a position. The
two verdicts combine, from X's side, as:

    both orders prefer X -> win;  both prefer the other -> loss;  anything else -> tie

so a win needs the judge to agree with itself after the swap: orders that disagree (inconsistent: the position
decided) are a tie, and so is a tie in either order (we do not count half a preference as a win). A pair with an
unparsed verdict in either order is `unparsed` and counts in no rate.
"""

from __future__ import annotations

import random
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imitate.errors import ConfigError
from imitate.records import GenerationParams, canonical_json, sha256_text

PROMPT_FILE = "judge.yaml"
RATING_RANGE = (1.0, 10.0)
Outcome = Literal["win", "tie", "loss", "unparsed"]
_HEX64 = r"^[0-9a-f]{64}$"
_FIELDS = {"single": ("question", "answer"), "pairwise": ("question", "answer_a", "answer_b")}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JudgePrompt(_Model):
    """One judge prompt: a system message, a template with `{question}` and the answer placeholders, the
    generation parameters (temperature 0: the judge should not be a lottery) and the temperature of re-asks."""

    id: str
    version: int = Field(ge=1)
    description: str = ""
    sha256: str = Field(pattern=_HEX64)
    system: str
    template: str
    params: GenerationParams = Field(default_factory=lambda: GenerationParams(temperature=0.0))
    reask_temperature: float = Field(0.7, ge=0.0, le=2.0)

    def content_sha256(self) -> str:
        return sha256_text(canonical_json(self.model_dump(mode="json", exclude={"sha256", "description"})))

    def render(self, **fields: str) -> str:
        return self.template.format(**fields)


class JudgePrompts(_Model):
    version: int = Field(ge=1)
    single: JudgePrompt
    pairwise: JudgePrompt

    @model_validator(mode="after")
    def _placeholders(self) -> JudgePrompts:
        for kind, names in _FIELDS.items():
            prompt: JudgePrompt = getattr(self, kind)
            try:
                prompt.render(**dict.fromkeys(names, ""))
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"{kind}.template: unknown or malformed placeholder ({exc})") from None
            missing = [n for n in names if "{" + n + "}" not in prompt.template]
            if missing:
                raise ValueError(f"{kind}.template needs {', '.join('{' + n + '}' for n in missing)}")
        return self


def with_max_tokens(prompts: JudgePrompts, max_tokens: int | None) -> JudgePrompts:
    """`prompts` with the judge's reply capped at `max_tokens` (None: the prompts' own). The wording and its sha256
    stay; the cap is a request parameter, so it is part of each request's key and recorded in provenance. A judge
    that rambles past its verdict (a small local model) otherwise spends the whole cap on every ask."""
    if max_tokens is None:
        return prompts
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")

    def cap(p: JudgePrompt) -> JudgePrompt:
        return p.model_copy(update={"params": p.params.model_copy(update={"max_tokens": max_tokens})})

    return prompts.model_copy(update={"single": cap(prompts.single), "pairwise": cap(prompts.pairwise)})


def load_judge_prompts(path: Path | str | None = None) -> JudgePrompts:
    """Load and check the judge prompts (default: `judge.yaml` in the prompts folder); every problem at once."""
    from imitate.prompts import default_prompts_dir, load_model

    path = Path(path) if path is not None else default_prompts_dir() / PROMPT_FILE
    prompts = load_model(path, JudgePrompts)
    problems = [
        f"{kind}: sha256 does not match the content (it hashes to {p.content_sha256()})"
        for kind, p in (("single", prompts.single), ("pairwise", prompts.pairwise))
        if p.content_sha256() != p.sha256
    ]
    if problems:
        raise ConfigError(f"{path}", problems=problems, hint="an edited prompt needs a new sha256 and a version bump")
    return prompts


# ---------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Parsed:
    """A verdict (a rating, or "A"/"B"/"C") or, when the reply could not be read, None and the reason."""

    value: float | str | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None


_NUM = r"([+-]?\d+(?:\.\d+)?)"
_RATING = re.compile(r"rating\W{0,6}\[\[\s*" + _NUM + r"\s*(?:/\s*10)?\s*\]\]", re.IGNORECASE)
_BRACKETED = re.compile(r"\[\[\s*" + _NUM + r"\s*(?:/\s*10)?\s*\]\]")
_LOOSE = re.compile(
    r"\b(?:rating|score)\b\W{0,6}(?:is\s+|of\s+)?\[?\s*" + _NUM + r"\s*\]?\s*(?:/\s*10|out of 10)?", re.IGNORECASE
)
_CHOICE = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_LOOSE_CHOICE = re.compile(
    r"^\W*(?:final\s+)?(?:verdict|winner|choice|decision)\b\W{0,6}(?:is\s+)?(?:(?:assistant|reply|answer)\s+)?"
    r"(A|B|C|tie)\b",
    re.IGNORECASE,
)


def parse_rating(text: str | None, scale: tuple[float, float] = RATING_RANGE) -> Parsed:
    """The rating of a single-answer judgement: the last `Rating: [[N]]`, else the last `[[N]]`, else the last
    `Rating: N` / `score: N/10`; outside `scale` it is unparsed."""
    text = (text or "").strip()
    if not text:
        return Parsed(None, "empty reply")
    for pattern in (_RATING, _BRACKETED, _LOOSE):
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            low, high = scale
            if not low <= value <= high:
                return Parsed(None, f"rating {found[-1]} is outside {low:g}-{high:g}")
            return Parsed(value)
    return Parsed(None, "no rating found")


def parse_choice(text: str | None) -> Parsed:
    """The verdict of a pairwise judgement: "A", "B" or "C" (tie). One distinct `[[X]]` in the reply, or on its
    last line when the reply names several; else a last line such as `Verdict: B`. Two different verdicts on the
    last line (or none anywhere) leave it unparsed."""
    text = (text or "").strip()
    if not text:
        return Parsed(None, "empty reply")
    lines = [line for line in text.splitlines() if line.strip()]

    def distinct(found: Iterable[str]) -> set[str]:
        return {"C" if f.lower() == "tie" else f.upper() for f in found}

    everywhere = distinct(_CHOICE.findall(text))
    if len(everywhere) == 1:
        return Parsed(everywhere.pop())
    last = distinct(_CHOICE.findall(lines[-1]))
    if len(last) == 1:
        return Parsed(last.pop())
    if len(last) > 1 or len(everywhere) > 1:
        shown = " and ".join(f"[[{v}]]" for v in sorted(last or everywhere))
        return Parsed(None, f"ambiguous verdict ({shown})")
    loose = _LOOSE_CHOICE.search(lines[-1].replace("*", ""))
    if loose:
        return Parsed(distinct([loose.group(1)]).pop())
    return Parsed(None, "no verdict found")


def parse(kind: str, text: str | None) -> Parsed:
    return parse_rating(text) if kind == "single" else parse_choice(text)


# ---------------------------------------------------------------------------------------------- both orders


def side(verdict: str | None, position: str) -> Outcome:
    """A verdict ("A"/"B"/"C") seen from the answer shown in `position` ("A" or "B")."""
    if verdict is None:
        return "unparsed"
    if verdict == "C":
        return "tie"
    return "win" if verdict == position else "loss"


def combine(x_first: str | None, x_second: str | None) -> tuple[Outcome, bool]:
    """X's outcome from the verdict with X shown as A and the verdict with X shown as B, and whether the two
    orders agree (see the module docstring for the rule)."""
    one, two = side(x_first, "A"), side(x_second, "B")
    if "unparsed" in (one, two):
        return "unparsed", False
    if one == two:
        return one, True
    return "tie", False


@dataclass
class WinTable:
    """Win/tie/loss of X against Y over questions (pairs judged in both orders)."""

    x: str
    y: str
    win: int = 0
    tie: int = 0
    loss: int = 0
    unparsed: int = 0
    failed: int = 0
    inconsistent: int = 0  # pairs whose two orders disagreed (counted as ties)
    first_position_wins: int = 0  # single verdicts (of 2 per pair) that picked whichever answer was shown as A
    second_position_wins: int = 0

    @property
    def scored(self) -> int:
        return self.win + self.tie + self.loss

    def add(self, outcome: Outcome | Literal["failed"], x_first: str | None = None, x_second: str | None = None):
        setattr(self, outcome, getattr(self, outcome) + 1)
        if outcome != "unparsed" and outcome != "failed":
            self.inconsistent += side(x_first, "A") != side(x_second, "B")
        for verdict in (x_first, x_second):
            self.first_position_wins += verdict == "A"
            self.second_position_wins += verdict == "B"

    def as_dict(self) -> dict[str, Any]:
        n = self.scored

        def rate(k: int) -> float | None:
            return round(k / n, 4) if n else None

        return {
            "x": self.x,
            "y": self.y,
            "win": self.win,
            "tie": self.tie,
            "loss": self.loss,
            "unparsed": self.unparsed,
            "failed": self.failed,
            "scored": n,
            "win_rate": rate(self.win),
            "tie_rate": rate(self.tie),
            "loss_rate": rate(self.loss),
            "inconsistent": self.inconsistent,
            "position_a_verdicts": self.first_position_wins,
            "position_b_verdicts": self.second_position_wins,
        }


# ---------------------------------------------------------------------------------------------- intervals


def mean_interval(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 4000, seed: int = 0):
    """(mean, low, high): the mean with a percentile-bootstrap interval (seeded: the same scores give the same
    interval). Fewer than two values: the interval is the mean itself (None for no values)."""
    if not values:
        return None, None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return mean, means[int(tail * (resamples - 1))], means[int((1 - tail) * (resamples - 1))]


def paired_difference(x: Sequence[float], y: Sequence[float], **kw: Any):
    """Mean of x[i] - y[i] over paired items (the same questions), with its bootstrap interval."""
    if len(x) != len(y):
        raise ValueError("paired scores need the same items on both sides")
    return mean_interval([a - b for a, b in zip(x, y, strict=True)], **kw)
