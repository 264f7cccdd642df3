"""What sharing the prompt buys in multiple-choice scoring: imitate's packed rows (each question's prompt once, its
choices behind it under a 4-D mask) against the same code given one row per (question, choice) — the layout of
lm-eval's HF backend, where every choice re-runs its prompt — on the same model, items and batch size.

    flock /tmp/imitate-bench.lock python bench/eval_scoring.py [--data data/eval/general_mc.jsonl]
        [--prompt chat|plain] [--batch 8] [--threads 1] [--repeat 3]

Both layouts produce the same log-likelihoods (the largest difference is printed); the ratio of items/s is the
number to read, measured in the same process, alternating the two layouts `--repeat` times (best of each).
The model is the default student (SmolLM2-135M-Instruct from the local GGUF) unless `--model` names another.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default="data/eval/general_mc.jsonl")
    ap.add_argument("--prompt", default="chat", choices=("chat", "plain"))
    ap.add_argument("--batch", type=int, default=8, help="questions per forward pass (rows for the unshared layout)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()

    import torch

    from imitate.evaluate import scoring
    from imitate.evaluate.data import read_eval_set
    from imitate.evaluate.generate import load_student
    from imitate.records import Message

    torch.set_num_threads(args.threads)
    loaded = load_student(args.model)
    items = read_eval_set(args.data, limit=args.limit).items
    tok, fmt = loaded.tokenizer, loaded.fmt
    if args.prompt == "chat":
        shared = [
            scoring.encode_chat(tok, fmt, [Message(role="user", content=it.question)], it.choices) for it in items
        ]
    else:
        shared = []
        for it in items:
            pairs = [scoring.encode_split(tok, f"Question: {it.question}\nAnswer:", f" {c}") for c in it.choices]
            shared.append(scoring.Request(pairs[0][0], [cont for _, cont in pairs]))
    unshared = [scoring.Request(r.context, [c]) for r in shared for c in r.continuations]
    rows_per_question = len(unshared) / len(shared)
    pad = fmt.eot_id
    scoring.score(loaded.model, shared[:4], batch_size=args.batch, pad_id=pad)  # warm-up

    best = {"shared": float("inf"), "unshared": float("inf")}
    results = {}
    for _ in range(args.repeat):
        for name, requests, batch in (
            ("shared", shared, args.batch),
            ("unshared", unshared, max(1, round(args.batch * rows_per_question))),
        ):
            t = time.perf_counter()
            results[name] = scoring.score(loaded.model, requests, batch_size=batch, pad_id=pad)
            best[name] = min(best[name], time.perf_counter() - t)
    flat_unshared = [s[0] for s in results["unshared"]]
    flat_shared = [x for s in results["shared"] for x in s]
    diff = max(abs(a - b) for a, b in zip(flat_shared, flat_unshared, strict=True))
    tokens_shared = sum(r.width for r in shared)
    tokens_unshared = sum(r.width for r in unshared)
    load = os.getloadavg()
    print(f"model {loaded.label}, {len(items)} items from {args.data}, prompt {args.prompt}, batch {args.batch}, "
          f"threads {args.threads}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip
    for name, tokens in (("shared", tokens_shared), ("unshared", tokens_unshared)):
        print(f"  {name:8} {len(items) / best[name]:7.2f} items/s  ({tokens} tokens through the model)")
    print(f"  ratio shared/unshared {best['unshared'] / best['shared']:.2f}x, max |Δ log-likelihood| {diff:.2e}")


if __name__ == "__main__":
    main()
