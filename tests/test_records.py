"""The data contract: JSONL round-trip, stable request keys, validation of record consistency."""

from pathlib import Path

import pytest

from imitate.errors import InputError
from imitate.records import (
    GenerationParams,
    Message,
    Provenance,
    Query,
    Record,
    Request,
    Usage,
    read_jsonl,
    write_jsonl,
)


def _request(**kw) -> Request:
    base = dict(
        query_id="q1",
        teacher="a",
        model="gpt-x",
        base_url="http://h/v1",
        messages=[Message(role="system", content="be brief"), Message(role="user", content="2+2?")],
    )
    base.update(kw)
    return Request(**base)


def _record(**kw) -> Record:
    req = _request()
    base = dict(
        id="q1/a/0",
        query=Query(id="q1", question="2+2?", collection="cot", metadata={"k": [1, 2]}),
        messages=req.messages,
        response="4, because two and two make four.",
        provenance=Provenance(
            teacher="a",
            model="gpt-x",
            base_url="http://h/v1",
            request_key=req.key(),
            usage=Usage(prompt_tokens=5, completion_tokens=9, total_tokens=14),
            cost_usd=0.00012,
            finish_reason="stop",
            attempts=2,
        ),
        scores={"judge": 8.5},
    )
    base.update(kw)
    return Record(**base)


def test_jsonl_round_trip(tmp_path: Path):
    records = [
        _record(),
        _record(
            id="q2/a/0",
            status="failed",
            response=None,
            error_class="ContextTooLong",
            error_message="too long",
        ),
    ]
    path = tmp_path / "r.jsonl"
    assert write_jsonl(path, records) == 2
    back = list(read_jsonl(path))
    assert back == records
    assert back[0].conversation()[-1] == Message(role="assistant", content="4, because two and two make four.")


def test_bad_line_names_file_and_line(tmp_path: Path):
    path = tmp_path / "r.jsonl"
    path.write_text(_record().to_json() + "\n" + '{"id": "x"}\n')
    with pytest.raises(InputError, match=r"r\.jsonl:2"):
        list(read_jsonl(path))


def test_request_key_is_stable_and_covers_what_changes_the_answer():
    k = _request().key()
    assert k == _request().key()
    assert len(k) == 64
    assert _request(base_url="http://h/v1/").key() == k  # trailing slash is the same endpoint
    changed = [
        _request(model="gpt-y"),
        _request(base_url="http://other/v1"),
        _request(messages=[Message(role="user", content="2+2?")]),  # system prompt removed
        _request(messages=[Message(role="system", content="be long"), Message(role="user", content="2+2?")]),
        _request(params=GenerationParams(temperature=0.1)),
        _request(sample_index=1),
    ]
    assert len({r.key() for r in changed} | {k}) == len(changed) + 1
    # bookkeeping fields do not change what is asked, so they do not change the key
    assert _request(query_id="other", teacher="b", system_prompt_id="orca-03").key() == k


def test_query_messages_and_stable_ids():
    q = Query(
        id="x",
        question="why?",
        turns=[Message(role="user", content="hi"), Message(role="assistant", content="hello")],
    )
    assert [m.role for m in q.messages(None)] == ["user", "assistant", "user"]
    assert [m.role for m in q.messages("")] == ["user", "assistant", "user"]  # empty system: no system turn
    assert q.messages("sys")[0] == Message(role="system", content="sys")
    assert Query.stable_id("why?") == Query.stable_id("why?")
    assert Query.stable_id("why?") != Query.stable_id("why?", system="s")


def test_record_consistency_and_unknown_fields_rejected():
    with pytest.raises(ValueError, match="needs a response"):
        _record(response=None)
    with pytest.raises(ValueError, match="error_class"):
        _record(status="failed", response=None)
    with pytest.raises(ValueError):
        Record.model_validate({**_record().model_dump(), "surprise": 1})


def test_usage_adds():
    assert Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3) + Usage(
        prompt_tokens=1, completion_tokens=1, total_tokens=2
    ) == Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5)
