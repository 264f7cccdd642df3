"""Chat messages → `input_ids` + `labels`: the one function that builds the loss mask (STYLE.md §9).

`encode` renders a conversation with the model's own chat template and labels the tokens of *every* assistant
turn, up to and including the end-of-turn token; everything else is -100. Assistant spans are found by
rendering prefixes of the conversation (prompt with the generation prompt, then prompt + answer), so the mask
follows whatever the template does; a template that is not prefix-stable is refused rather than guessed at.
Each segment is tokenised on its own, so a token never straddles prompt and answer, and the prompt tokens are
exactly those a generation call would see.

System turns: our rule is "a system turn only when the system message is non-empty". Some templates (SmolLM2's
and Qwen2's ChatML) insert a default system turn ("You are a helpful AI assistant named SmolLM…") when the
conversation has none. `ChatFormat.of` detects that by rendering a sentinel system message and comparing; when
it is detected, a conversation without a system message is rendered *with* the sentinel and the sentinel's
system turn (opener + sentinel + turn close, all measured from the template) is cut off the text. The result is
what the template renders for every other turn, minus the turn we did not ask for; the cut is verified on every
call. `imitate chat` renders the same way, so training and generation agree.

Refusals (per example, counted by reason before training, never silently fixed): no supervised tokens, a double
BOS, an answer whose end-of-turn token is not supervised, a stop token inside an answer, a teacher answer that
was cut by the teacher's max_tokens, an over-length example (policy `drop`), an answer that would be cut to fit
(policy `truncate-prompt` cuts only prompt tokens, from the left), a template that is not prefix-stable.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from imitate.errors import TrainError
from imitate.records import Message, Record

IGNORE = -100
OverLength = Literal["drop", "truncate-prompt", "error"]
_SYS = "\u241eimitate-system\u241e"
_USR = "\u241eimitate-user\u241e"
_ASST = "\u241eimitate-assistant\u241e"
# Bump when the masking rule changes: it is part of the preprocessing cache key.
MASK_VERSION = "1"


class Reason(StrEnum):
    NO_SUPERVISED = "no_supervised_tokens"
    DOUBLE_BOS = "double_bos"
    STOP_OUTSIDE_MASK = "stop_outside_mask"
    STOP_INSIDE_ANSWER = "stop_inside_answer"
    TEACHER_TRUNCATED = "teacher_truncated"
    OVER_LENGTH = "over_length"
    COMPLETION_CUT = "completion_would_be_cut"
    TEMPLATE_UNSTABLE = "template_not_prefix_stable"


class Refusal(TrainError):
    """One example cannot be trained on, for `reason`. Collected and counted, never raised past `tokenize`."""

    def __init__(self, reason: Reason, detail: str = ""):
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason


@dataclass(frozen=True)
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass(frozen=True)
class ChatFormat:
    """What the mask needs to know about a tokenizer + template, measured once by rendering probes."""

    tokenizer: Any
    template: str
    eot_id: int
    bos_id: int | None
    default_system: str | None  # text of the system turn the template adds on its own; None = it adds none
    system_cut: tuple[str, str] = ("", "")  # (system-turn opener, turn close) measured around the sentinel
    lead: str = ""  # text kept in front when the injected system turn is cut (a templated BOS)

    @classmethod
    def of(cls, tokenizer: Any, template: str | None = None) -> ChatFormat:
        template = template or tokenizer.chat_template
        if not template:
            raise TrainError("the tokenizer has no chat template", hint="set train.chat_template to a Jinja template")
        fmt = cls(tokenizer, template, eot_id=-1, bos_id=tokenizer.bos_token_id, default_system=None)
        with_sys = fmt._template([Message(role="system", content=_SYS), Message(role="user", content=_USR)])
        user_only = fmt._template([Message(role="user", content=_USR)])
        if _SYS not in with_sys:
            raise TrainError("the chat template drops system messages")
        opener, after = with_sys.split(_SYS, 1)
        close = user_only.split(_USR, 1)[1]
        injected = None
        if user_only.startswith(opener) and user_only.endswith(after) and after.startswith(close):
            injected = user_only[len(opener) : len(user_only) - len(after)]
        bos_text = tokenizer.bos_token or ""
        lead = bos_text if bos_text and "bos_token" in template and opener.startswith(bos_text) else ""
        pair = fmt._template([Message(role="user", content=_USR), Message(role="assistant", content=_ASST)])
        turn_end = pair.split(_ASST, 1)[1]
        return cls(
            tokenizer,
            template,
            eot_id=_first_special(tokenizer, turn_end),
            bos_id=tokenizer.bos_token_id,
            default_system=injected,
            system_cut=(opener, close),
            lead=lead,
        )

    def _template(self, messages: Sequence[Message], generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages],
            chat_template=self.template,
            add_generation_prompt=generation_prompt,
            tokenize=False,
        )

    def render(self, messages: Sequence[Message], generation_prompt: bool = False) -> str:
        """The template's text for `messages`, with no system turn unless one is given with content."""
        messages = [m for m in messages if not (m.role == "system" and not m.content)]
        if self.default_system is None or not messages or messages[0].role == "system":
            return self._template(messages, generation_prompt)
        text = self._template([Message(role="system", content=_SYS), *messages], generation_prompt)
        opener, close = self.system_cut
        cut = opener + _SYS + close
        if not text.startswith(cut):
            raise TrainError("could not remove the template's default system turn: unexpected rendering")
        return self.lead + text[len(cut) :]

    def fingerprint(self) -> str:
        """Content hash of everything that decides the ids: vocabulary, merges, specials, template, mask rule."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
        parts = [vocab, self.template, str(self.eot_id), str(self.bos_id), MASK_VERSION]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _first_special(tokenizer: Any, text: str) -> int:
    """The end-of-turn token: the first special token the template writes after an assistant message."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for tid in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if tid in special:
            return tid
    if tokenizer.eos_token_id is None:
        raise TrainError("the chat template ends assistant turns with no special token and there is no eos")
    return tokenizer.eos_token_id


