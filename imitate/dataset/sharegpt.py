"""ShareGPT conversations cleaned the way Vicuna and Koala did, as pure functions (`imitate import sharegpt` drives
them: imitate/dataset/sharegpt_import.py).

One exported row, `{"id", "conversations": [{"from", "value"}, ...], "model"?}`, goes through:

1. `normalise_turns`: roles mapped (human/user -> user; gpt/chatgpt/bard/bing/assistant -> assistant; system);
   an unknown role makes the row bad (io's `BadRow`, naming the field); a turn that is not an object, has no `from`,
   or a value that is not a string is malformed and removed; values are turned from ChatGPT's HTML into Markdown
   (chatgpt_html.py); turns left empty are removed.
2. `shape`: a leading system turn is kept; leading assistant turns are removed (Vicuna did), a trailing user turn
   is removed (a record ends with an answer); what is left must alternate user/assistant, else the conversation
   is dropped (`not_alternating`), and it must hold at least one exchange (`no_exchange`).
3. `split_by_budget`: a conversation longer than the token budget becomes several parts at turn boundaries, each
   a run of whole user/assistant exchanges ending with an assistant turn (the system turn repeated in each); an
   exchange longer than the budget on its own is removed (`over_budget`), and the part before it ends there.
4. `to_record`: a multi-turn Record (messages up to the last assistant turn, response = that turn).

Counts: `Counts.turns` says how many turns each rule removed, conversation-level drops are the caller's.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from imitate import __version__
from imitate.dataset.chatgpt_html import to_markdown
from imitate.dataset.io import BadRow
from imitate.records import Message, Provenance, Query, Record, Source, canonical_json, sha256_text

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
    "system": "system",
}
# Chat-template tokens around each turn (ChatML: <|im_start|> role \n ... <|im_end|> \n is 5): added to every turn
# when checking the budget, so a part that fits here also fits the trainer's max_length.
TURN_OVERHEAD_TOKENS = 6


class Dropped(Exception):
    """The whole conversation is dropped for `reason` (a manifest key); `detail` says what was seen; `of` names
    the kept conversation a duplicate repeats."""

    def __init__(self, reason: str, detail: str = "", *, of: str | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.of = reason, detail, of


@dataclass
class Counts:
    turns: Counter = field(default_factory=Counter)  # turns removed, by rule
    html_turns: int = 0  # values converted from HTML


def conversation_of(row: object) -> list:
    """The raw turn list of one row; a row that has none is bad."""
    if not isinstance(row, dict):
        raise BadRow(f"expected an object with `conversations`, got {type(row).__name__}")
    turns = row.get("conversations")
    if isinstance(turns, str):  # CSV holds the list as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as exc:
            raise BadRow(f"conversations: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(turns, list):
        got = "missing field" if turns is None else f"must be a list of turns, got {type(turns).__name__}"
        raise BadRow(f"conversations: {got}")
    return turns


def normalise_turns(raw: Sequence, counts: Counts) -> list[Message]:
    """Step 1: roles mapped, values to Markdown, malformed and empty turns removed (counted)."""
    out: list[Message] = []
    for i, turn in enumerate(raw):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            counts.turns["malformed"] += 1
            continue
        role = ROLES.get(turn["from"].strip().lower())
        if role is None:
            expected = ", ".join(ROLES)
            raise BadRow(f"conversations[{i}].from: unknown role {turn['from']!r} (expected one of {expected})")
        text, was_html = to_markdown(turn["value"])
        counts.html_turns += was_html
        if not text.strip():
            counts.turns["empty"] += 1
            continue
        out.append(Message(role=role, content=text.strip()))
    return out


def shape(turns: list[Message], counts: Counts) -> list[Message]:
    """Step 2: [system] user assistant user assistant ... ending with the assistant, or `Dropped`."""
    system = turns[:1] if turns and turns[0].role == "system" else []
    rest = turns[len(system) :]
    while rest and rest[0].role == "assistant":
        counts.turns["leading_assistant"] += 1
        rest = rest[1:]
    while rest and rest[-1].role == "user":
        counts.turns["trailing_user"] += 1
        rest = rest[:-1]
    for i, turn in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            where = i + len(system) + 1
            raise Dropped("not_alternating", f"turn {where} is {turn.role}, expected {expected}")
    if not rest:
        raise Dropped("no_exchange", "no user turn followed by an assistant turn")
    return system + rest


def split_by_budget(
    turns: list[Message], budget: int | None, count_tokens: Callable[[str], int], counts: Counts
) -> list[list[Message]]:
    """Step 3: parts of at most `budget` tokens (content plus TURN_OVERHEAD_TOKENS per turn), cut between
    exchanges. No budget: the conversation as it is."""
    if budget is None:
        return [turns]
    system = turns[:1] if turns[0].role == "system" else []
    body = turns[len(system) :]

    def cost(messages: Sequence[Message]) -> int:
        return sum(count_tokens(m.content) + TURN_OVERHEAD_TOKENS for m in messages)

    base = cost(system)
    parts: list[list[Message]] = []
    current: list[Message] = []
    used = base
    for i in range(0, len(body), 2):
        exchange = body[i : i + 2]
        need = cost(exchange)
        if base + need > budget:  # cannot fit even alone: removed, and the part before it ends here
            counts.turns["over_budget"] += 2
            if current:
                parts.append(system + current)
            current, used = [], base
            continue
        if used + need > budget:
            parts.append(system + current)
            current, used = [], base
        current.extend(exchange)
        used += need
    if current:
        parts.append(system + current)
    if not parts:
        raise Dropped("over_budget", f"every exchange is longer than {budget} tokens")
    return parts


def estimate_tokens(text: str) -> int:
    """Token estimate without a tokenizer: the larger of 4/3 tokens per word (English prose) and one token per
    4 characters (code and non-English text, whose words split into more tokens)."""
    return math.ceil(max(len(text.split()) * 4 / 3, len(text) / 4))


def user_text(turns: Sequence[Message]) -> str:
    """The users' own words for language detection: code blocks left out (code is no natural language)."""
    lines: list[str] = []
    in_code = False
    for turn in turns:
        if turn.role != "user":
            continue
        for line in turn.content.splitlines():
            if line.lstrip().startswith("```"):
                in_code = not in_code
            elif not in_code:
                lines.append(line)
        in_code = False
    return "\n".join(lines)


def conversation_key(turns: Sequence[Message]) -> str:
    """sha256 of the canonical conversation: the provenance request key, and the id of a row that has none."""
    return sha256_text(canonical_json([m.model_dump() for m in turns]))


def row_id(row: dict, turns: Sequence[Message]) -> str:
    value = row.get("id")
    if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
        return str(value).strip()
    return "q-" + conversation_key(turns)[:16]


def to_record(
    turns: list[Message], *, record_id: str, model: str, source: Source, metadata: dict, collection: str | None = None
) -> Record:
    """Step 4: a shaped part ([system] user assistant ... assistant) as one multi-turn Record."""
    system = turns[0].content if turns[0].role == "system" else None
    body = turns[1:] if system is not None else turns
    query = Query(
        id=record_id,
        question=body[-2].content,
        system=system,
        collection=collection,
        turns=body[:-2],
        metadata=metadata,
    )
    provenance = Provenance(
        teacher="imported",
        model=model,
        base_url="",
        request_key=conversation_key(turns),
        imitate_version=__version__,
        source=source,
    )
    return Record(id=record_id, query=query, messages=turns[:-1], response=turns[-1].content, provenance=provenance)


def row_model(row: dict) -> str:
    model = row.get("model")
    return model.strip() if isinstance(model, str) and model.strip() else "unknown"
