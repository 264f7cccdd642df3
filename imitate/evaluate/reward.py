"""Scoring answers with a reward model: any local Hugging Face folder that `AutoModelForSequenceClassification`
loads with one output (`num_labels=1`, the shape of OpenAssistant's and most RLHF reward models).

    rm = RewardModel("models/my-reward-model")
    rm.score([(messages, answer), ...])          # one float per pair, higher = better

Each (prompt messages, answer) pair is rendered with the reward model's own chat template when its tokenizer has
one (the conversation with the answer as the assistant turn), else as the text pair (question, answer) — the way
such models were trained. Batches are right-padded with the tokenizer's pad token (the end-of-sequence token when it
has none, which is then also set on the model so the head reads the last real token); longer inputs are cut
at `max_length` tokens from the left, so the answer's end is always seen. torch and transformers load here,
inside the class, never at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imitate.errors import InputError
from imitate.records import Message


class RewardModel:
    def __init__(self, path: str | Path, *, max_length: int = 2048, batch_size: int = 8):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path).expanduser()
        if not (self.path / "config.json").is_file():
            raise InputError(f"--reward-model {path}: not a model folder (no config.json)",
                             hint="give a local AutoModelForSequenceClassification folder")  # fmt: skip
        from imitate.train.model import quiet_progress

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            with quiet_progress():
                net = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32)
            self.model = net.eval()
        except (OSError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"--reward-model {path}: cannot load ({first[:200]})") from exc
        labels = self.model.config.num_labels
        if labels != 1:
            raise InputError(f"--reward-model {path}: has {labels} outputs; a reward model has one (num_labels=1)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"
        self.tokenizer.padding_side = "right"  # positions count from the first token: padding must not shift them
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings", max_length))
        self.batch_size = batch_size
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))

    def _texts(self, pairs: Sequence[tuple[Sequence[Message], str]]) -> dict[str, Any]:
        if self.chat:
            texts = [
                self.tokenizer.apply_chat_template(
                    [*(m.model_dump() for m in messages), {"role": "assistant", "content": answer}], tokenize=False
                )
                for messages, answer in pairs
            ]
            return {"text": texts}
        questions = ["\n\n".join(m.content for m in messages if m.role != "system") for messages, _ in pairs]
        return {"text": questions, "text_pair": [a for _, a in pairs]}

    def score(self, pairs: Sequence[tuple[Sequence[Message], str]]) -> list[float]:
        import torch

        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(pairs), self.batch_size):
                enc = self.tokenizer(
                    **self._texts(pairs[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    add_special_tokens=not self.chat,
                    return_tensors="pt",
                )
                logits = self.model(**enc).logits
                scores.extend(float(x) for x in logits[:, 0].tolist())
        return scores
