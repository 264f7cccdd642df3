"""Multiple-choice log-likelihood scoring: a tiny model trained to prefer the right answers is scored as
preferring them; the packed batch (shared prompt once, 4-D mask) equals one plain forward per choice; lm-eval's
context/continuation split; batched chat generation equals one conversation at a time and stops at the end of turn."""

from __future__ import annotations

import random

import pytest
import torch
from train_fixtures import smol_tokenizer, tiny_llama

from imitate.evaluate import scoring
from imitate.evaluate.generate import cut_at, generate, left_pad, prompt_ids
from imitate.records import Message
from imitate.train.tokenize import ChatFormat

QUESTIONS = [
    ("What is the capital of France?", ["Rome", "Paris", "Berlin"], 1),
    ("Which planet is the largest?", ["Jupiter", "Mars", "a small moon of Saturn"], 0),
    ("What colour is grass?", ["blue", "bright red", "green"], 2),
    ("How many legs does a spider have?", ["six", "ten", "eight"], 2),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine oversubscribed threads stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _requests(tok, fmt) -> list[scoring.Request]:
    return [scoring.encode_chat(tok, fmt, [Message(role="user", content=q)], c) for q, c, _ in QUESTIONS]


def _train_to_prefer(model, requests: list[scoring.Request], steps: int = 30) -> None:
    """Plain torch, one padded batch of question + right answer per step, loss on the answer tokens only."""
    rows = [r.context + r.continuations[right] for r, (_, _, right) in zip(requests, QUESTIONS, strict=True)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (row, req) in enumerate(zip(rows, requests, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(req.context) : len(row)] = torch.tensor(row[len(req.context) :])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_a_model_trained_to_prefer_the_right_choice_is_scored_that_way():
    tok = smol_tokenizer()
    fmt = ChatFormat.of(tok)
    requests = _requests(tok, fmt)
    model = tiny_llama(seed=3)
    _train_to_prefer(model, requests)
    sums = scoring.score(model, requests, batch_size=3)
    for s, req, (_, choices, right) in zip(sums, requests, QUESTIONS, strict=True):
        assert scoring.pick(s) == right
        assert scoring.pick(s, [len(c) for c in choices]) == right
        assert scoring.pick(s, [len(c) for c in req.continuations]) == right
        assert s[right] > max(x for k, x in enumerate(s) if k != right) + 2.0  # by a wide margin
    for s, req in zip(sums, requests, strict=True):
        assert s == pytest.approx(scoring.reference_scores(model, req), abs=1e-4)


def test_packed_batches_equal_one_forward_per_choice():
    model = tiny_llama(seed=1, layers=3)
    rng = random.Random(0)
    requests = [
        scoring.Request(
            [rng.randrange(5000) for _ in range(rng.randint(1, 30))],
            [[rng.randrange(5000) for _ in range(rng.randint(1, 7))] for _ in range(rng.randint(1, 6))],
        )
        for _ in range(12)
    ]
    expected = [scoring.reference_scores(model, r) for r in requests]
    for batch_size in (1, 5, 12):
        got = scoring.score(model, requests, batch_size=batch_size, pad_id=7)
        assert [len(g) for g in got] == [len(r.continuations) for r in requests]
        for g, e in zip(got, expected, strict=True):
            assert g == pytest.approx(e, abs=1e-4)


def test_choices_do_not_see_each_other():
    """A choice's score is the same whatever the other choices are (the mask isolates them)."""
    model = tiny_llama(seed=2)
    ctx, a, b, c = [11, 12, 13], [40, 41], [50, 51, 52], [60]
    alone = scoring.score(model, [scoring.Request(ctx, [a])])[0][0]
    together = scoring.score(model, [scoring.Request(ctx, [b, c, a])])[0][2]
    assert together == pytest.approx(alone, abs=1e-5)


def test_bad_requests_and_pick():
    from imitate.errors import InputError

    with pytest.raises(InputError, match="empty context"):
        scoring.check([scoring.Request([], [[1]])])
    with pytest.raises(InputError, match="no tokens"):
        scoring.check([scoring.Request([1], [[2], []])])
    assert scoring.pick([-3.0, -1.0, -1.0]) == 1  # ties: the first
    assert scoring.pick([-4.0, -3.0], [4, 1]) == 0  # per unit of length


def test_encode_split_is_lm_evals_rule():
    tok = smol_tokenizer()
    ctx, cont = scoring.encode_split(tok, "Question: What is 2+2?\nAnswer: ", "4")
    assert ctx == tok("Question: What is 2+2?\nAnswer:", add_special_tokens=False)["input_ids"]
    assert tok.decode(cont) == " 4"  # the trailing space moved to the continuation


def test_generation_batched_equals_one_at_a_time_and_stops_at_end_of_turn():
    tok = smol_tokenizer()
    fmt = ChatFormat.of(tok)
    model = tiny_llama(seed=5)
    convs = [
        [Message(role="user", content="hi")],
        [Message(role="system", content="Be brief."), Message(role="user", content="Name three colours please")],
        [Message(role="user", content="a b c d e f g h i j k l m n o p")],
    ]
    rows = prompt_ids(tok, fmt, convs)
    assert rows[0] == tok(fmt.render(convs[0], generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert "You are a helpful" not in tok.decode(rows[0])  # the template's default system turn is cut
    ids, mask = left_pad(rows, pad_id=0)
    assert mask[0, : ids.shape[1] - len(rows[0])].sum() == 0 and ids[0, -1] == rows[0][-1]
    batched = generate(model, tok, convs, max_new_tokens=10, batch_size=3, fmt=fmt)
    single = [generate(model, tok, [c], max_new_tokens=10, fmt=fmt)[0] for c in convs]
    assert batched == single
    sampled = generate(model, tok, convs, max_new_tokens=6, temperature=1.0, n=2, seed=4, fmt=fmt)
    assert [len(s) for s in sampled] == [2, 2, 2]
    assert sampled == generate(model, tok, convs, max_new_tokens=6, temperature=1.0, n=2, seed=4, fmt=fmt)
    assert cut_at([5, 6, fmt.eot_id, 7], fmt.eot_id) == [5, 6] and cut_at([5, 6], fmt.eot_id) == [5, 6]


def test_generation_stops_at_the_end_of_turn_token():
    """A model made to say one word and then the end-of-turn token: the answer is that word, and no forward pass
    runs after the end-of-turn token (max_new_tokens=8 would allow six more)."""
    tok = smol_tokenizer()
    fmt = ChatFormat.of(tok)
    model = tiny_llama(seed=6)
    word = tok(" yes", add_special_tokens=False)["input_ids"][0]
    calls = []

    def forced(_module, _inputs, logits):
        forced = torch.full_like(logits, -50.0)
        forced[..., word if not calls else fmt.eot_id] = 50.0
        calls.append(logits.shape)
        return forced

    handle = model.get_output_embeddings().register_forward_hook(forced)
    try:
        answer = generate(model, tok, [[Message(role="user", content="ok?")]], max_new_tokens=8, fmt=fmt)
    finally:
        handle.remove()
    assert answer == [["yes"]]
    assert len(calls) == 2
