"""Trainer memory: peak memory and tokens/s of imitate's recipe vs TRL's SFTTrainer, without and with gradient
checkpointing, at the same tokens per optimizer step — SmolLM2-135M student, same records, same LoRA, fp32, CPU.

TRL lives only in a separate environment (see bench/train_throughput.py for how to build it):

    flock /tmp/imitate-bench.lock .venv/bin/python bench/train_memory.py \
        --bench-python /tmp/benchvenv/bin/python --steps 4 --warmup 1

Same work per optimizer step: both trainers pack the records into one 2048-token row per step (imitate
`train.pack_length=2048, batch_rows=1, grad_accum=1`; TRL `packing=True, max_length=2048,
per_device_train_batch_size=1`), LoRA r=16 on all linear layers, dropout 0.05. Each configuration runs in its own
fresh process. Memory = the process's peak RSS (VmHWM) over the whole run minus its RSS after the imports and
before the trainer starts (so Python, torch and the libraries themselves are not counted; model loading, data
preparation and training are); the absolute peak RSS is printed too. Tokens/s = real tokens ÷ wall time of the
measured optimizer steps after the warm-up steps. The estimate of `imitate train --estimate-memory` for the same
settings is printed next to imitate's measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import train_throughput as tt  # noqa: E402  (shares the records, LoRA settings and the TRL step clock)

PACK = 2048  # tokens per optimizer step (--pack-length)


def _rss_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def run_imitate(work: Path, steps: int, warmup: int, checkpointing: bool) -> dict:
    from imitate.config import load_config
    from imitate.train.recipe import train

    sets = [
        f"train.cache_dir={work / 'cache'}",
        f"train.max_steps={steps + warmup}",
        f"train.pack_length={PACK}",
        "train.grad_accum=1",
        "train.batch_rows=1",
        "train.eval_fraction=0",
        "train.threads=2",
        f"train.lora.r={tt.LORA['r']}",
        f"train.lora.alpha={tt.LORA['lora_alpha']}",
        f"train.lora.dropout={tt.LORA['lora_dropout']}",
        f"train.gradient_checkpointing={str(checkpointing).lower()}",
        f"train.cpu_mmap_threshold={os.environ.get('BENCH_CPU_MMAP_THRESHOLD', 'null')}",
    ]
    out = work / f"imitate-mem-{checkpointing}"
    summary = train(load_config(overrides=sets), work / "records.jsonl", out, model=str(work / "student")).summary
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][warmup:]
    from imitate.train.memory import for_config
    from imitate.train.model import resolve

    _, est = for_config(load_config(overrides=sets).train, resolve(str(work / "student")))
    return {
        "tokens": sum(r["tokens"] for r in rows),
        "seconds": sum(r["seconds"] for r in rows),
        "trainer_added_peak": summary["memory"]["added_peak"],
        "estimate": est.peak,
    }


def run_trl(work: Path, steps: int, warmup: int, checkpointing: bool) -> dict:
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
        per_device_train_batch_size=1,
        packing=True,
        max_length=PACK,
        gradient_checkpointing=checkpointing,
        bf16=False,  # fp32 on CPU
        max_steps=steps + warmup,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=str(work / "student"), args=args, train_dataset=Dataset.from_list(rows), peft_config=LoraConfig(**tt.LORA)
    )
    return tt._timed_train(trainer, tt._Counting(trainer.data_collator), steps, warmup)


def main() -> None:
    global PACK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-python", help="python of the venv that has trl (omit to skip TRL)")
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--pack-length", type=int, default=PACK, help="tokens per optimizer step (one packed row)")
    parser.add_argument(
        "--cpu-mmap-threshold",
        default="null",
        help="imitate's train.cpu_mmap_threshold (bytes, or null for glibc's adaptive default)",
    )
    parser.add_argument("--runner", choices=["imitate", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    PACK = args.pack_length
    if args.runner:
        sys.path.insert(0, str(ROOT))
        # the imports first (both trainers load torch, transformers, peft): the baseline is the process with its
        # libraries loaded
        import peft  # noqa: F401
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        if args.runner == "imitate":
            import imitate.train.recipe  # noqa: F401
        else:
            import datasets  # noqa: F401
            from trl import SFTConfig, SFTTrainer  # noqa: F401
        baseline = _rss_kib("VmRSS") * 1024
        run = run_imitate if args.runner == "imitate" else run_trl
        result = run(args.work, args.steps, args.warmup, args.checkpointing)
        peak = _rss_kib("VmHWM") * 1024
        print("RESULT " + json.dumps({**result, "baseline": baseline, "peak": peak, "added": peak - baseline}))
        return

    sys.path.insert(0, str(ROOT))
    from imitate.train.model import load_model, load_tokenizer, resolve

    work = args.work or Path(tempfile.mkdtemp(prefix="imitate-mem-bench-"))
    if not (work / "student" / "config.json").exists():
        source = resolve(None)
        load_model(source).save_pretrained(work / "student")
        load_tokenizer(source).save_pretrained(work / "student")
    tt.make_records(work / "records.jsonl")

    def child(runner: str, checkpointing: bool, python: str) -> dict:
        cmd = [python, __file__, "--runner", runner, "--work", str(work), "--steps", str(args.steps)]
        cmd += ["--warmup", str(args.warmup), "--pack-length", str(PACK)]
        cmd += ["--checkpointing"] if checkpointing else []
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
               "BENCH_CPU_MMAP_THRESHOLD": args.cpu_mmap_threshold}  # fmt: skip
        before = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{runner} failed:\n{proc.stderr[-4000:]}")
        result = json.loads(line[len("RESULT ") :])
        result["load"] = (before, os.getloadavg()[0])
        print(
            f"  {runner} checkpointing={checkpointing}: added {result['added'] / 2**20:.0f} MiB, "
            f"{result['tokens'] / result['seconds']:.1f} tokens/s; load average {before:.2f} -> "
            f"{os.getloadavg()[0]:.2f}",
            flush=True,
        )
        return result

    runs: dict[tuple[str, bool], dict] = {}
    for checkpointing in (False, True):
        runs[("imitate", checkpointing)] = child("imitate", checkpointing, sys.executable)
        if args.bench_python:
            runs[("trl", checkpointing)] = child("trl", checkpointing, args.bench_python)

    print(f"\nwork dir {work}; {PACK} tokens per optimizer step, {args.steps} measured steps after {args.warmup}\n")
    print(
        "| trainer | checkpointing | added peak MiB | peak RSS MiB | tokens/s | peak vs TRL off | peak vs TRL same "
        "| tokens/s vs TRL same |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (name, ckpt), r in runs.items():
        rate = r["tokens"] / r["seconds"]
        ref, same = runs.get(("trl", False)), runs.get(("trl", ckpt))
        vs_peak = f"{r['added'] / ref['added']:.2f}x" if ref else "-"
        vs_same = f"{r['added'] / same['added']:.2f}x" if same else "-"
        vs_rate = f"{rate / (same['tokens'] / same['seconds']):.2f}x" if same else "-"
        print(
            f"| {name} | {'on' if ckpt else 'off'} | {r['added'] / 2**20:.0f} | {r['peak'] / 2**20:.0f} | "
            f"{rate:.1f} | {vs_peak} | {vs_same} | {vs_rate} |"
        )
    for ckpt in (False, True):
        r = runs[("imitate", ckpt)]
        print(
            f"imitate checkpointing={'on' if ckpt else 'off'}: estimate {r['estimate'] / 2**20:.0f} MiB vs the "
            f"trainer's own added peak {r['trainer_added_peak'] / 2**20:.0f} MiB "
            f"({r['estimate'] / r['trainer_added_peak']:.2f}x)"
        )
    imitate_rate = {c: runs[("imitate", c)]["tokens"] / runs[("imitate", c)]["seconds"] for c in (False, True)}
    print(f"imitate tokens/s with checkpointing / without: {imitate_rate[True] / imitate_rate[False]:.2f}x")


if __name__ == "__main__":
    main()
