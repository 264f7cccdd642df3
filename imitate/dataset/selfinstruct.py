"""Self-Instruct (Wang et al. 2022) as Alpaca used it, the pure parts: seed tasks, the versioned prompt, the
prompts of a round, parsing the teacher's numbered list, and the filters. The loop that asks the teacher is
`selfinstruct_run.py` (`imitate generate self-instruct SEEDS --out DIR --target N`).

- Seeds: the seed-task file as Self-Instruct and Alpaca published it (JSONL of `{"id", "name", "instruction",
  "instances": [{"input", "output"}], "is_classification"}`, the first instance shown), or plain rows with
  `instruction` and optional `input`/`output` columns in any file `imitate harvest` reads (JSONL, JSON, CSV,
  Parquet, a saved datasets folder). Bad rows are one-line InputErrors naming file:line (or the seed's id).
- The prompt (`prompts/self_instruct.yaml`): wording, demo layout, how many seed and generated tasks it shows,
  the generation parameters and the filter policy, pinned by a sha256 over all of it. Alpaca showed 3 seed tasks;
  we show 2 seed + 1 generated once generated tasks exist (Self-Instruct's later rounds mixed machine tasks in
  too), shuffled, then leave "N. Instruction:" open for the teacher to continue the list.
- A round's prompts derive only from (seed tasks, prompt hash, config seed, round, pool digest) with a seeded RNG:
  a rerun derives the same prompts, so the same query ids. No prompt is asked twice (a repeat is drawn again).
- Filters, in order, each rejection counted by reason: empty, too_short / too_long (words), starts_with_punctuation,
  starts_non_ascii, blacklisted (a word naming what a text model cannot do, matched as a whole word), similar
  (ROUGE-L F > threshold against any task in the pool: seeds and every task kept so far).
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imitate.dataset.formats import ALPACA_INPUT
from imitate.errors import ConfigError, InputError
from imitate.records import GenerationParams, Query, canonical_json, sha256_text

PROMPT_FILE = "self_instruct.yaml"
_HEX64 = r"^[0-9a-f]{64}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Task(_Model):
    """One task of the pool: a seed, or one the teacher generated (with where it came from)."""

    id: str
    instruction: str
    input: str = ""
    output: str | None = None  # seeds only: generated tasks are answered by the teacher, not by the list
    origin: str = "generated"  # "seed" or "generated"
    round: int | None = None
    generation_query_id: str | None = None
    generation_request_key: str | None = None

    @staticmethod
    def content_id(instruction: str, input: str) -> str:
        return "t-" + sha256_text(canonical_json({"instruction": instruction, "input": input}))[:16]


# ---------------------------------------------------------------------------------------------- the prompt


class DemoMix(_Model):
    seed: int = Field(2, ge=0)
    generated: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _some(self) -> DemoMix:
        if self.seed + self.generated < 1:
            raise ValueError("the prompt must show at least one task")
        return self


class FilterPolicy(_Model):
    min_words: int = Field(4, ge=1)
    max_words: int = Field(150, ge=1)
    rouge_threshold: float = Field(0.7, gt=0, le=1)
    blacklist: list[str] = Field(default_factory=list)


class SelfInstructPrompt(_Model):
    """`prompts/self_instruct.yaml`. `sha256` covers every field but itself and `description`."""

    id: str
    version: int = Field(ge=1)
    description: str = ""
    sha256: str = Field(pattern=_HEX64)
    template: str  # {list_length}, {demos}, {next}, {no_input}
    demo: str  # {n}, {instruction}, {input}
    no_input: str = "<noinput>"
    list_length: int = Field(20, ge=2)
    demos: DemoMix = Field(default_factory=DemoMix)
    params: GenerationParams = Field(default_factory=GenerationParams)
    filters: FilterPolicy = Field(default_factory=FilterPolicy)

    def content_sha256(self) -> str:
        return sha256_text(canonical_json(self.model_dump(mode="json", exclude={"sha256", "description"})))

    @model_validator(mode="after")
    def _placeholders(self) -> SelfInstructPrompt:
        try:
            self.template.format(list_length=1, demos="", next=1, no_input="")
            self.demo.format(n=1, instruction="", input="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"unknown or malformed placeholder in template/demo ({exc})") from None
        if "{demos}" not in self.template or "{next}" not in self.template or "{instruction}" not in self.demo:
            raise ValueError("template needs {demos} and {next}, demo needs {instruction}")
        return self


def load_prompt(path: Path | str | None = None) -> SelfInstructPrompt:
    """Load and check the prompt file (default: `self_instruct.yaml` in the prompts folder)."""
    from imitate.prompts import default_prompts_dir, load_model

    path = Path(path) if path is not None else default_prompts_dir() / PROMPT_FILE
    spec = load_model(path, SelfInstructPrompt)
    if spec.content_sha256() != spec.sha256:
        raise ConfigError(
            f"{path}: sha256 does not match the content (it hashes to {spec.content_sha256()})",
            hint="an edited prompt needs a new sha256 and a version bump",
        )
    return spec


def render_prompt(spec: SelfInstructPrompt, demos: list[Task]) -> str:
    blocks = [
        spec.demo.format(n=i, instruction=t.instruction, input=t.input or spec.no_input) for i, t in enumerate(demos, 1)
    ]
    return spec.template.format(
        list_length=spec.list_length, demos="\n".join(blocks), next=len(demos) + 1, no_input=spec.no_input
    )


# ---------------------------------------------------------------------------------------------- seeds


def read_seeds(path: str) -> list[Task]:
    """Seed tasks from the published seed-task JSONL or plain instruction/input/output rows."""
    from imitate.config import FieldMap, SourceConfig
    from imitate.harvest.sources import open_source

    fields = FieldMap(question="instruction", system=None, id="id", collection=None)
    seeds = []
    for row, q in enumerate(open_source(path, SourceConfig(fields=fields))):
        where = f"{path}: seed {q.id!r} (row {row + 1})"
        meta = q.metadata
        if "instances" in meta:
            instances = meta["instances"]
            if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
                raise InputError(f"{where}: instances must be a non-empty list of {{input, output}} objects")
            meta = instances[0]
        input_, output = meta.get("input"), meta.get("output")
        for name, value in (("input", input_), ("output", output)):
            if value is not None and not isinstance(value, str):
                raise InputError(f"{where}: {name} must be a string, got {type(value).__name__}")
        seeds.append(
            Task(id=q.id, instruction=q.question.strip(), input=(input_ or "").strip(), output=output, origin="seed")
        )
    if not seeds:
        raise InputError(f"{path}: no seed tasks", hint="one task per row, with an instruction")
    return seeds


def seeds_digest(seeds: list[Task]) -> str:
    return sha256_text(canonical_json([[t.instruction, t.input] for t in seeds]))


# ---------------------------------------------------------------------------------------------- a round


def pool_step(digest: str, task_id: str) -> str:
    """The pool digest after one more kept task (a rolling hash: O(1) per task)."""
    return hashlib.sha256(f"{digest}|{task_id}".encode()).hexdigest()


def round_queries(
    spec: SelfInstructPrompt,
    seeds: list[Task],
    generated: list[Task],
    *,
    round_no: int,
    per_round: int,
    state: str,
    used: set[str],
) -> list[Query]:
    """The generation queries of one round. `state` digests everything the round may depend on (seeds, prompt,
    config seed, pool); `used` holds the digests of prompts already asked this run (a repeat is drawn again)."""
    rng = random.Random(int(hashlib.sha256(f"{state}|{round_no}".encode()).hexdigest()[:16], 16))
    out = []
    for i in range(per_round):
        for _ in range(20):
            n_gen = min(spec.demos.generated, len(generated))
            n_seed = min(len(seeds), spec.demos.seed + spec.demos.generated - n_gen)
            demos = rng.sample(seeds, n_seed) + rng.sample(generated, n_gen)
            rng.shuffle(demos)
            prompt = render_prompt(spec, demos)
            digest = sha256_text(prompt)
            if digest not in used:
                break
        else:
            continue  # a pool this small has no new prompt left for this slot
        used.add(digest)
        meta = {
            "step": "generate",
            "round": round_no,
            "index": i,
            "prompt_id": spec.id,
            "prompt_sha256": spec.sha256,
            "demos": [t.id for t in demos],
        }
        out.append(
            Query(
                id=f"si-gen-r{round_no:05d}-{i:02d}-{digest[:12]}",
                question=prompt,
                system="",
                collection="self-instruct/generate",
                metadata={"self_instruct": meta},
            )
        )
    return out


def answer_query(task: Task, spec: SelfInstructPrompt) -> Query:
    """The query that asks the teacher to do a kept task: the instruction, then its input after a blank line, as
    the alpaca reader joins them (the input is kept in metadata the same way, so alpaca export splits it back)."""
    question = f"{task.instruction}\n\n{task.input}" if task.input else task.instruction
    origin = {
        "step": "answer",
        "task_id": task.id,
        "instruction": task.instruction,
        "round": task.round,
        "generation_query_id": task.generation_query_id,
        "generation_request_key": task.generation_request_key,
        "prompt_id": spec.id,
        "prompt_sha256": spec.sha256,
    }
    metadata: dict[str, Any] = {"self_instruct": origin} | ({ALPACA_INPUT: task.input} if task.input else {})
    return Query(id="si-" + task.id, question=question, collection="self-instruct", metadata=metadata)


# ---------------------------------------------------------------------------------------------- parsing


@dataclass
class ParsedTask:
    number: int | None
    instruction: str
    input: str = ""
    output: str | None = None


_HEADER = re.compile(r"^\s*(?:#{1,6}\s*)?(?:\*\*)?(?:task\s*)?(\d{1,4})\s*(?:\*\*)?\s*[.):]\s*(.*)$", re.IGNORECASE)
_FIELD = re.compile(
    r"^\s*(?:[-•]\s*)?[*_]{0,2}\s*(instruction|input|output)\s*[*_]{0,2}\s*:\s*[*_]{0,2}\s*(.*)$", re.IGNORECASE
)
_SEPARATOR = re.compile(r"^\s*(?:#{3,}|-{3,}|\*{3,}|={3,})\s*$")
_NO_INPUT = {"", "<noinput>", "<no input>", "noinput", "no input", "none", "n/a", "(none)", "-", "<none>", "null"}


class _Item:
    def __init__(self, number: int | None):
        self.number = number
        self.fields: dict[str, list[str]] = {"instruction": []}
        self.current = "instruction"
        self.labelled = False  # an Input:/Output: label was seen (a continued first item is one, not a preamble)
        self.closed = False

    def add(self, line: str) -> None:
        self.fields.setdefault(self.current, []).append(line)

    def has_text(self) -> bool:
        return any(line.strip() for lines in self.fields.values() for line in lines)

    def start(self, name: str, rest: str) -> None:
        self.current = name
        self.labelled |= name != "instruction"
        self.fields.setdefault(name, [])
        if rest.strip():
            self.fields[name].append(rest)

    def result(self) -> ParsedTask | None:
        instruction = " ".join(" ".join(self.fields["instruction"]).split()).strip("*_ ")
        if not instruction:
            return None
        input_ = "\n".join(self.fields.get("input", [])).strip()
        input_ = "" if input_.lower() in _NO_INPUT else input_
        output = "\n".join(self.fields["output"]).strip() if "output" in self.fields else None
        return ParsedTask(self.number, instruction, input_, output)


def parse_task_list(text: str, first: int | None = None, *, truncated: bool = False) -> list[ParsedTask]:
    """Tasks from a teacher's numbered list. `first` is the number the prompt left open ("N. Instruction:"): text
    before the first numbered item is that item continued when it carries an Input:/Output: label, ends at a
    separator, or the next number is first + 1; otherwise it is a preamble ("Sure! Here are ...") and dropped.
    Accepts "1." / "2)" / "Task 3:" numbering, Instruction:/Input:/Output: fields (numbered or not, bold or not),
    ### / --- separators, and plain numbered instructions without fields. Numbered lines inside an input or
    output (a list to sort) stay part of it. With `truncated`, the last item (cut off) is dropped."""
    items: list[_Item] = []
    item = _Item(first)  # the item the prompt left open, or a preamble
    for line in text.splitlines():
        if _SEPARATOR.match(line):
            item.closed = True
            continue
        header = _HEADER.match(line)
        field = _FIELD.match(header.group(2) if header else line)
        if field:
            name, rest = field.group(1).lower(), field.group(2)
            if name == "instruction" and (item.closed or item.labelled or item.has_text()):
                items.append(item)
                item = _Item(int(header.group(1)) if header else None)
            item.start(name, rest)
            continue
        if header and (item.closed or item.current == "instruction"):
            items.append(item)
            item = _Item(int(header.group(1)))
            item.add(header.group(2))
            continue
        if item.closed and line.strip():
            items.append(item)
            item = _Item(None)
        item.add(line)
    items.append(item)
    lead = items[0]
    nxt = items[1].number if len(items) > 1 else None
    if not (lead.labelled or (lead.closed and lead.has_text()) or (first is not None and nxt == first + 1)):
        items.pop(0)  # a preamble (or nothing)
    parsed = [p for it in items if (p := it.result()) is not None]
    return parsed[:-1] if truncated else parsed


# ---------------------------------------------------------------------------------------------- filtering


def rule_violation(instruction: str, policy: FilterPolicy, blacklist: re.Pattern | None = None) -> str | None:
    """Why a generated instruction is rejected before any similarity check, or None."""
    text = instruction.strip()
    if not text:
        return "empty"
    words = len(text.split())
    if words < policy.min_words:
        return "too_short"
    if words > policy.max_words:
        return "too_long"
    if text[0] in string.punctuation:
        return "starts_with_punctuation"
    if not text[0].isascii():
        return "starts_non_ascii"
    blacklist = blacklist if blacklist is not None else blacklist_pattern(policy.blacklist)
    if blacklist is not None and blacklist.search(text.lower()):
        return "blacklisted"
    return None


def blacklist_pattern(words: list[str]) -> re.Pattern | None:
    if not words:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(w.lower()) for w in words) + r")\b")


class TaskFilter:
    """The filters over a growing pool: `admit(instruction)` returns the rejection reason (counted) or None, in
    which case the instruction has joined the pool (`add` puts seeds in without checks)."""

    def __init__(self, policy: FilterPolicy):
        from imitate.dataset.similarity import RougeIndex

        self.policy = policy
        self.index = RougeIndex()
        self.rejected: Counter[str] = Counter()
        self._blacklist = blacklist_pattern(policy.blacklist)

    def add(self, instruction: str) -> None:
        self.index.add(instruction)

    def reason(self, instruction: str) -> str | None:
        why = rule_violation(instruction, self.policy, self._blacklist)
        if why is None and self.index.max_score(instruction, self.policy.rouge_threshold) > self.policy.rouge_threshold:
            why = "similar"
        return why

    def admit(self, instruction: str) -> str | None:
        why = self.reason(instruction)
        if why is None:
            self.index.add(instruction)
        else:
            self.rejected[why] += 1
        return why
