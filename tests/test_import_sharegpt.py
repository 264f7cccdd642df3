"""`imitate import sharegpt` (imitate/dataset/sharegpt*.py, chatgpt_html.py, language.py): ChatGPT's HTML to
Markdown, odd roles, shape rules, language filter, splitting by token budget, exact and near dedup, manifest
counts, bad input as one line, and the command end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from imitate.cli import main
from imitate.dataset.chatgpt_html import to_markdown
from imitate.dataset.io import BadRow
from imitate.dataset.language import detect
from imitate.dataset.sharegpt import Counts, Dropped, normalise_turns, shape, split_by_budget
from imitate.dataset.sharegpt_import import ImportSettings, import_sharegpt
from imitate.errors import ConfigError, InputError
from imitate.records import Message, read_jsonl

# What ChatGPT's page held for one answer, as ShareGPT exported it (classes trimmed, structure kept).
CHATGPT_HTML = (
    '1 / 2<div class="markdown prose w-full break-words dark:prose-invert light"><p>Use <strong>snake_case</strong>'
    ' &amp; keep *args:</p><pre><div class="bg-black rounded-md"><div class="flex items-center"><span>python'
    '</span><button class="flex ml-auto gap-2"><svg viewBox="0 0 24 24"><path d="M16 4h2"></path></svg>Copy code'
    '</button></div><div class="p-4"><code class="!whitespace-pre hljs language-python"><span class="hljs-keyword">'
    'def</span> <span class="hljs-title function_">add_two</span>(x_1, *args):\n    <span class="hljs-keyword">'
    'return</span> x_1 + <span class="hljs-number">2</span>\n</code></div></div></pre><ol><li><p>First</p></li>'
    "<li>Then <code>a_b</code></li></ol><h2>Table</h2><table><thead><tr><th>n</th><th>n²</th></tr></thead><tbody>"
    '<tr><td>2</td><td>4</td></tr></tbody></table><p>So <span class="katex"><span class="katex-mathml"><math>'
    '<semantics><mrow><mi>E</mi></mrow><annotation encoding="application/x-tex">E = mc^2</annotation></semantics>'
    '</math></span><span class="katex-html" aria-hidden="true">E=mc2</span></span> holds.</p></div>'
)
CHATGPT_MARKDOWN = """Use **snake_case** & keep *args:

```python
def add_two(x_1, *args):
    return x_1 + 2
```

1. First
2. Then `a_b`

## Table

| n | n² |
| --- | --- |
| 2 | 4 |

