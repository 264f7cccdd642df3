"""The fake teacher as a scripted LLM judge (tests of `imitate eval judge` and `imitate generate best-of-n`).

A last user turn is a judge prompt when it asks for the verdict formats of `prompts/judge.yaml`: `Rating: [[`
(single-answer grading) or both `[[A]]` and `[[B]]` (pairwise). The answers are read from between `<answer>` and
`</answer>` (single) or `<answer_a>`/`<answer_b>` tags. The reply, deterministic in the prompt and the request's
`seed`, is a sentence of justification and the verdict line:

- `[[fake-verdict:V]]` anywhere in the prompt scripts the verdict: V is a rating 1-10, A, B, C, or `junk` (a
  reply with no verdict in it); `[[fake-verdict:junk,7]]` scripts successive re-asks: item k answers the request
  whose `seed` is k (no seed: item 0; past the end: the last item).
- Otherwise every answer has a quality: `[[fake-score:N]]` inside it, else 1-10 from a hash of its text. Single
  grading rates that quality; pairwise prefers the answer of higher quality (`[[C]]` when equal) wherever it is
  shown, so a swap of the answers swaps the verdict.
- `judge_bias="A"` (or "B", a FakeConfig option) makes every pairwise verdict that position: a judge fooled by
  position, which the both-orders rule has to turn into ties.
"""

from __future__ import annotations

import hashlib
import re

_SCRIPT = re.compile(r"\[\[fake-verdict:\s*([^\]]+?)\s*\]\]", re.IGNORECASE)
_SCORE = re.compile(r"\[\[fake-score:\s*(\d+)\s*\]\]", re.IGNORECASE)
JUNK = "Both replies raise interesting points, and I would need more context to say more."


def judge_kind(prompt: str) -> str | None:
    """ "single", "pairwise" or None (not a judge prompt)."""
    if "[[A]]" in prompt and "[[B]]" in prompt:
        return "pairwise"
    if "Rating: [[" in prompt:
        return "single"
    return None


def _between(prompt: str, tag: str) -> str:
    start, end = prompt.rfind(f"<{tag}>"), prompt.rfind(f"</{tag}>")
    return prompt[start + len(tag) + 2 : end].strip() if 0 <= start < end else ""


def quality(answer: str) -> int:
    """The fake judge's opinion of an answer: a `[[fake-score:N]]` inside it, else 1-10 from its text's hash."""
    if m := _SCORE.search(answer):
        return max(1, min(10, int(m.group(1))))
    return 1 + hashlib.sha256(answer.encode()).digest()[0] % 10


def _scripted(prompt: str, seed: int | None) -> str | None:
    m = _SCRIPT.search(prompt)
    if m is None:
        return None
    items = [item.strip() for item in m.group(1).split(",") if item.strip()] or ["junk"]
    return items[min(max(seed or 0, 0), len(items) - 1)]


def _reply(kind: str, verdict: str) -> str:
    if verdict.lower() == "junk":
        return JUNK
    if kind == "single":
        return f"The reply takes up the question; its depth and correctness decide the score.\nRating: [[{verdict}]]"
    reason = "The two replies are about equally useful." if verdict == "C" else f"Reply {verdict} is more useful."
    return f"{reason}\n[[{verdict}]]"


def fake_judgement(prompt: str, kind: str, *, seed: int | None = None, bias: str | None = None) -> str:
    """The fake judge's reply to a judge prompt of `kind` (see the module docstring)."""
    scripted = _scripted(prompt, seed)
    if scripted is not None:
        return _reply(kind, scripted)
    if kind == "single":
        return _reply(kind, str(quality(_between(prompt, "answer"))))
    if bias:
        return _reply(kind, bias)
    a, b = quality(_between(prompt, "answer_a")), quality(_between(prompt, "answer_b"))
    return _reply(kind, "A" if a > b else "B" if b > a else "C")