def encode(
    messages: Sequence[Message],
    fmt: ChatFormat,
    *,
    max_length: int,
    over_length: OverLength = "drop",
    record_id: str = "",
) -> tuple[Example, bool]:
    """The mask function. Returns the example and whether its prompt was truncated; raises `Refusal`."""
    ids, labels, turns = _render_masked(messages, fmt)
    _check(ids, labels, turns, fmt)
    truncated = False
    if len(ids) > max_length:
        if over_length != "truncate-prompt":
            raise Refusal(Reason.OVER_LENGTH, f"{len(ids)} tokens > max_length {max_length}")
        cut = len(ids) - max_length
        first_supervised = next(i for i, x in enumerate(labels) if x != IGNORE)
        # Keep at least one prompt token in front of the first answer token, or it has nothing to predict it.
        if cut >= first_supervised:
            raise Refusal(Reason.COMPLETION_CUT, f"{len(ids)} tokens, answers alone exceed {max_length}")
        ids, labels, truncated = ids[cut:], labels[cut:], True
    return Example(record_id, ids, labels), truncated


def _render_masked(messages: Sequence[Message], fmt: ChatFormat) -> tuple[list[int], list[int], list[int]]:
    """Segment the rendered text at assistant spans, tokenise each segment, label the assistant ones."""
    full = fmt.render(messages)
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(messages):
        if m.role != "assistant":
            continue
        prompt = fmt.render(messages[:k], generation_prompt=True)
        head = fmt.render(messages[: k + 1])
        previous_end = spans[-1][1] if spans else 0
        if not (full.startswith(head) and head.startswith(prompt) and len(prompt) >= previous_end):
            raise Refusal(Reason.TEMPLATE_UNSTABLE, f"assistant turn {k}")
        spans.append((len(prompt), len(head)))
    cuts = [0, *[p for span in spans for p in span], len(full)]
    texts = [full[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    pieces = fmt.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids: list[int] = []
    labels: list[int] = []
    turns: list[int] = []  # index of the last token of each assistant segment
    for i, piece in enumerate(pieces):
        answer = i % 2 == 1
        supervised = len(piece)
        if answer and fmt.eot_id in piece:
            # Template text after the end-of-turn token (ChatML's "\n") is formatting, never generated.
            supervised = len(piece) - piece[::-1].index(fmt.eot_id)
        ids.extend(piece)
        labels.extend(piece[:supervised] if answer else [IGNORE] * supervised)
        labels.extend([IGNORE] * (len(piece) - supervised))
        if answer:
            turns.append(len(ids) - len(piece) + supervised - 1)
    return ids, labels, turns


def _check(ids: list[int], labels: list[int], turns: list[int], fmt: ChatFormat) -> None:
    """The refusal rules, read off the final arrays."""
    if not any(x != IGNORE for x in labels):
        raise Refusal(Reason.NO_SUPERVISED)
    if fmt.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == fmt.bos_id:
        raise Refusal(Reason.DOUBLE_BOS)
    start = 0
    for end in turns:
        if labels[end] != fmt.eot_id:
            raise Refusal(Reason.STOP_OUTSIDE_MASK, f"answer ends with token {ids[end]}, not {fmt.eot_id}")
        if fmt.eot_id in labels[start:end]:
            raise Refusal(Reason.STOP_INSIDE_ANSWER)
        start = end + 1


# ---------------------------------------------------------------------------------------------- many records


@dataclass
class TokenizeSummary:
    total: int = 0
    kept: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    prompt_truncated: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    refused_ids: dict[str, list[str]] = field(default_factory=dict)  # first few ids per reason

    def lines(self) -> list[str]:
        out = [
            f"{self.kept}/{self.total} examples kept, {self.tokens} tokens, {self.supervised_tokens} supervised"
            + (f", {self.prompt_truncated} prompts truncated" if self.prompt_truncated else "")
        ]
        for reason, n in sorted(self.refused.items()):
            ids = ", ".join(self.refused_ids.get(reason, []))
            out.append(f"refused {n} × {reason} (e.g. {ids})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "kept": self.kept,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
            "prompt_truncated": self.prompt_truncated,
            "refused": dict(sorted(self.refused.items())),
            "refused_ids": self.refused_ids,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizeSummary:
        return cls(**{**d, "refused": Counter(d["refused"])})


def tokenize(
    records: Iterable[Record], fmt: ChatFormat, *, max_length: int, over_length: OverLength = "drop"
) -> tuple[list[Example], TokenizeSummary]:
    """Encode every record; refusals are counted by reason. Policy `error` raises after counting them all."""
    examples: list[Example] = []
    summary = TokenizeSummary()
    for rec in records:
        summary.total += 1
        try:
            if rec.truncated or rec.provenance.finish_reason == "length":
                raise Refusal(Reason.TEACHER_TRUNCATED)
            ex, cut = encode(rec.conversation(), fmt, max_length=max_length, over_length=over_length, record_id=rec.id)
        except Refusal as refusal:
            summary.refused[refusal.reason.value] += 1
            summary.refused_ids.setdefault(refusal.reason.value, [])
            if len(summary.refused_ids[refusal.reason.value]) < 3:
                summary.refused_ids[refusal.reason.value].append(rec.id)
            continue
        examples.append(ex)
        summary.kept += 1
        summary.tokens += len(ex.input_ids)
        summary.supervised_tokens += ex.n_supervised
        summary.prompt_truncated += cut
    n_over = summary.refused.get(Reason.OVER_LENGTH.value, 0)
    if over_length == "error" and n_over:
        raise TrainError(
            f"{n_over} example(s) exceed max_length {max_length} "
            f"(e.g. {', '.join(summary.refused_ids[Reason.OVER_LENGTH.value])})",
            hint="raise train.max_length or set train.over_length to drop or truncate-prompt",
        )
    return examples, summary


def dump(example: Example, tokenizer: Any) -> Any:
    """A rich Text showing every token; supervised ones bold green, masked ones dim (for `--check`)."""
    from rich.text import Text

    text = Text()
    for tid, label in zip(example.input_ids, example.labels, strict=True):
        piece = tokenizer.decode([tid])
        shown = piece.replace("\n", "↵\n") if piece.strip() or "\n" in piece else piece.replace(" ", "·")
        text.append(shown, style="bold green" if label != IGNORE else "dim")
    return text