So $E = mc^2$ holds."""


def T(role: str, value) -> dict:
    return {"from": role, "value": value}


def write(tmp_path: Path, rows: list, name: str = "sharegpt.json") -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def run(tmp_path: Path, rows: list, **settings) -> tuple[list, list, dict]:
    out = tmp_path / "out"
    import_sharegpt(write(tmp_path, rows), out, ImportSettings(**settings))
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    return list(read_jsonl(out / "records.jsonl")), dropped, json.loads((out / "manifest.json").read_text())


def prose(seed: int, words: int = 200) -> str:
    vocab = (
        "alpha bravo cedar delta ember fjord grove harbor island jungle kettle lemon maple nectar ocean "
        "pepper quartz river saddle timber umbra velvet willow xenon yarrow zephyr amber basil cobalt dune"
    )
    rng = random.Random(seed)
    return " ".join(rng.choice(vocab.split()) for _ in range(words))


# ---------------------------------------------------------------------------------------------- HTML to Markdown


def test_chatgpt_html_becomes_markdown_with_fenced_code_and_no_page_furniture():
    markdown, was_html = to_markdown(CHATGPT_HTML)
    assert was_html
    assert markdown == CHATGPT_MARKDOWN


@pytest.mark.parametrize(
    "text",
    [
        "Rename my_var_name to *this* and **that**",
        "How do I center a <div> in CSS? & what is &amp;?",
        "<p>hello</p> what does this tag do?",
        "3 / 4 of a cup of flour",
        "# already markdown\n\n- a_b\n- `c_d`",
    ],
)
def test_plain_text_passes_through_unchanged(text):
    assert to_markdown(text) == (text, False)


def test_a_chatgpt_code_block_left_inside_markdown_is_converted_in_place():
    code_block = CHATGPT_HTML[CHATGPT_HTML.index("<pre>") : CHATGPT_HTML.index("</pre>") + 6]
    value = f"Steps:\n\n1. **Route**\n* define_it\n\n{code_block}\n\nDone."
    fenced = CHATGPT_MARKDOWN[CHATGPT_MARKDOWN.index("```python") : CHATGPT_MARKDOWN.index("```\n\n1.") + 3]
    assert to_markdown(value) == (f"Steps:\n\n1. **Route**\n* define_it\n\n{fenced}\n\nDone.", True)


def test_counter_glued_to_a_typed_value_is_removed():
    assert to_markdown("1 / 1Write a poem about the sea") == ("Write a poem about the sea", False)


# ---------------------------------------------------------------------------------------------- roles and shape


def test_odd_roles_are_normalised_and_empty_or_malformed_turns_removed():
    counts = Counts()
    raw = [
        T("System", "Be brief."),
        T("HUMAN", "Hi"),
        T("ChatGPT", "<p>Hello!</p>"),
        T("user", "   "),
        {"from": "gpt"},
        "not a turn",
        T("user", "And you?"),
        T("bard", "Fine."),
        T("human", "Who are you?"),
        T("bing", "A search engine."),
        T("user", "And?"),
        T("assistant", "That is all."),
    ]
    turns = normalise_turns(raw, counts)
    assert [m.role for m in turns] == ["system", "user", "assistant"] + ["user", "assistant"] * 3
    assert turns[2].content == "Hello!"
    assert counts.turns == {"empty": 1, "malformed": 2} and counts.html_turns == 1


def test_unknown_role_is_a_bad_row_naming_the_field():
    with pytest.raises(BadRow, match=r"conversations\[1\]\.from: unknown role 'robot'"):
        normalise_turns([T("human", "hi"), T("robot", "beep")], Counts())


def M(role: str, content: str = "x") -> Message:
    return Message(role=role, content=content)


def test_shape_trims_leading_assistant_and_trailing_user_and_drops_what_does_not_alternate():
    counts = Counts()
    shaped = shape([M("system"), M("assistant"), M("user"), M("assistant"), M("user")], counts)
    assert [m.role for m in shaped] == ["system", "user", "assistant"]
    assert counts.turns == {"leading_assistant": 1, "trailing_user": 1}
    for turns, reason in [
        ([M("user"), M("user"), M("assistant")], "not_alternating"),
        ([M("user"), M("assistant"), M("assistant")], "not_alternating"),
        ([M("user"), M("system"), M("assistant")], "not_alternating"),
        ([M("assistant"), M("user")], "no_exchange"),
        ([M("system")], "no_exchange"),
        ([], "no_exchange"),
    ]:
        with pytest.raises(Dropped) as info:
            shape(turns, Counts())
        assert info.value.reason == reason, turns


# ---------------------------------------------------------------------------------------------- splitting


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def test_split_at_turn_boundaries_each_part_ending_with_the_assistant():
    # One token per word (a counter the test controls) plus 6 per turn: each exchange below costs 10+10+12 = 32.
    def count(text: str) -> int:
        return len(text.split())

    system = M("system", words(4, "s"))  # 10 tokens, repeated in every part
    body = [M(r, words(10, f"{r[0]}{i}")) for i in range(4) for r in ("user", "assistant")]
    counts = Counts()
    parts = split_by_budget([system, *body], 80, count, counts)  # 10 + 2 exchanges (64) fits, 3 do not
    assert [[m.content for m in p] for p in parts] == [
        [system.content, *(m.content for m in body[0:4])],
        [system.content, *(m.content for m in body[4:8])],
    ]
    assert all(p[-1].role == "assistant" and p[1].role == "user" for p in parts)
    assert split_by_budget([system, *body], None, count, counts) == [[system, *body]]

    long_middle = [*body[:2], M("user", words(100, "long")), M("assistant", "ok"), *body[2:4]]
    parts = split_by_budget(long_middle, 40, count, counts)
    assert [[m.content for m in p] for p in parts] == [[m.content for m in body[:2]], [m.content for m in body[2:4]]]
    assert counts.turns["over_budget"] == 2
    with pytest.raises(Dropped, match="over_budget"):
        split_by_budget([M("user", words(100, "w")), M("assistant", "ok")], 40, count, Counts())


def test_split_ids_and_the_tokenizer_are_used(tmp_path: Path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(50)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    # 8 words a turn: 8 + 6 = 14 tokens with the tokenizer; the word estimate says ceil(8 * 4/3) + 6 = 17.
    turn = " ".join(f"w{i}" for i in range(8))
    rows = [{"id": "long", "conversations": [T(r, turn) for _ in range(3) for r in ("human", "gpt")]}]
    records, _, manifest = run(tmp_path, rows, max_tokens=56, tokenizer=str(tmp_path / "tok"))
    assert [r.id for r in records] == ["long_0", "long_1"]  # 2 exchanges (56 tokens) fit, the third starts a part
    assert [len(r.conversation()) for r in records] == [4, 2]
    assert records[0].query.metadata == {"part": 0, "parts": 2}
    assert manifest["split_conversations"] == 1 and manifest["records"] == 2
    assert manifest["settings"]["token_count"].startswith("tokenizer:")
    records, _, _ = run(tmp_path, rows, max_tokens=56)  # the estimate: one exchange (34 tokens) per part
    assert [r.id for r in records] == ["long_0", "long_1", "long_2"]


# ---------------------------------------------------------------------------------------------- language


GERMAN = "Kannst du mir bitte erklären, wie ich einen Apfelkuchen backe? Ich habe Äpfel, Mehl und Zucker zu Hause."
FRENCH = "Peux-tu m'expliquer comment préparer une tarte aux pommes ? J'ai des pommes, de la farine et du sucre."
ENGLISH = "Could you please explain how I bake an apple pie? I have apples, flour and sugar at home."


def test_detect_names_the_language_and_abstains_on_nothing():
    assert detect(GERMAN)[0] == "de" and detect(FRENCH)[0] == "fr" and detect(ENGLISH)[0] == "en"
    assert detect("12 + 7 = ?") == ("und", 0.0)


def test_language_filter_drops_german_and_french_with_lang_en(tmp_path: Path):
    rows = [
        {"id": "de", "conversations": [T("human", GERMAN), T("gpt", "Gerne! Zuerst den Teig vorbereiten.")]},
        {"id": "fr", "conversations": [T("human", FRENCH), T("gpt", "Bien sûr ! D'abord, préparez la pâte.")]},
        {"id": "en", "conversations": [T("human", ENGLISH), T("gpt", "Sure! First make the dough.")]},
        {"id": "code", "conversations": [T("human", "```\nprint(1)\n```"), T("gpt", "It prints 1.")]},
    ]
    records, dropped, manifest = run(tmp_path, rows, languages=("en",))
    assert sorted(r.id for r in records) == ["code", "en"]
    assert records[0].query.metadata["language"] == "en"
    assert {d["row"]["id"]: d["reason"] for d in dropped} == {"de": "language", "fr": "language"}
    assert dropped[0]["detail"].startswith("de (")
    assert manifest["dropped"]["language"] == 2 and manifest["languages"]["de"] == 1
    records, _, _ = run(tmp_path, rows, languages=("en", "de"))
    assert sorted(r.id for r in records) == ["code", "de", "en"]


# ---------------------------------------------------------------------------------------------- dedup


def test_exact_and_near_duplicates_are_dropped_and_distinct_rows_kept(tmp_path: Path):
    text = prose(1)
    near = text.split()
    near[100] = "different"  # one word of 200: Jaccard of word 5-shingles ~0.95
    rows = [
        {"id": "first", "conversations": [T("human", "Tell me a story."), T("gpt", text)]},
        {"id": "exact", "conversations": [T("human", "tell me a story"), T("gpt", "  " + text.upper())]},
        {"id": "near", "conversations": [T("human", "Tell me a story."), T("gpt", " ".join(near))]},
        {"id": "other", "conversations": [T("human", "Tell me a story."), T("gpt", prose(2))]},
    ]
    records, dropped, manifest = run(tmp_path, rows)
    assert [r.id for r in records] == ["first", "other"]
    assert [(d["row"]["id"], d["reason"], d["duplicate_of"]) for d in dropped] == [
        ("exact", "duplicate", "first"),
        ("near", "near_duplicate", "first"),
    ]
    assert manifest["dropped"]["duplicate"] == 1 and manifest["dropped"]["near_duplicate"] == 1
    assert manifest["settings"]["near_duplicates"]["threshold"] == 0.9


# ---------------------------------------------------------------------------------------------- records, manifest


def test_multi_turn_record_shape_and_provenance(tmp_path: Path):
    rows = [
        {
            "id": "c1",
            "model": "gpt-4",
            "extra": 7,
            "conversations": [
                T("system", "Be kind."),
                T("human", "Name a colour."),
                T("gpt", "<p>Blue.</p>"),
                T("human", "Another?"),
                T("gpt", "<p>Green.</p>"),
                T("human", "Thanks!"),
            ],
        },
        {"conversations": [T("human", "No id here?"), T("gpt", "None.")]},
    ]
    records, _, _ = run(tmp_path, rows)
    rec = records[0]
    assert [(m.role, m.content) for m in rec.messages] == [
        ("system", "Be kind."),
        ("user", "Name a colour."),
        ("assistant", "Blue."),
        ("user", "Another?"),
    ]
    assert rec.response == "Green."
    assert rec.query.question == "Another?" and rec.query.system == "Be kind."
    assert [m.content for m in rec.query.turns] == ["Name a colour.", "Blue."]
    assert rec.query.metadata == {"extra": 7}
    p = rec.provenance
    assert (p.teacher, p.model, p.base_url) == ("imported", "gpt-4", "")
    assert (p.source.row, p.source.format, p.source.uri) == (0, "sharegpt", str(tmp_path / "sharegpt.json"))
    assert records[1].id.startswith("q-") and records[1].provenance.model == "unknown"


def test_manifest_counts_every_drop_reason_and_turn_rule(tmp_path: Path):
    ok = [T("human", "What is two plus two?"), T("gpt", "Four.")]
    rows = [
        {"id": "ok", "conversations": [T("gpt", "Hello, how can I help?"), *ok, T("human", "bye")]},
        {"id": "ok", "conversations": [T("human", "Same id, other chat."), T("gpt", "Indeed.")]},
        {"id": "empty", "conversations": [T("human", ""), T("gpt", "<p> </p>")]},
        {"id": "zigzag", "conversations": [T("human", "a"), T("human", "b"), T("gpt", "c")]},
        {"id": "broken", "conversations": [T("human", "hello"), {"from": "gpt", "value": None}]},
        {"id": "dup", "conversations": ok},
        {"id": "bad", "conversations": [T("human", "hi"), T("narrator", "...")]},
        {"id": "nolist", "conversations": 5},
    ]
    records, dropped, manifest = run(tmp_path, rows, skip_bad_rows=True)
    assert [r.id for r in records] == ["ok", "ok_row1"]
    assert manifest["rows"] == 8 and manifest["records"] == 2 and manifest["renamed_ids"] == 1
    assert manifest["dropped"] == {
        "bad_row": 2,
        "no_exchange": 2,
        "not_alternating": 1,
        "language": 0,
        "duplicate": 1,
        "near_duplicate": 0,
        "over_budget": 0,
    }
    assert manifest["turns_removed"] == {
        "malformed": 1,
        "empty": 2,
        "leading_assistant": 1,
        "trailing_user": 2,
        "over_budget": 0,
    }
    assert [d["reason"] for d in dropped] == [
        "no_exchange",
        "not_alternating",
        "no_exchange",
        "duplicate",
        "bad_row",
        "bad_row",
    ]
    assert dropped[-2]["detail"].startswith("conversations[1].from: unknown role 'narrator'")
    assert dropped[-1]["detail"] == "conversations: must be a list of turns, got int"


# ---------------------------------------------------------------------------------------------- bad input, CLI


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (
            '[{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}]',
            "sharegpt.json:1: conversations[1].from: unknown role 'robot'",
        ),
        ('[{"id": "a", "conversations": [}]', "sharegpt.json:1: invalid JSON"),
        ('[{"id": "a", "turns": []}]', "sharegpt.json:1: conversations: missing field"),
        ("", "sharegpt.json: empty (no rows)"),
        (b'[{"id": "caf\xe9", "conversations": []}]', "sharegpt.json:1: not UTF-8 text (byte 0xe9)"),
    ],
    ids=["unknown-role", "malformed-json", "missing-field", "empty", "not-utf8"],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys, content, needle):
    path = tmp_path / "sharegpt.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    assert main(["import", "sharegpt", str(path), "--out", str(out)]) == InputError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: InputError:") and needle in err[0], err
    assert not out.exists() or list(out.iterdir()) == []  # not even a temporary file


def test_bad_rows_in_jsonl_are_skipped_and_counted_with_the_flag(tmp_path: Path):
    path = tmp_path / "sg.jsonl"
    good = {"id": "g", "conversations": [T("human", "Hi"), T("gpt", "Hello")]}
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"id": "x", "conversations": 3}) + "\n")
    out = tmp_path / "out"
    assert main(["import", "sharegpt", str(path), "--out", str(out)]) == InputError.exit_code
    assert main(["import", "sharegpt", str(path), "--out", str(out), "--skip-bad-rows"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["import", "sharegpt", str(path), "--out", str(out)]) == InputError.exit_code
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # a failed run leaves DIR as it was
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dropped"]["bad_row"] == 2 and manifest["records"] == 1
    wheres = [json.loads(line)["where"] for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert wheres == [f"{path}:2", f"{path}:3"]


def test_bad_settings_are_config_errors(tmp_path: Path):
    path = write(tmp_path, [{"conversations": [T("human", "Hi"), T("gpt", "Hello")]}])
    with pytest.raises(ConfigError, match="near-dup-threshold"):
        import_sharegpt(path, tmp_path / "out", ImportSettings(near_dup_threshold=1.0))
    with pytest.raises(InputError, match="no tokenizer.json"):
        import_sharegpt(path, tmp_path / "out", ImportSettings(tokenizer=str(tmp_path)))
    assert not (tmp_path / "out" / "records.jsonl").exists()


def test_cli_end_to_end(tmp_path: Path, capsys):
    rows = [
        {"id": "html", "model": "gpt-3.5", "conversations": [T("human", "1 / 1Show add_two"), T("gpt", CHATGPT_HTML)]},
        {"id": "de", "conversations": [T("human", GERMAN), T("gpt", "Gerne! Zuerst den Teig vorbereiten.")]},
        {"id": "long", "conversations": [T(r, prose(i, 40)) for i in range(3) for r in ("human", "gpt")]},
    ]
    path = write(tmp_path, rows, "sg.jsonl")
    out = tmp_path / "out"
    argv = ["import", "sharegpt", str(path), "--out", str(out), "--lang", "en", "--max-tokens", "150"]
    assert main([*argv, "--near-dup-threshold", "0.8"]) == 0
    said = capsys.readouterr().out
    assert "records from 2 conversations (1 split) of 3 rows" in said and "language 1" in said
    records = list(read_jsonl(out / "records.jsonl"))
    assert [r.id for r in records] == ["html", "long_0", "long_1", "long_2"]
    assert records[0].query.question == "Show add_two" and records[0].response == CHATGPT_MARKDOWN
    assert records[0].provenance.model == "gpt-3.5"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["languages"] == ["en"] and manifest["settings"]["max_tokens"] == 150
    assert manifest["html_turns"] == 1 and manifest["records"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["dropped.jsonl", "manifest.json", "records.jsonl"]
