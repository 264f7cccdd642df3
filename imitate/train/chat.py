"""`imitate chat MODEL [--adapter DIR] [--prompt TEXT]`: one-shot or interactive generation with a student.

MODEL is a model folder, a GGUF, a Hub name, a merged model, or an adapter folder (its base is then the one it
records). Prompts are rendered exactly as training rendered them (`ChatFormat.render`: a system turn only when
a system message is given) and generation stops at the template's end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from imitate.records import Message
from imitate.train.merge import attach, base_of
from imitate.train.model import ModelSource, load_model, load_tokenizer, resolve
from imitate.train.tokenize import ChatFormat


class Student:
    """A loaded student (optionally with an adapter) that answers conversations."""

    def __init__(self, model: str | None, adapter: Path | None = None):
        if adapter is None and model and (Path(model).expanduser() / "adapter_config.json").exists():
            adapter, model = Path(model).expanduser(), None
        source = base_of(adapter, model) if adapter else resolve(model)
        self.tokenizer = load_tokenizer(ModelSource("folder", str(adapter)) if adapter else source)
        self.fmt = ChatFormat.of(self.tokenizer)
        net = load_model(source, torch.float32)
        self.model = attach(net, adapter) if adapter else net.eval()

    @torch.no_grad()
    def reply(self, messages: list[Message], max_new_tokens: int = 256, temperature: float = 0.0) -> str:
        text = self.fmt.render(messages, generation_prompt=True)
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=self.fmt.eot_id,
            pad_token_id=self.tokenizer.pad_token_id or self.fmt.eot_id,
            use_cache=True,
            **sampling,
        )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def converse(
    student: Student,
    lines: Iterable[str],
    say: Callable[[str], Any],
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> list[Message]:
    """The interactive loop over input lines (empty line or EOF ends it); returns the conversation."""
    history = [Message(role="system", content=system)] if system else []
    for line in lines:
        if not line.strip() or line.strip() in {"/exit", "/quit"}:
            break
        history.append(Message(role="user", content=line.rstrip("\n")))
        answer = student.reply(history, max_new_tokens, temperature)
        history.append(Message(role="assistant", content=answer))
        say(answer)
    return history
