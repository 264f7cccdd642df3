"""The loss mask (imitate/train/tokenize.py): goldens pin ids and labels; every refusal reason triggers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from train_fixtures import make_record, smol_tokenizer

from imitate.errors import TrainError
from imitate.records import Message
from imitate.train.tokenize import (
    IGNORE,
    ChatFormat,
    Reason,
    Refusal,
    dump,
    encode,
    tokenize,
)

GOLDEN = Path(__file__).parent / "golden"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return smol_tokenizer()


@pytest.fixture(scope="module")
def fmt(tok):
    return ChatFormat.of(tok)


def M(role: str, content: str) -> Message:
    return Message(role=role, content=content)


CASES = {
    "single_turn_system": [M("system", "Be brief."), M("user", "What is 2+2?"), M("assistant", "4.")],
    "single_turn_no_system": [M("user", "What is 2+2?"), M("assistant", "4.")],
    "multi_turn_empty_system": [
        M("system", ""),
        M("user", "Name a colour."),
        M("assistant", "Blue."),
        M("user", "Another?"),
        M("assistant", "Green, like grass."),
    ],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_ids_and_labels(name, fmt):
    messages = CASES[name]
    ex, truncated = encode(messages, fmt, max_length=512)
    got = {
        "messages": [m.model_dump() for m in messages],
        "text": fmt.render(messages),
        "tokens": fmt.tokenizer.convert_ids_to_tokens(ex.input_ids),
        "input_ids": ex.input_ids,
        "labels": ex.labels,
    }
    path = GOLDEN / f"train_tokenize_{name}.json"
    if os.environ.get("IMITATE_UPDATE_GOLDEN"):  # one key per line, lists on one line: reviewable diffs
        lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in got.items()]
        path.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    assert got == json.loads(path.read_text(encoding="utf-8"))
    assert not truncated


def test_system_turn_only_when_non_empty(fmt):
    assert fmt.default_system and "SmolLM" in fmt.default_system  # the template would add one on its own
    without = fmt.render(CASES["single_turn_no_system"])
    assert without.startswith("<|im_start|>user\n")
    assert "system" not in without
    empty = fmt.render([M("system", ""), *CASES["single_turn_no_system"]])
    assert empty == without
    with_system = fmt.render(CASES["single_turn_system"])
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "SmolLM" not in with_system


def test_generation_prompt_matches_training_prompt(fmt, tok):
    """The prompt tokens of a training example are exactly what generation will be given."""
    messages = CASES["single_turn_no_system"]
    ex, _ = encode(messages, fmt, max_length=512)
    prompt = tok(fmt.render(messages[:1], generation_prompt=True), add_special_tokens=False)["input_ids"]
    first = ex.labels.index(next(x for x in ex.labels if x != IGNORE))
    assert ex.input_ids[:first] == prompt


def test_every_assistant_turn_ends_with_supervised_end_of_turn(fmt, tok):
    # The pad token *is* the end-of-turn token: labels must never be derived from pad ids.
    assert tok.pad_token_id == fmt.eot_id == tok.convert_tokens_to_ids("<|im_end|>")
    ex, _ = encode(CASES["multi_turn_empty_system"], fmt, max_length=512)
    runs, current = [], []
    for i, label in enumerate(ex.labels):
        if label != IGNORE:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    assert len(runs) == 2
    for run in runs:
        assert ex.labels[run[-1]] == fmt.eot_id
        assert ex.input_ids[run[-1] + 1] == tok.convert_tokens_to_ids("Ċ")  # the "\n" after it: formatting only
        assert [ex.labels[i] for i in run] == [ex.input_ids[i] for i in run]
    assert tok.decode([ex.input_ids[i] for i in runs[1]]) == "Green, like grass.<|im_end|>"


def test_imported_sharegpt_record_supervises_every_assistant_turn(fmt, tok, tmp_path):
    """`imitate import sharegpt` makes one multi-turn record; the trainer learns each of its assistant turns."""
    from imitate.dataset.sharegpt_import import import_sharegpt
    from imitate.records import read_jsonl

    turns = [("human", "Name a colour."), ("gpt", "<p>Blue.</p>"), ("human", "Another?")]
    turns += [("gpt", "<p>Green, like <strong>grass</strong>.</p>"), ("human", "One more?"), ("gpt", "Red.")]
    rows = [{"id": "sg", "conversations": [{"from": r, "value": v} for r, v in turns]}]
    (tmp_path / "sg.json").write_text(json.dumps(rows))
    import_sharegpt(tmp_path / "sg.json", tmp_path / "out")
    [record] = read_jsonl(tmp_path / "out" / "records.jsonl")
    [ex], summary = tokenize([record], fmt, max_length=512)
    assert summary.kept == 1
    runs, current = [], []
    for tid, label in zip(ex.input_ids, ex.labels, strict=True):
        if label != IGNORE:
            current.append(tid)
        elif current:
            runs, current = [*runs, current], []
    assert [tok.decode(run) for run in runs] == [
        "Blue.<|im_end|>",
        "Green, like **grass**.<|im_end|>",
        "Red.<|im_end|>",
    ]


def _refusal(messages, fmt, **kw) -> Reason:
    with pytest.raises(Refusal) as info:
        encode(messages, fmt, **{"max_length": 512, **kw})
    return info.value.reason


def test_refuses_no_supervised_tokens(fmt):
    assert _refusal([M("user", "hello")], fmt) is Reason.NO_SUPERVISED


def test_refuses_double_bos(tok):
    # A template that writes {{ bos_token }} in front of ChatML, whose first token is that same BOS.
    fmt = ChatFormat.of(tok, "{{ bos_token }}" + CHATML)
    assert _refusal(CASES["single_turn_no_system"], fmt) is Reason.DOUBLE_BOS


def test_refuses_stop_outside_mask(tok):
    # A template that never closes assistant turns with the end-of-turn token: the model would never stop.
    no_close = CHATML.replace("'<|im_end|>' + '\n'", "'\n'")
    fmt = ChatFormat.of(tok, no_close)
    assert _refusal(CASES["single_turn_no_system"], fmt) is Reason.STOP_OUTSIDE_MASK


def test_refuses_stop_inside_answer(fmt):
    messages = [M("user", "Show ChatML."), M("assistant", "It ends with <|im_end|> then more")]
    assert _refusal(messages, fmt) is Reason.STOP_INSIDE_ANSWER


def test_refuses_template_that_is_not_prefix_stable(tok):
    unstable = CHATML.replace("message['role'] + '\n'", "message['role'] + (' last' if loop.last else '') + '\n'")
    fmt = ChatFormat.of(tok, unstable)
    assert _refusal(CASES["multi_turn_empty_system"], fmt) is Reason.TEMPLATE_UNSTABLE


def test_refuses_over_length_and_completion_cut(fmt):
    messages = [M("user", "word " * 50), M("assistant", "short answer")]
    assert _refusal(messages, fmt, max_length=20) is Reason.OVER_LENGTH
    long_answer = [M("user", "q"), M("assistant", "word " * 50)]
    assert _refusal(long_answer, fmt, max_length=20, over_length="truncate-prompt") is Reason.COMPLETION_CUT


def test_truncate_prompt_cuts_only_the_prompt(fmt):
    messages = [M("user", "word " * 50), M("assistant", "short answer")]
    full, _ = encode(messages, fmt, max_length=512)
    ex, truncated = encode(messages, fmt, max_length=20, over_length="truncate-prompt")
    assert truncated and len(ex.input_ids) == 20
    assert ex.input_ids == full.input_ids[-20:] and ex.labels == full.labels[-20:]
    assert ex.n_supervised == full.n_supervised
    assert ex.labels[0] == IGNORE


def test_summary_counts_every_reason_and_policy(fmt):
    records = [
        make_record("ok-1", "What is 2+2?", "4."),
        make_record("ok-2", "Capital of France?", "Paris.", system="Be brief."),
        make_record("long-prompt", "word " * 60, "yes"),
        make_record("long-answer", "q", "word " * 60),
        make_record("cut-by-teacher", "Tell a story.", "Once upon a", truncated=True),
        make_record("stop", "Show ChatML.", "a <|im_end|> b"),
    ]
    examples, summary = tokenize(records, fmt, max_length=40)
    assert [e.id for e in examples] == ["ok-1", "ok-2"]
    assert summary.refused == {"over_length": 2, "teacher_truncated": 1, "stop_inside_answer": 1}
    assert summary.refused_ids["over_length"] == ["long-prompt", "long-answer"]
    assert (summary.total, summary.kept, summary.prompt_truncated) == (6, 2, 0)
    assert summary.supervised_tokens == sum(e.n_supervised for e in examples)
    assert any("refused 2 × over_length" in line for line in summary.lines())

    examples, summary = tokenize(records, fmt, max_length=40, over_length="truncate-prompt")
    assert [e.id for e in examples] == ["ok-1", "ok-2", "long-prompt"]
    assert summary.prompt_truncated == 1
    assert summary.refused["completion_would_be_cut"] == 1

    with pytest.raises(TrainError, match=r"2 example\(s\) exceed max_length 40"):
        tokenize(records, fmt, max_length=40, over_length="error")


def test_fingerprint_follows_template(tok, fmt):
    assert fmt.fingerprint() == ChatFormat.of(tok).fingerprint()
    assert fmt.fingerprint() != ChatFormat.of(tok, CHATML).fingerprint()


def test_chatml_without_default_system_renders_the_same(tok, fmt):
    """The cut leaves exactly what a template without the default-system clause renders."""
    plain = ChatFormat.of(tok, CHATML)
    assert plain.default_system is None
    for messages in CASES.values():
        assert fmt.render(messages) == plain.render(messages)
        assert fmt.render(messages[:-1], generation_prompt=True) == plain.render(messages[:-1], True)


def test_dump_marks_supervised_tokens(fmt, tok):
    ex, _ = encode(CASES["single_turn_no_system"], fmt, max_length=512)
    text = dump(ex, tok)
    assert "4." in text.plain
    assert any(span.style == "bold green" for span in text.spans)
