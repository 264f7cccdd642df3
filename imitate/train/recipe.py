"""The training recipe (STYLE.md §8), read top to bottom: setup → loop → save.

    imitate train DATA --out DIR [--model PATH|GGUF] [--config FILE] [--set train.key=value] [--check]
    torchrun --nproc_per_node 2 $(which imitate) train DATA --out DIR      (the same loop, data parallel)

Setup: read records, load the tokenizer, build masks (cached), hold out the eval split, load the student, wrap
it in LoRA. Then for each stage (Orca-style progressive stages; none configured = one stage on all data), for
each optimizer step:
  1. take the step's `grad_accum × world` micro-batches in the epoch's seeded order; this rank runs every
     world-th one;
  2. forward; cross-entropy at supervised positions only, summed and divided by the supervised-token count of
     the *whole* accumulated step over all ranks, so the step's loss is exactly the mean over its supervised
     tokens however it is split (correct by construction, no averaging of averages);
  3. sum gradients over ranks, clip, AdamW step, cosine-with-warm-up schedule step;
  4. log; eval every `eval_every` steps and at each stage's end; checkpoint every `save_every` steps.
`max_steps` stops a run early without changing its schedule, so a stopped run resumes exactly.
Save: adapter + tokenizer + generation config (eos = the template's end-of-turn token) + resolved config + data
hash, and metrics.jsonl, per_sample_loss.jsonl, loss.png, summary.json next to it.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from imitate import config as cfgmod
from imitate.errors import TrainError
from imitate.records import Record
from imitate.train import attention, checkpoint, data, dropout, fused, metrics, recompute, report
from imitate.train.cache import cache_root, cached_tokenize
from imitate.train.distributed import World, close_world, init_world
from imitate.train.loss import token_losses
from imitate.train.model import (
    ModelSource,
    check_options,
    device_and_dtype,
    load_model,
    load_tokenizer,
    peft_model,
    resolve,
)
from imitate.train.pack import collate, epoch_order, micro_batches
from imitate.train.tokenize import ChatFormat, Example, TokenizeSummary


@dataclass
class Prepared:
    """Everything known before the model loads: what `--check` shows and training consumes."""

    source: ModelSource
    tokenizer: Any
    fmt: ChatFormat
    records: list[Record]
    examples: list[Example]  # kept examples of every record, eval ones included
    summary: TokenizeSummary
    data_hash: str
    eval_ids: set[str]
    cache_hit: bool


def prepare(cfg: cfgmod.TrainConfig, data_path: Path, model: str | None) -> Prepared:
    records = data.load_records(data_path)
    source = resolve(model or cfg.model)
    tokenizer = load_tokenizer(source)
    fmt = ChatFormat.of(tokenizer, cfg.chat_template)
    digest = data.data_hash(records)
    examples, summary, hit = cached_tokenize(
        records,
        fmt,
        max_length=cfg.max_length,
        over_length=cfg.over_length,
        data_digest=digest,
        root=cache_root(cfg.cache_dir),
    )
    if not examples:
        raise TrainError(f"no trainable examples in {data_path}: " + "; ".join(summary.lines()))
    eval_ids = {r.id for r in records if data.is_eval(r.id, cfg.eval_fraction)}
    return Prepared(source, tokenizer, fmt, records, examples, summary, digest, eval_ids, hit)


@dataclass
class StagePlan:
    name: str
    lr: float
    epochs: int
    examples: list[Example]
    batches: list[list[list[int]]]  # micro-batches → rows → example indices

    def steps_per_epoch(self, per_step: int) -> int:
        return math.ceil(len(self.batches) / per_step)


def plan_stages(cfg: cfgmod.TrainConfig, prep: Prepared, pad_id: int) -> list[StagePlan]:
    stages = cfg.stages or [cfgmod.StageConfig(name="all", epochs=cfg.epochs)]
    by_id = {e.id: e for e in prep.examples}
    plans = []
    for st in stages:
        chosen = data.select(prep.records, teachers=st.teachers, collections=st.collections, tags=st.tags)
        examples = [by_id[r.id] for r in chosen if r.id in by_id and r.id not in prep.eval_ids]
        if not examples:
            raise TrainError(f"stage {st.name!r} selects no trainable records")
        batches = micro_batches(
            examples,
            mode=cfg.batching,
            rows_per_batch=cfg.batch_rows,
            pack_length=cfg.pack_length or cfg.max_length,
            pad_id=pad_id,
        )
        plans.append(StagePlan(st.name, st.lr or cfg.lr, st.epochs, examples, batches))
    return plans


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to the peak, then cosine down to `min_ratio` of it."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Position:
    stage: int = 0
    epoch: int = 0
    cursor: int = 0  # micro-batches of this epoch already consumed
    step: int = 0  # optimizer steps done, all stages
    stage_step: int = 0


@dataclass
class History:
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # per-sample losses (rank 0 holds the merged list)


@dataclass(frozen=True)
class Trained:
    summary: dict[str, Any]
    model: Any  # the peft model, adapter attached (for callers that go on using it, and for tests)


@dataclass(frozen=True)
class Run:
    """What stays fixed for the whole run."""

    t: cfgmod.TrainConfig
    world: World
    device: Any
    pad_id: int
    out: Path

    @property
    def packed(self) -> bool:
        return self.t.batching == "pack"

    @property
    def sharded(self) -> bool:
        return self.t.parallel == "fsdp" and self.world.size > 1


def train(
    cfg: cfgmod.ImitateConfig,
    data_path: Path,
    out: Path,
    model: str | None = None,
    console: Console | None = None,
    command: str | None = None,
) -> Trained:
    """Run the recipe; returns the summary (also in OUT/summary.json) and the trained (peft) model."""
    t, world = cfg.train, init_world()
    console = console or Console(stderr=True)

    def say(text: str) -> None:
        if world.main:
            console.print(text, soft_wrap=True, highlight=False)

    try:
        # ---- setup
        if t.threads:
            torch.set_num_threads(t.threads)
        device, dtype = device_and_dtype(t.dtype)
        if device.type == "cpu" and t.cpu_mmap_threshold is not None:
            metrics.set_mmap_threshold(t.cpu_mmap_threshold)
        gpu_options = {"quantization": t.quantization, "attn_implementation": t.attn_implementation}
        check_options(resolve(model or t.model), dtype=dtype, **gpu_options)  # fail before tokenising
        prep = prepare(t, data_path, model)
        for line in prep.summary.lines():
            say(f"[bold]tokenise[/] {line}" + (" (cached)" if prep.cache_hit else ""))
        if world.main:
            cfgmod.stamp(cfg, out, command)
        pad_id = prep.tokenizer.pad_token_id if prep.tokenizer.pad_token_id is not None else prep.fmt.eot_id
        run = Run(t, world, device, pad_id, out)
        stages = plan_stages(t, prep, pad_id)
        metrics.reset_peak_memory(device)  # memory.added_peak: what the student and training add from here
        memory = {"before_model": metrics.current_memory_bytes(device)}
        student, params, dropout_rng = _build_student(t, prep.source, device, dtype, world)
        memory["load_peak"] = metrics.peak_memory_bytes(device)
        n_base, n_lora = metrics.parameter_counts(student)
        flops_per_token = metrics.flops_per_token(n_base, n_lora)
        roofline = metrics.matmul_flops(device)
        say(f"student {prep.source}: {n_base / 1e6:.1f}M base linear weights, {n_lora / 1e6:.2f}M LoRA, {dtype}")
        pos, history, resumed = Position(), History(), None
        if t.resume:
            pos, history, resumed = _resume(run, student, prep, say)
        if world.main:  # a fresh run replaces an earlier one in OUT; a resumed one drops rows after its checkpoint
            report.restart_outputs(out, pos.step, fresh=not t.resume)
        world.barrier()
        eval_examples = [e for e in prep.examples if e.id in prep.eval_ids]
        per_step = t.grad_accum * world.size
        total_steps = sum(s.steps_per_epoch(per_step) * s.epochs for s in stages)
        goal = min(total_steps, t.max_steps or total_steps)
        started = time.perf_counter()

        # ---- loop: stages → epochs → optimizer steps
        with report.progress_bar(console, enabled=world.main) as progress:
            task = progress.add_task("", total=goal, completed=min(pos.step, goal))
            while pos.stage < len(stages) and pos.step < goal:
                plan = stages[pos.stage]
                stage_total = plan.steps_per_epoch(per_step) * plan.epochs
                optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=t.weight_decay)
                schedule = functools.partial(
                    lr_factor, warmup=round(t.warmup_ratio * stage_total), total=stage_total, min_ratio=t.min_lr_ratio
                )
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
                if resumed is not None and pos.stage_step > 0:  # mid-stage: same moments, schedule, RNG
                    trainer, rng, folder = resumed
                    if run.sharded:
                        _fsdp().load_optimizer(folder, student, optimizer)
                    else:
                        optimizer.load_state_dict(trainer["optimizer"])
                    scheduler.load_state_dict(trainer["scheduler"])
                    checkpoint.set_rng_state(rng, dropout_rng)
                else:  # this rank's dropout streams for this stage
                    torch.manual_seed(t.seed + 1000 * pos.stage + world.rank)
                    dropout.reseed(dropout_rng, t.seed, pos.stage, world.rank)
                resumed = None
                say(
                    f"stage {pos.stage + 1}/{len(stages)} {plan.name!r}: {len(plan.examples)} examples, "
                    f"{len(plan.batches)} micro-batches, {stage_total} steps, peak lr {plan.lr:g}"
                )
                stage_index = pos.stage
                while pos.stage == stage_index and pos.step < goal:
                    order = epoch_order(len(plan.batches), t.seed, pos.stage, pos.epoch)
                    group = [plan.batches[i] for i in order[pos.cursor : pos.cursor + per_step]]
                    lr, epoch = scheduler.get_last_lr()[0], pos.epoch
                    metrics.reset_peak_memory(device)
                    tick = time.perf_counter()
                    loss, grad_norm, samples = _step(run, student, params, plan.examples, group)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    seconds = time.perf_counter() - tick
                    pos.cursor, pos.step, pos.stage_step = pos.cursor + len(group), pos.step + 1, pos.stage_step + 1
                    if pos.cursor >= len(plan.batches):
                        pos.epoch, pos.cursor = pos.epoch + 1, 0
                    where = {"step": pos.step, "stage": plan.name, "stage_step": pos.stage_step, "epoch": epoch}
                    row = {**where, "loss": loss, "lr": lr, "grad_norm": grad_norm}
                    row.update(report.step_metrics(plan.examples, group, seconds))
                    row["flops_per_s"] = row["tokens_per_s"] * flops_per_token
                    if row["flops_per_s"] > roofline:  # the machine was busy when the roofline was measured
                        roofline = max(roofline, metrics.matmul_flops(device))
                    row["mfu"] = row["flops_per_s"] / roofline
                    row["peak_memory_bytes"] = metrics.peak_memory_bytes(device)
                    history.steps.append(row)
                    history.samples.extend({**where, **s} for s in world.gather(samples))
                    progress.update(task, completed=pos.step, description=f"loss {loss:.4f}")
                    if world.main and (pos.step % t.log_every == 0 or pos.step == goal):
                        progress.console.print(
                            report.log_line(row, goal), soft_wrap=True, highlight=False, markup=False
                        )
                        report.append_jsonl(out / "metrics.jsonl", row)
                    stage_done = pos.epoch >= plan.epochs
                    if eval_examples and (stage_done or (t.eval_every and pos.step % t.eval_every == 0)):
                        loss_eval = _evaluate(run, student, eval_examples)
                        history.evals.append({"step": pos.step, "stage": plan.name, "eval_loss": loss_eval})
                        say(f"  eval loss {loss_eval:.4f} ({len(eval_examples)} examples) at step {pos.step}")
                    if stage_done:
                        pos = Position(stage=pos.stage + 1, step=pos.step)
                    stopped_early = pos.step == goal < total_steps
                    if (t.save_every and pos.step % t.save_every == 0) or stopped_early:
                        _checkpoint(run, student, optimizer, scheduler, pos, history, prep, dropout_rng)

        # ---- save
        summary = report.summarise(
            history.steps,
            history.evals,
            history.samples,
            flops_per_token=flops_per_token,
            roofline=roofline,
            peak_memory=max([memory["load_peak"], *(r["peak_memory_bytes"] for r in history.steps)]),
        )
        memory["peak"] = summary["peak_memory_bytes"]
        memory["added_peak"] = memory["peak"] - memory["before_model"]
        summary.update(
            stages=[{"name": s.name, "examples": len(s.examples), "epochs": s.epochs, "lr": s.lr} for s in stages],
            wall_seconds=time.perf_counter() - started,
            n_base=n_base,
            n_lora=n_lora,
            memory=memory,
            records=len(prep.records),
            eval_records=len(prep.eval_ids),
            data_hash=prep.data_hash,
            tokenize=prep.summary.to_dict(),
        )
        adapter_state = _fsdp().full_adapter_state(student) if run.sharded else None  # every rank takes part
        if world.main:
            prep.tokenizer.chat_template = prep.fmt.template
            report.save_outputs(
                out,
                student,
                prep.tokenizer,
                adapter_state=adapter_state,
                generation={"bos_token_id": prep.fmt.bos_id, "eos_token_id": prep.fmt.eot_id, "pad_token_id": pad_id},
                cfg=cfg,
                meta={
                    "base_model": str(prep.source),
                    "base_kind": prep.source.kind,
                    "data_hash": prep.data_hash,
                    "eot_token_id": prep.fmt.eot_id,
                    "default_system_removed": prep.fmt.default_system,
                },
                history=history,
                summary=summary,
                command=command,
            )
            say(f"[bold green]saved[/] {out / 'adapter'} — summary in {out / 'summary.json'}")
        world.barrier()
        return Trained(summary, student)
    finally:
        close_world(world)


def _build_student(t: cfgmod.TrainConfig, source: ModelSource, device: Any, dtype: Any, world: World):
    from peft import LoraConfig

    model = load_model(source, dtype, quantization=t.quantization, attn_implementation=t.attn_implementation)
    if t.batching == "pack" and t.attn_implementation == "auto":
        attention.install(model)  # one causal SDPA per packed example instead of a masked row
    lora = LoraConfig(
        r=t.lora.r,
        lora_alpha=t.lora.alpha,
        lora_dropout=t.lora.dropout,
        target_modules=t.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(t.seed)  # the same LoRA initialisation on every rank, run after run
    model = peft_model(model, lora).to(device)
    dropout_rng = np.random.Generator(np.random.SFC64(t.seed))
    dropout.install(model, dropout_rng)  # same semantics, faster masks on CPU (train/dropout.py)
    fused.install(model)  # each LoRA projection as one autograd node, peft's arithmetic (train/fused.py)
    if t.gradient_checkpointing:  # recompute layers in backward with the same dropout masks (train/recompute.py)
        recompute.enable(model, dropout_rng)
    model.train()
    world.broadcast_params([p for p in model.parameters() if p.requires_grad])
    if t.parallel == "fsdp" and world.size > 1:
        _fsdp().shard(model)  # each decoder layer split over the ranks (train/fsdp.py)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, dropout_rng


def _fsdp():
    from imitate.train import fsdp

    return fsdp


def _step(run: Run, model: Any, params: list[Any], examples: list[Example], group: list[Any]):
    """Forward + backward of one optimizer step's micro-batches on this rank, gradients summed over ranks,
    clipped. Returns (mean loss over the step's supervised tokens, grad norm before clipping, per-sample rows)."""
    n_targets = sum(report.n_targets(examples[i]) for rows in group for row in rows for i in row)
    scale = 1.0 / max(1, n_targets)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    samples: list[dict[str, Any]] = []
    for rows, weight in _shares(run, group):
        batch = collate(examples, rows, run.pad_id, packed=run.packed).to(run.device)
        losses = token_losses(model, batch)
        (losses.sum() * (scale * weight)).backward()
        if weight:
            loss_sum += losses.detach().double().sum()
            samples.extend(report.per_sample(batch, losses.detach()))
    # FSDP has already summed (reduce-scattered) the gradients of the sharded layers: only the loss is summed
    total = run.world.sum_(loss_sum) if run.sharded else run.world.sum_grads(params, loss_sum)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.t.max_grad_norm).item()
    return total.item() * scale, grad_norm, samples


