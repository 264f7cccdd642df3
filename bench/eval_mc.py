"""Multiple-choice scoring speed: imitate's log-likelihood scorer (`imitate eval bench --prompt plain`) vs lm-eval's
Hugging Face backend (HFLM) on the same task, the same items and the same SmolLM2-135M weights, fp32 on this CPU.

    flock /tmp/imitate-bench.lock .venv/bin/python bench/eval_mc.py [--data data/eval/general_mc.jsonl] \
        [--rounds 2] [--passes 3] [--threads 2] [--imitate-batch 8,32] [--lmeval-batch 8,32,64] [--lmeval-python PY]

lm-eval runs from the project venv by default (the `lmeval` extra, which `make install` puts there for the tests:
the same torch 2.13.0 and transformers as imitate, so only the scoring differs); `--lmeval-python` runs it from
another environment instead. Each scorer runs in its own process, so neither warms the other's caches.

Same weights: the GGUF is de-quantised once by imitate/train/model.py and saved as a plain HF folder in a temporary
directory; imitate loads that folder (`load_student`) and lm-eval's HFLM loads it by path (`dtype=float32`).
Same task: the eval set as lm-eval's multiple choice (bench/eval_mc_task/imitate_general_mc.yaml, pointed at
`--data`): context "Question: {question}\nAnswer:", continuation " {choice}", tokenised with lm-eval's
whole-minus-context split (`scoring.encode_split`). Both report acc (highest summed log-probability) and acc_norm
(highest log-probability per character of the choice).

Measured per scorer, after a warm-up over a few items, `--passes` times over all items: items (questions) per second
of the scoring call — imitate: `run_multiple_choice` (tokenising + `scoring.score` + picks); lm-eval: its
`loglikelihood` call (tokenising + its batched forwards, with its one-token-continuation cache) — and of the whole
evaluation (lm-eval: `simple_evaluate`, with task building and metrics). On a shared machine another job only ever
slows a pass down, so the table keeps each scorer's best pass (the median is printed beside it). The scorers take
turns, in reversed order every other round. Then every item is compared: the prompt both scored, the acc and
acc_norm picks (each disagreement is listed), and the largest difference of a choice's log-likelihood.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK_YAML = ROOT / "bench" / "eval_mc_task" / "imitate_general_mc.yaml"


def _picks(lls: list[float], choices: list[str]) -> dict[str, int]:
    """argmax (first on ties, as numpy's argmax) of the sums, and of the sums per character of the choice."""
    norm = [x / len(c) for x, c in zip(lls, choices, strict=True)]
    return {
        "acc": max(range(len(lls)), key=lambda k: (lls[k], -k)),
        "acc_norm": max(range(len(norm)), key=lambda k: (norm[k], -k)),
    }


# ---------------------------------------------------------------------------------------------- runners


def run_imitate(folder: Path, data: Path, batch: int, warmup: int, passes: int) -> dict:
    from imitate.evaluate.bench import run_multiple_choice
    from imitate.evaluate.data import read_eval_set
    from imitate.evaluate.generate import load_student

    loaded = load_student(str(folder))
    es = read_eval_set(data)
    warm = dataclasses.replace(es, items=es.items[:warmup])
    run_multiple_choice(loaded, warm, prompt="plain", batch_size=batch, tick=lambda k: None)
    times = []
    for _ in range(passes):
        tick, cpu = time.perf_counter(), time.process_time()
        out = run_multiple_choice(loaded, es, prompt="plain", batch_size=batch, tick=lambda k: None)
        times.append((time.perf_counter() - tick, time.process_time() - cpu))
    return {
        "items": len(es.items),
        "passes": [{"seconds": w, "cpu": c, "wall": w} for w, c in times],
        "contexts": [f"Question: {it.question}\nAnswer:" for it in es.items],
        "lls": [a["logprob"] for a in out.answers],
        "picks": [{m: a["pick"][m] for m in ("acc", "acc_norm")} for a in out.answers],
        "choices": [list(it.choices) for it in es.items],
        "answers": [it.answer for it in es.items],
    }


def run_lmeval(folder: Path, data: Path, batch: int, warmup: int, passes: int) -> dict:
    import lm_eval
    import yaml
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=batch)
    task = yaml.safe_load(TASK_YAML.read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(data)
    manager = TaskManager(include_defaults=False)
    spent = [0.0, 0.0]  # wall, CPU seconds inside lm.loglikelihood
    inner = lm.loglikelihood

    def timed(requests, *args, **kwargs):
        tick, cpu = time.perf_counter(), time.process_time()
        try:
            return inner(requests, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - tick
            spent[1] += time.process_time() - cpu

    lm.loglikelihood = timed
    lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=warmup, bootstrap_iters=0)
    times = []
    for _ in range(passes):
        spent[:] = [0.0, 0.0]
        tick = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=True)
        times.append({"seconds": spent[0], "cpu": spent[1], "wall": time.perf_counter() - tick})
    samples = sorted(res["samples"][task["task"]], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    choices = [list(s["doc"]["choices"]) for s in samples]
    return {
        "items": len(samples),
        "passes": times,
        "contexts": [s["arguments"][0][0] for s in samples],
        "lls": lls,
        "picks": [_picks(x, c) for x, c in zip(lls, choices, strict=True)],
        "choices": choices,
        "answers": [int(s["target"]) for s in samples],
        "harness": {k: v for k, v in res["results"][task["task"]].items() if k.startswith("acc")},
    }


# ---------------------------------------------------------------------------------------------- compare


def compare(a: dict, b: dict) -> dict:
    """Item by item: prompts, acc and acc_norm picks, and the largest |log-likelihood| difference."""
    same_prompt = sum(x == y for x, y in zip(a["contexts"], b["contexts"], strict=True))
    out = {"items": a["items"], "same_prompt": same_prompt, "disagree": {}, "max_ll_diff": 0.0}
    for metric in ("acc", "acc_norm"):
        out["disagree"][metric] = [
            {"item": i, "imitate": p[metric], "lm-eval": q[metric], "answer": a["answers"][i]}
            for i, (p, q) in enumerate(zip(a["picks"], b["picks"], strict=True))
            if p[metric] != q[metric]
        ]
    for x, y in zip(a["lls"], b["lls"], strict=True):
        out["max_ll_diff"] = max([out["max_ll_diff"], *(abs(u - v) for u, v in zip(x, y, strict=True))])
    return out


def accuracy(run: dict, metric: str) -> float:
    return sum(p[metric] == ans for p, ans in zip(run["picks"], run["answers"], strict=True)) / run["items"]


# ---------------------------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "eval" / "general_mc.jsonl")
    parser.add_argument("--rounds", type=int, default=2, help="turns each scorer takes (order reversed each round)")
    parser.add_argument("--imitate-batch", default="8,32", help="imitate batch sizes (questions per forward pass)")
    parser.add_argument("--lmeval-batch", default="8,32,64", help="lm-eval batch sizes (requests per forward pass)")
    parser.add_argument("--warmup", type=int, default=8, help="items scored once before the measured passes")
    parser.add_argument("--passes", type=int, default=3, help="measured passes over all items per turn (best kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each scorer")
    parser.add_argument("--lmeval-python", default=sys.executable, help="python of the environment with lm-eval")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--runner", choices=["imitate", "lmeval"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    data = args.data.resolve()
    if args.runner:
        import torch

        torch.set_num_threads(args.threads)
        run = run_imitate if args.runner == "imitate" else run_lmeval
        print("RESULT " + json.dumps(run(args.work / "student", data, args.batch, args.warmup, args.passes)))
        return

    sys.path.insert(0, str(ROOT))
    from imitate.train.model import load_model, load_tokenizer, resolve

    work = args.work or Path(tempfile.mkdtemp(prefix="imitate-eval-bench-"))
    if not (work / "student" / "config.json").exists():
        source = resolve(None)  # the SmolLM2 GGUF, de-quantised once into the plain folder both scorers load
        load_model(source).save_pretrained(work / "student")
        load_tokenizer(source).save_pretrained(work / "student")

    def child(runner: str, batch: int) -> dict:
        python = sys.executable if runner == "imitate" else args.lmeval_python
        cmd = [python, __file__, "--runner", runner, "--work", str(work), "--batch", str(batch)]
        cmd += ["--data", str(data), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        cmd += ["--passes", str(args.passes)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        before = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{runner} failed:\n{proc.stderr[-4000:]}")
        result = json.loads(line[len("RESULT ") :])
        result["load"] = (before, os.getloadavg()[0])
        passes = ", ".join(f"{result['items'] / p['seconds']:.2f}" for p in result["passes"])
        print(
            f"  {runner} batch {batch}: items/s scoring per pass {passes}; best {_rate([result]):.2f} "
            f"({_rate([result], 'cpu'):.2f} per CPU-second), {_rate([result], 'wall'):.2f} whole eval; "
            f"load average {before:.2f} before, {result['load'][1]:.2f} after",
            flush=True,
        )
        return result

    mine_s = [("imitate", int(b)) for b in args.imitate_batch.split(",")]
    theirs_s = [("lmeval", int(b)) for b in args.lmeval_batch.split(",")]
    scorers = mine_s + theirs_s
    runs: dict[tuple[str, int], list[dict]] = {s: [] for s in scorers}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for scorer in scorers[:: 1 if r % 2 == 0 else -1]:
            runs[scorer].append(child(*scorer))
    report(args, work, runs, mine_s, theirs_s)


def _rate(rs: list[dict], key: str = "seconds") -> float:
    """items per second of the least disturbed pass of these turns (another job only ever slows a pass down)."""
    return max(x["items"] / p[key] for x in rs for p in x["passes"])


def _median(rs: list[dict], key: str = "seconds") -> float:
    return statistics.median(x["items"] / p[key] for x in rs for p in x["passes"])


def report(args, work: Path, runs: dict, mine_s: list, theirs_s: list) -> None:
    best = max(theirs_s, key=lambda s: _rate(runs[s]))
    mine = runs[mine_s[0]][-1]
    loads = [x["load"][i] for rs in runs.values() for x in rs for i in (0, 1)]
    print(f"\n{mine['items']} items from {args.data}; work dir {work}; {args.threads} threads, fp32, CPU")
    print(f"load average during the runs: {min(loads):.2f} to {max(loads):.2f}")
    print(f"items/s = best pass of {args.rounds} turns x {args.passes} passes (median in brackets)")
    print("\n| scorer | batch | items/s (scoring) | items per CPU-s | items/s (whole eval) | acc | acc_norm | "
          f"÷ lm-eval batch {best[1]} (scoring, best) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for scorer in mine_s + theirs_s:
        rs, last = runs[scorer], runs[scorer][-1]
        print(
            f"| {'imitate' if scorer[0] == 'imitate' else 'lm-eval HFLM'} | {scorer[1]} | {_rate(rs):.2f} "
            f"({_median(rs):.2f}) | {_rate(rs, 'cpu'):.2f} | {_rate(rs, 'wall'):.2f} | "
            f"{100 * accuracy(last, 'acc'):.1f} | {100 * accuracy(last, 'acc_norm'):.1f} | "
            f"{_rate(rs) / _rate(runs[best]):.2f}x |"
        )
    print(f"\nlm-eval's own numbers (batch {best[1]}): {runs[best][-1]['harness']}")
    for scorer in theirs_s:
        c = compare(mine, runs[scorer][-1])
        dis = {m: len(v) for m, v in c["disagree"].items()}
        print(
            f"imitate batch {mine_s[0][1]} vs lm-eval batch {scorer[1]}: same prompt on "
            f"{c['same_prompt']}/{c['items']} items; picks differ on {dis['acc']} (acc) and {dis['acc_norm']} "
            f"(acc_norm) items; max |Δ log-likelihood| {c['max_ll_diff']:.2e}"
        )
        for metric, rows in c["disagree"].items():
            for row in rows:
                print(
                    f"  {metric} item {row['item']}: imitate picks {row['imitate']}, lm-eval {row['lm-eval']}, "
                    f"answer {row['answer']}"
                )
    for scorer in mine_s[1:]:
        c = compare(mine, runs[scorer][-1])
        print(f"imitate batch {scorer[1]} vs batch {mine_s[0][1]}: picks differ on {len(c['disagree']['acc'])} (acc)")
    for scorer in mine_s:
        ratios = [f"{_rate([a]) / _rate([b]):.2f}x" for a, b in zip(runs[scorer], runs[best], strict=True)]
        print(f"imitate batch {scorer[1]} ÷ lm-eval batch {best[1]}, per round (best passes): {', '.join(ratios)}")


if __name__ == "__main__":
    main()
