"""What local models made per prompt (answers, reward scores), kept in a journal-like JSONL so that a rerun (or a
run after `kill -9`) does not make them again; and the fingerprint that says which model and settings made them.

    journal = PromptJournal(out / "answers" / "student.jsonl")
    key = answer_key(identity, messages)          # model + settings + conversation
    journal.get(key)                              # ["the answer", ...] or None
    generate_missing(journal, load, [(key, id, messages), ...], n=1, temperature=0.0, ...)

One line per prompt, `{"key", "id", "values": [...]}` (the prompt's answers, or its samples' scores), appended
(flushed and fsynced) as soon as they exist. A torn last line (a kill in the middle of a write) is cut off when
the journal is next opened. A prompt whose key is in the journal is never generated again; a changed model,
adapter, question or setting gives a new key, so stale answers are never reused. `load()` is only called when
something is missing: a rerun with every answer cached does not load a model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imitate.errors import StorageError
from imitate.records import Message, canonical_json, sha256_text, unit_hash

_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".json", ".model")


def fingerprint(spec: str | os.PathLike[str] | None) -> Any:
    """What identifies a model without reading its weights: a Hub name as itself; a local file or folder by the
    name, size and modification time of its weight and config files (a retrained adapter in the same folder is
    a different model)."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if not path.exists():
        return str(spec)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _WEIGHTS and p.is_file())
    return [str(path.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]


def answer_key(identity: Any, messages: Sequence[Message]) -> str:
    return sha256_text(canonical_json({"model": identity, "messages": [m.model_dump() for m in messages]}))


def sample_seed(seed: int, key: str) -> int:
    """The sampling seed of one prompt: a function of the run's seed and the prompt alone, so a resumed run draws
    what an uninterrupted one would have drawn for the prompts it still has to do."""
    return int(unit_hash("sample", seed, key) * 2**31)


class PromptJournal:
    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        good = 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    row = json.loads(raw)
                    key, _ = str(row["key"]), list(row["values"])
                except (ValueError, KeyError, TypeError):
                    break
                self.rows[key] = row
                good += len(raw)
        if good != self.path.stat().st_size:  # a torn or garbled tail: cut it so the next append starts clean
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def get(self, key: str) -> list[Any] | None:
        row = self.rows.get(key)
        return None if row is None else list(row["values"])

    def append(self, key: str, id: str, values: list[Any], **extra: Any) -> None:
        row = {"key": key, "id": id, "values": values, **extra}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot write ({exc.strerror})") from exc
        self.rows[key] = row


def generate_missing(
    journal: PromptJournal,
    load: Callable[[], Any],
    prompts: Sequence[tuple[str, str, Sequence[Message]]],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> int:
    """Generate the answers of every (key, id, messages) not in the journal, appending each as it is done;
    returns how many prompts were generated. Greedy prompts go in batches of `batch_size`; sampled ones one
    prompt at a time (its `n` answers batched), each with its own seed (`sample_seed`)."""
    from imitate.evaluate.generate import generate

    todo = [p for p in prompts if journal.get(p[0]) is None]
    if not todo:
        return 0
    loaded = load()
    step = batch_size if temperature == 0 else 1
    every = max(step, len(todo) // 10)  # about ten progress lines, whatever the size
    for start in range(0, len(todo), step):
        chunk = todo[start : start + step]
        answers = generate(
            loaded.model,
            loaded.tokenizer,
            [list(m) for _, _, m in chunk],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            n=n,
            seed=sample_seed(seed, chunk[0][0]) if temperature > 0 else None,
            batch_size=batch_size,
            fmt=loaded.fmt,
        )
        for (key, id, _), texts in zip(chunk, answers, strict=True):
            journal.append(key, id, texts)
        done = min(start + step, len(todo))
        if log and (done == len(todo) or done // every != (done - len(chunk)) // every):
            log(f"generated {done}/{len(todo)} prompts with {loaded.label}")
    return len(todo)