def _shares(run: Run, items: list[Any]) -> list[tuple[Any, int]]:
    """This rank's micro-batches with weight 1. Sharded, every rank runs as many passes as the busiest (each pass
    all-gathers layers): a rank short of one repeats the first micro-batch with weight 0."""
    mine = [(rows, 1) for rows in run.world.share(items)]
    if run.sharded and items:
        mine += [(items[0], 0)] * (-(-len(items) // run.world.size) - len(mine))
    return mine


@torch.no_grad()
def _evaluate(run: Run, model: Any, examples: list[Example]) -> float:
    """Mean CE over the eval split's supervised tokens, dropout off, shared over ranks."""
    model.eval()
    plan = micro_batches(
        examples,
        mode=run.t.batching,
        rows_per_batch=run.t.batch_rows,
        pack_length=run.t.pack_length or run.t.max_length,
        pad_id=run.pad_id,
    )
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)
    for rows, weight in _shares(run, plan):
        losses = token_losses(model, collate(examples, rows, run.pad_id, packed=run.packed).to(run.device))
        totals += weight * torch.stack([losses.double().sum(), torch.tensor(losses.numel(), dtype=torch.float64)])
    model.train()
    run.world.sum_(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


# ---------------------------------------------------------------------------------------------- resume / save


def _resume(run: Run, model: Any, prep: Prepared, say: Any):
    folder = checkpoint.find(run.out, run.t.resume or "latest")
    saved, trainer, rng = checkpoint.load(folder, run.world.rank)
    checkpoint.check_compatible(trainer, prep.data_hash, checkpoint.resume_key(run.t))
    if run.sharded:
        _fsdp().load_model(folder, model)
    else:
        checkpoint.load_params(model, saved)
    history = History(**trainer["history"])
    if not run.world.main:
        history.samples = []
    say(f"resumed from {folder} at step {trainer['position']['step']}")
    return Position(**trainer["position"]), history, (trainer, rng, folder)


def _checkpoint(run: Run, model, optimizer, scheduler, pos: Position, history: History, prep, dropout_rng) -> None:
    trainer = None
    folder = run.out / "checkpoints" / f"step-{pos.step:06d}"
    if run.sharded:  # LoRA weights and optimizer state, each rank its shards (train/fsdp.py)
        _fsdp().save(folder, model, optimizer)
    if run.world.main:
        trainer = {
            "optimizer": None if run.sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "position": asdict(pos),
            "history": asdict(history),
            "data_hash": prep.data_hash,
            "resume_key": checkpoint.resume_key(run.t),
        }
    checkpoint.save(
        folder,
        rank=run.world.rank,
        params={} if run.sharded else checkpoint.trainable(model),
        trainer=trainer,
        barrier=run.world.barrier,
        dropout_rng=dropout_rng,
    )
    if run.world.main:
        checkpoint.prune(run.out)
