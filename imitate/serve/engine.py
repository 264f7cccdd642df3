"""The model side of `imitate serve`: sequences, sampling, detokenisation and stops, one decoding step at a time.

`Engine.step(admitted)` is the whole of it, run by the scheduler in its worker thread (imitate/serve/scheduler.py):
drop the rows that finished or whose client left, prefill each newly admitted request once (its `n` sequences
share that prefill and join the batch as `n` rows), then one decoding step for every row, then sample each row's
next token and turn it into text. It returns the text deltas to deliver; it never touches the event loop.

- Sampling: temperature 0 is greedy (argmax); otherwise transformers' `TemperatureLogitsWarper` and
  `TopPLogitsWarper`, then `torch.multinomial` with the sequence's own `torch.Generator`. A request's `seed`
  seeds its sequences (sequence j of seed s: s * 1000003 + j), so the same request samples the same text
  whatever else is in the batch; without a seed they are drawn at random.
- Text: tokenizers' `DecodeStream` (skip special tokens) turns tokens into text as they come, holding back
  incomplete UTF-8. A stop token (the template's end-of-turn, the tokenizer's eos) ends a sequence with
  "stop" and adds no text; so does a stop string, whose text is cut before it. Text that could be the start of
  a stop string is held back until it cannot (`protocol.scan_stop`). "length" at `max_tokens` or at the
  context limit. `ignore_eos` (a vLLM extension, for benchmarks) masks the stop tokens out.
- `completion_tokens` counts every generated token, the closing end-of-turn token included (as vLLM does).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from imitate.serve.batch import Batch
from imitate.serve.protocol import scan_stop

SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Params:
    """What one request asks of generation (validated by `protocol.ChatRequest`)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class Delta:
    """New text of one sequence, and its finish reason once it has one."""

    index: int
    text: str
    finish: str | None
    tokens: int  # generated so far


@dataclass(eq=False)
class Sequence:
    """One choice of one request: a row of the batch while it runs."""

    owner: Request
    prompt_len: int
    params: Params
    index: int
    generator: torch.Generator | None
    warpers: list[Any]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` delivered
    finish: str | None = None
    cancelled: bool = False
    decoder: DecodeStream = field(default_factory=lambda: DecodeStream(skip_special_tokens=True))

    @property
    def done(self) -> bool:
        return self.finish is not None or self.cancelled


class Request:
    """A chat request turned into work: the prompt ids and its `n` sequences."""

    def __init__(self, prompt: list[int], params: Params, n: int = 1):
        self.prompt = prompt
        self.params = params
        base = params.seed if params.seed is not None else secrets.randbits(62)
        self.sequences = [
            Sequence(self, len(prompt), params, j, _generator(params, base, j), _warpers(params)) for j in range(n)
        ]

    def cancel(self) -> None:
        for seq in self.sequences:
            seq.cancelled = True


def _generator(params: Params, base: int, index: int) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    return torch.Generator().manual_seed((base * SEED_STRIDE + index) % 2**63)


def _warpers(params: Params) -> list[Any]:
    if params.temperature == 0:
        return []
    warpers: list[Any] = [TemperatureLogitsWarper(params.temperature)] if params.temperature != 1.0 else []
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return warpers


class Engine:
    """Owns the model and the running batch. Call `step` from one thread only."""

    def __init__(self, model: Any, tokenizer: Any, stop_ids: set[int], *, max_batch: int, max_model_len: int):
        self.batch = Batch(model, max_batch)
        # A copy of the tokenizer for this thread: the event loop encodes prompts with the original, and a Rust
        # tokenizer used from two threads at once can fail ("Already borrowed") when one call changes its settings.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.stop_ids = sorted(stop_ids)
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.rows: list[Sequence] = []
        self.steps = 0
        self.generated = 0

    def step(self, admitted: list[Request]) -> list[tuple[Sequence, Delta]]:
        with torch.inference_mode():
            self._drop_done()
            out = [d for request in admitted for d in self._start(request)]
            if self.rows:
                logits = self.batch.decode([seq.tokens[-1] for seq in self.rows])
                self.steps += 1
                out += self._advance(self.rows, logits)
            self._drop_done()
            return out

    def _start(self, request: Request) -> list[tuple[Sequence, Delta]]:
        live = [seq for seq in request.sequences if not seq.cancelled]
        if not live:
            return []
        cache, logits = self.batch.prefill(request.prompt)
        out = self._advance(live, logits.expand(len(live), -1))
        for seq in live:
            if not seq.done:
                self.batch.add(cache, len(request.prompt))
                self.rows.append(seq)
        return out

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, Delta]]:
        """Sample one token for each sequence (row i of `logits`) and turn it into a delta."""
        if any(seq.params.ignore_eos for seq in seqs):
            logits = logits.clone()
            for i, seq in enumerate(seqs):
                if seq.params.ignore_eos:
                    logits[i, self.stop_ids] = float("-inf")
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, seq in enumerate(seqs):
            token = greedy[i] if seq.generator is None else _sample(seq, logits[i])
            delta = self._accept(seq, token)
            if delta is not None:
                out.append((seq, delta))
        self.generated += len(seqs)
        return out

    def _accept(self, seq: Sequence, token: int) -> Delta | None:
        seq.tokens.append(token)
        params, safe = seq.params, None
        if token in self.stop_ids and not params.ignore_eos:
            seq.finish = "stop"
        else:
            piece = seq.decoder.step(self.backend, token)
            if piece:
                seq.text += piece
            if params.stop:
                cut, safe = scan_stop(seq.text, params.stop, seq.sent)
                if cut is not None:
                    seq.text, seq.finish = seq.text[:cut], "stop"
        if seq.finish is None and (
            len(seq.tokens) >= params.max_tokens or seq.prompt_len + len(seq.tokens) >= self.max_model_len
        ):
            seq.finish = "length"
        end = len(seq.text) if seq.finish or safe is None else safe
        text, seq.sent = seq.text[seq.sent : end], max(seq.sent, end)
        if not text and seq.finish is None:
            return None
        return Delta(seq.index, text, seq.finish, len(seq.tokens))

    def _drop_done(self) -> None:
        for i in range(len(self.rows) - 1, -1, -1):
            if self.rows[i].done:
                self.batch.remove(i)
                self.rows[i] = self.rows[-1]
                self.rows.pop()

    def reset(self) -> list[Sequence]:
        """After a failed step: forget every row (their requests fail); the batch starts empty."""
        lost, self.rows = self.rows, []
        self.batch = Batch(self.batch.model, self.max_batch)
        return lost


def _sample(seq: Sequence, logits: torch.Tensor) -> int:
    scores = logits[None]
    for warp in seq.warpers:
        scores = warp(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs[0], 1, generator=seq.generator))
