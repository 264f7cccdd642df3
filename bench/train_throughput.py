"""Trainer throughput: imitate's recipe vs TRL's SFTTrainer (its defaults) vs a plain transformers.Trainer that
pads each batch to its longest row — same SmolLM2-135M student, same records, same LoRA, fp32 on this CPU.

TRL lives only in a separate environment (the project venv never gets it):

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install torch==2.13.0
    /tmp/benchvenv/bin/pip install trl==1.16.0 transformers==5.24.0 peft==0.21.2 gguf==0.19.0 accelerate datasets

Run it alone on the machine (shared machines: under the bench lock; ~8 minutes per round on 2 cores):

    flock /tmp/imitate-bench.lock .venv/bin/python bench/train_throughput.py \
        --bench-python /tmp/benchvenv/bin/python --steps 6 --warmup 2 --rounds 2

Each trainer runs in its own process on the same plain (de-quantised once) model folder and the same 300 records
(teacher-style step-by-step answers, rows of 40-360 words, a third with a system message). Throughput = real
(non-pad) tokens ÷ wall time of the measured optimizer steps, after warm-up steps. The trainers take turns, in
reversed order every other round, so load from other jobs falls on all of them; the table pools the rounds and
also prints imitate ÷ Trainer per round. Also printed: the measured fp32 matmul FLOP/s of this CPU next to the
achieved FLOP/s (4·N rule, imitate/train/metrics.py), and a profile of one imitate step (phases by wall clock,
operators by profiler self time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
STEPS = (
    "First, pin down what {a} means here and why it matters for the question.",
    "Next, relate {a} to {b}, because the answer depends on how the two interact.",
    "Take a concrete case: when {b} changes, {c} follows in a predictable way.",
    "Then check the assumption behind {c}; it holds because the question is really about {a}.",
    "Comparing {c} with {b} separates what is essential from what is incidental.",
    "Putting these together, {a} accounts for most of what we observe about {c}.",
)


def make_records(path: Path, n: int = 300, seed: int = 0) -> None:
    """Teacher-style explanations to the sample queries, 40-360 words per row, as imitate Records (JSONL)."""
    sys.path.insert(0, str(ROOT))
    from imitate.records import Provenance, Query, Record, write_jsonl

    queries = [json.loads(line) for line in (ROOT / "data/samples/queries.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    records = []
    for i in range(n):
        q = queries[i % len(queries)]["question"]
        words = [w.strip("?.,!'\"") for w in q.split() if len(w) > 3] or ["the idea"]
        target = rng.randint(40, 360) - len(q.split())
        parts = ["Let's work through this carefully."]
        while sum(len(p.split()) for p in parts) < target:
            a, b, c = (rng.choice(words) for _ in range(3))
            parts.append(f"Step {len(parts)}: " + rng.choice(STEPS).format(a=a, b=b, c=c))
        system = "You are a patient tutor. Think step by step." if i % 3 == 0 else None
        query = Query(id=f"b{i}", question=q, system=system)
        prov = Provenance(teacher="fake", model="fake-teacher", base_url="http://127.0.0.1/v1", request_key=f"b{i}")
        records.append(
            Record(id=f"b{i}", query=query, messages=query.messages(system), response=" ".join(parts), provenance=prov)
        )
    write_jsonl(path, records)


# ---------------------------------------------------------------------------------------------- runners


def run_imitate(work: Path, steps: int, warmup: int, pack_length: int) -> dict:
    from imitate.config import load_config
    from imitate.train.recipe import train

    sets = [
        f"train.cache_dir={work / 'cache'}",
        f"train.max_steps={steps + warmup}",
        f"train.pack_length={pack_length}",
        "train.grad_accum=1",
        "train.batch_rows=1",
        "train.eval_fraction=0",
        "train.threads=2",
        f"train.lora.r={LORA['r']}",
        f"train.lora.alpha={LORA['lora_alpha']}",
        f"train.lora.dropout={LORA['lora_dropout']}",
    ]
    out = work / f"imitate-{pack_length}"
    train(load_config(overrides=sets), work / "records.jsonl", out, model=str(work / "student"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][warmup:]
    tokens, slots = sum(r["tokens"] for r in rows), sum(r["slots"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    return {"tokens": tokens, "seconds": seconds, "pad_fraction": 1 - tokens / slots, "steps": len(rows)}


class _Counting:
    """Wraps a data collator and records the real (attention-mask) and padded token counts of every batch."""

    def __init__(self, inner):
        self.inner, self.real, self.slots = inner, [], []

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        ids = batch["input_ids"]
        self.real.append(int(mask.sum()) if mask is not None else ids.numel())
        self.slots.append(ids.numel())
        return batch


def _timed_train(trainer, counting: _Counting, steps: int, warmup: int) -> dict:
    from transformers import TrainerCallback

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.data_collator = counting
    trainer.train()
    # Batch i feeds step i (no accumulation, no workers); the loader may collate one batch ahead.
    real = sum(counting.real[warmup : warmup + steps])
    slots = sum(counting.slots[warmup : warmup + steps])
    return {"tokens": real, "seconds": ends[warmup + steps - 1] - ends[warmup - 1], "pad_fraction": 1 - real / slots}


def run_hf(work: Path, steps: int, warmup: int) -> dict:
    """transformers.Trainer + peft, our masks, each batch of 4 padded to its longest row (random order)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    sys.path.insert(0, str(ROOT))
    from imitate.records import read_jsonl
    from imitate.train.tokenize import ChatFormat, tokenize

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(work / "student")
    examples, _ = tokenize(read_jsonl(work / "records.jsonl"), ChatFormat.of(tok), max_length=2048)
    data = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in examples]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32), LoraConfig(**LORA)
    )
    args = TrainingArguments(
        output_dir=str(work / "hf"),
        per_device_train_batch_size=4,
        max_steps=steps + warmup,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    return _timed_train(trainer, _Counting(collator), steps, warmup)


def run_trl(work: Path, steps: int, warmup: int) -> dict:
    """TRL SFTTrainer with its defaults, except what CPU and the comparison require (batch 4, fp32, LoRA)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(2)
    rows = []
    for line in (work / "records.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows.append({"messages": [*rec["messages"], {"role": "assistant", "content": rec["response"]}]})
    args = SFTConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=4,
        bf16=False,  # the default (True) needs a GPU: fp32 on CPU
        max_steps=steps + warmup,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=str(work / "student"), args=args, train_dataset=Dataset.from_list(rows), peft_config=LoraConfig(**LORA)
    )
    return _timed_train(trainer, _Counting(trainer.data_collator), steps, warmup)


# ---------------------------------------------------------------------------------------------- profile


def profile_step(work: Path, pack_length: int) -> dict:
    """One imitate step by phase (wall clock) and by operator (profiler self time), before and after the fixes:
    'before' = stock SDPA on the block-diagonal mask + logits for every position + cross-entropy;
    'after' = per-example causal SDPA, fused cross-entropy at supervised positions only, FastDropout and the fused
    LoRA projection (what the recipe runs)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from imitate.records import read_jsonl
    from imitate.train.model import ModelSource, load_tokenizer
    from imitate.train.pack import micro_batches
    from imitate.train.tokenize import ChatFormat, tokenize

    torch.set_num_threads(2)
    source = ModelSource("folder", str(work / "student"))
    examples, _ = tokenize(read_jsonl(work / "records.jsonl"), ChatFormat.of(load_tokenizer(source)), max_length=2048)
    plan = micro_batches(examples, mode="pack", rows_per_batch=1, pack_length=pack_length, pad_id=2)
    return {variant: _profile_variant(variant, source, examples, plan) for variant in ("before", "after")}


PHASES = ("data", "forward", "loss/LM head", "backward", "optimizer")


def _profile_variant(variant: str, source, examples, plan) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile

    from imitate.train import attention, dropout, fused
    from imitate.train.loss import _LinearCrossEntropy, hidden_states, split_model
    from imitate.train.model import load_model
    from imitate.train.pack import collate
    from imitate.train.tokenize import IGNORE

    model = load_model(source)
    if variant == "after":
        attention.install(model)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(**LORA)).train()
    if variant == "after":
        dropout.install(model, np.random.Generator(np.random.SFC64(0)))
        fused.install(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    backbone, head = split_model(model)

    def step(rows, timings):
        marks = [time.perf_counter()]
        batch = collate(examples, rows, 2, packed=True)
        marks.append(time.perf_counter())
        h = hidden_states(backbone, batch)
        marks.append(time.perf_counter())
        where = batch.targets != IGNORE
        if variant == "before":
            logits = head(h).float()
            loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum")
        else:
            chunk = (1 << 24) // head.weight.shape[0]
            loss = _LinearCrossEntropy.apply(h[where], head.weight, batch.targets[where], chunk).sum()
        marks.append(time.perf_counter())
        (loss / where.sum()).backward()
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        for k, a, b in zip(PHASES, marks, marks[1:], strict=False):
            timings[k] = timings.get(k, 0.0) + b - a
        timings["tokens"] = timings.get("tokens", 0) + batch.real_tokens

    step(plan[0], {})  # warm-up
    timings: dict = {}
    for rows in plan[1:3]:
        step(rows, timings)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tick = time.perf_counter()
        step(plan[3], {})
        wall = time.perf_counter() - tick
    ops: dict[str, float] = {}
    for e in prof.key_averages():
        name = e.key
        if "scaled_dot_product" in name:
            kind = "attention (SDPA fwd+bwd)"
        elif name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"):
            kind = "matmul"
        elif "bernoulli" in name or name == "aten::ge":
            kind = "LoRA dropout masks"
        elif "Optimizer" in name or "_foreach" in name:
            kind = "optimizer"
        else:
            kind = "other"
        ops[kind] = ops.get(kind, 0.0) + e.self_cpu_time_total / 1e6
    # Wall time in no operator: Python, and numpy drawing FastDropout's bits (not a torch op).
    ops["outside operators (Python, numpy RNG)"] = max(0.0, wall - sum(ops.values()))
    return {"phases": timings, "ops": ops}


# ---------------------------------------------------------------------------------------------- driver


def _rate(result: dict) -> float:
    return result["tokens"] / result["seconds"]


def _pooled(results: list[dict]) -> dict:
    """Rounds of one trainer as one run: total tokens over total seconds."""
    tokens, seconds = sum(r["tokens"] for r in results), sum(r["seconds"] for r in results)
    slots = sum(r["tokens"] / (1 - r["pad_fraction"]) for r in results)
    return {"tokens": tokens, "seconds": seconds, "pad_fraction": 1 - tokens / slots}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-python", help="python of the venv that has trl (omit to skip TRL)")
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per trainer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pack-length", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2, help="turns each trainer takes (order reversed each round)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--runner", choices=["imitate", "hf", "trl", "profile"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.runner:
        work = args.work
        result = {
            "imitate": lambda: run_imitate(work, args.steps, args.warmup, args.pack_length),
            "hf": lambda: run_hf(work, args.steps, args.warmup),
            "trl": lambda: run_trl(work, args.steps, args.warmup),
            "profile": lambda: profile_step(work, args.pack_length),
        }[args.runner]()
        print("RESULT " + json.dumps(result))
        return

    sys.path.insert(0, str(ROOT))
    from imitate.train.metrics import RULE, flops_per_token, matmul_flops
    from imitate.train.model import load_model, load_tokenizer, resolve

    work = args.work or Path(tempfile.mkdtemp(prefix="imitate-train-bench-"))
    if not (work / "student" / "config.json").exists():
        source = resolve(None)  # the SmolLM2 GGUF, de-quantised once into a plain folder every trainer loads
        load_model(source).save_pretrained(work / "student")
        load_tokenizer(source).save_pretrained(work / "student")
    make_records(work / "records.jsonl")

    def child(runner: str, python: str = sys.executable) -> dict:
        cmd = [python, __file__, "--runner", runner, "--work", str(work), "--steps", str(args.steps)]
        cmd += ["--warmup", str(args.warmup), "--pack-length", str(args.pack_length)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        before = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{runner} failed:\n{proc.stderr[-4000:]}")
        result = json.loads(line[len("RESULT ") :])
        if "tokens" in result:
            rate = result["tokens"] / result["seconds"]
            load = f"load average {before:.2f} before, {os.getloadavg()[0]:.2f} after"
            print(f"  {runner}: {rate:.1f} real tokens/s; {load}", flush=True)
        return result

    roofline = matmul_flops("cpu", seconds=2.0)
    pythons = {"imitate": sys.executable, "hf": sys.executable}
    if args.bench_python:
        pythons["trl"] = args.bench_python
    runs: dict[str, list[dict]] = {name: [] for name in pythons}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for name in list(pythons)[:: 1 if r % 2 == 0 else -1]:
            runs[name].append(child(name, pythons[name]))
        print(f"  imitate / Trainer this round: {_rate(runs['imitate'][-1]) / _rate(runs['hf'][-1]):.2f}x", flush=True)
    results = {name: _pooled(rs) for name, rs in runs.items()}
    prof = child("profile")

    import torch

    with torch.device("meta"):
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work / "student"))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    n_base = sum(m.weight.numel() for _, m in linears)
    n_lora = sum(LORA["r"] * (m.in_features + m.out_features) for n, m in linears if n != "lm_head")
    per_token = flops_per_token(n_base, n_lora)
    print(f"\nwork dir {work}; fp32 matmul (1024², 2 threads): {roofline / 1e9:.1f} GFLOP/s; rule: {RULE}\n")
    print("| trainer | real tokens/s | pad fraction | achieved GFLOP/s | MFU | vs TRL | vs Trainer |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        rate = r["tokens"] / r["seconds"]
        rel = {k: rate / (results[k]["tokens"] / results[k]["seconds"]) for k in ("trl", "hf") if k in results}
        print(
            f"| {name} | {rate:.1f} | {100 * r['pad_fraction']:.1f} % | {rate * per_token / 1e9:.1f} | "
            f"{100 * rate * per_token / roofline:.0f} % | {rel.get('trl', float('nan')):.2f}x | {rel['hf']:.2f}x |"
        )
    for variant, p in prof.items():
        phases = p["phases"]
        total = sum(v for k, v in phases.items() if k != "tokens")
        rate = phases["tokens"] / total
        print(f"\nprofile {variant}: {rate:.1f} tokens/s over 2 steps of one {args.pack_length}-token pack")
        print("  phases: " + ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in phases.items() if k != "tokens"))
        ops_total = sum(p["ops"].values())
        print(
            "  operators: "
            + ", ".join(f"{k} {100 * v / ops_total:.0f} %" for k, v in sorted(p["ops"].items(), key=lambda kv: -kv[1]))
        )


if __name__ == "__main__":
    main()
