"""The fake teacher's answer to a prompt that ends in an open numbered task, "N. Instruction:" (a Self-Instruct
style request to continue a list of tasks): `list_items` more tasks, deterministic in the prompt.

Most items are new tasks composed from a few short templates and slot phrases; some are the kind a real teacher
also writes and a Self-Instruct filter must reject: a task shown in the prompt repeated, one a text model cannot
do (draw, plot), one too short, one starting with punctuation or a non-ASCII letter. Layout (Alpaca's): the
first item continues the open line, each item is "N. Instruction: ..." / "N. Input:" / its input or
<noinput>, items separated by "###".
"""

from __future__ import annotations

import hashlib
import re

OPEN_ITEM = re.compile(r"(?:^|\n)\s*(\d+)\s*[.)]\s*Instruction:\s*$")
_SHOWN = re.compile(r"(?m)^\s*\d+\s*[.)]\s*Instruction:\s*(.+?)\s*$")

_TEMPLATES = (
    ("Explain how {a} affects {b}.", ""),
    ("Write a short story about {p} who discovers {a}.", ""),
    ("List three ways to make {a} cheaper.", ""),
    ("Suggest a catchy name for a podcast on {a}.", ""),
    ("Summarize the strongest argument for {a}.", ""),
    ("Compose a limerick featuring {p}.", ""),
    ("What questions should {p} ask before trying {a}?", ""),
    ("Compare {a} with {b} in two sentences.", ""),
    ("Draft an email inviting {p} to discuss {a}.", ""),
    ("Classify the sentiment of this review about {a}.", "I tried {a} last month and {v}."),
    ("Extract every number from the note below.", "{p} paid {n} euros for {a} and {m} for {b}."),
    ("Solve for x: {n}x + {m} = {k}.", ""),
    ("Rewrite the following sentence so it sounds more formal.", "{p} reckons {a} {v}."),
    ("Give {p} practical advice about {a}.", ""),
    (
        "Find the bug in this Python function.",
        "def total(xs):\n    s = 0\n    for x in xs:\n        s = x\n    return s",
    ),
    ("Turn these facts into a tweet about {a}.", "{a}; {b}; {n} people"),
)
_TOPICS = (
    "urban beekeeping",
    "public libraries",
    "remote work",
    "rooftop solar panels",
    "night trains",
    "community gardens",
    "electric scooters",
    "board game cafes",
    "rainwater harvesting",
    "language exchanges",
    "open source licences",
    "sourdough baking",
    "tidal energy",
    "school uniforms",
    "bike lanes",
    "second hand clothing",
    "vertical farming",
    "museum night openings",
    "four day weeks",
    "tiny houses",
    "mushroom foraging",
    "citizen science",
    "repair cafes",
    "car free sundays",
    "seed libraries",
)
_PEOPLE = (
    "a retired sailor",
    "a first year nurse",
    "a village baker",
    "a nervous intern",
    "an amateur astronomer",
    "a school librarian",
    "a night shift guard",
    "a beekeeping grandmother",
    "a touring cellist",
    "a ferry pilot",
)
_VERDICTS = ("it was worth every cent", "it broke within a week", "nobody noticed the difference")
_MISFITS = (
    "Draw a picture of {a}.",
    "Plot a graph showing how {a} grew over ten years.",
    "Do it.",
    "... and then explain {a} again.",
    "¿Qué opinas de {a}?",
)


def _pick(seq: tuple, h: bytes, i: int) -> str:
    return seq[h[i] % len(seq)]


def _compose(h: bytes) -> tuple[str, str]:
    instruction, input_ = _TEMPLATES[h[1] % len(_TEMPLATES)]
    slots = {"a": _pick(_TOPICS, h, 2), "b": _pick(_TOPICS, h, 3), "p": _pick(_PEOPLE, h, 4)}
    slots |= {"v": _pick(_VERDICTS, h, 5), "n": str(2 + h[6] % 97), "m": str(1 + h[7] % 50), "k": str(h[8] + 100)}
    if slots["a"] == slots["b"]:
        slots["b"] = _TOPICS[(h[3] + 1) % len(_TOPICS)]
    return instruction.format(**slots), input_.format(**slots)


def continues_task_list(prompt: str) -> int | None:
    """The number of the open item when the prompt ends in "N. Instruction:", else None."""
    m = OPEN_ITEM.search(prompt[-200:])
    return int(m.group(1)) if m else None


def fake_task_list(prompt: str, first: int, items: int, seed: bytes) -> str:
    """`items` tasks numbered from `first`; the first one continues the prompt's open "N. Instruction:" line."""
    shown = _SHOWN.findall(prompt)
    blocks = []
    for j in range(items):
        h = hashlib.sha256(seed + j.to_bytes(4, "big")).digest()
        kind = h[0] % 20
        if kind < 2 and shown:
            instruction, input_ = shown[h[1] % len(shown)], ""
        elif kind < 5:
            instruction, input_ = _MISFITS[h[1] % len(_MISFITS)].format(a=_pick(_TOPICS, h, 2)), ""
        else:
            instruction, input_ = _compose(h)
        n = first + j
        head = "" if j == 0 else f"{n}. Instruction: "
        blocks.append(f"{head}{instruction}\n{n}. Input:\n{input_ or '<noinput>'}\n###")
    return " " + "\n".join(blocks)
