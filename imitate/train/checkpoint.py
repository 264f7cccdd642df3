"""Checkpoints for exact resume: adapter weights, optimizer, scheduler, every rank's RNG, and the data position.

    OUT/checkpoints/step-000040/
        adapter.safetensors   trainable (LoRA) parameters by name
        trainer.pt            optimizer + scheduler state, position (stage, epoch, cursor, step), history, hashes
        rng-rank0.pt …        python, torch (+ cuda) and LoRA-dropout RNG state of each rank
        complete              written last: a checkpoint without it is ignored

The data position is enough to replay the order because each epoch's order is a pure function of
(seed, stage, epoch). A checkpoint made under a different data hash or training config refuses to resume.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from imitate.config import TrainConfig
from imitate.errors import TrainError

# Settings that may change between a run and its resume without changing what is computed.
RESUME_FREE = {
    "resume", "max_steps", "save_every", "log_every", "threads", "cpu_mmap_threshold", "cache_dir", "check_examples",
}  # fmt: skip


def rng_state(dropout_rng: Any = None) -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if dropout_rng is not None:
        state["dropout"] = dropout_rng.bit_generator.state
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], dropout_rng: Any = None) -> None:
    random.setstate(state["python"])
    if dropout_rng is not None:
        dropout_rng.bit_generator.state = state["dropout"]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    folder: Path,
    *,
    rank: int,
    params: dict[str, torch.Tensor],
    trainer: dict[str, Any] | None,
    barrier: Any,
    dropout_rng: Any = None,
) -> Path:
    """Every rank writes its RNG; rank 0 (the one passing `trainer`) writes the rest and marks it complete."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(dropout_rng), folder / f"rng-rank{rank}.pt")
    barrier()
    if trainer is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, folder / "adapter.safetensors")
        torch.save(trainer, folder / "trainer.pt")
        (folder / "complete").write_text("ok\n")
    barrier()
    return folder


def latest(out: Path) -> Path | None:
    done = sorted(p.parent for p in (out / "checkpoints").glob("step-*/complete"))
    return done[-1] if done else None


def find(out: Path, spec: str) -> Path:
    folder = latest(out) if spec == "latest" else Path(spec).expanduser()
    if folder is None:
        raise TrainError(f"train.resume=latest but {out / 'checkpoints'} holds no complete checkpoint")
    if not (folder / "complete").exists():
        raise TrainError(f"{folder} is not a complete checkpoint")
    return folder


def load(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    rng_file = folder / f"rng-rank{rank}.pt"
    if not rng_file.exists():
        raise TrainError(f"{folder} has no RNG state for rank {rank}: resume with the same number of processes")
    params = load_file(folder / "adapter.safetensors")
    trainer = torch.load(folder / "trainer.pt", weights_only=False)
    return params, trainer, torch.load(rng_file, weights_only=False)


def check_compatible(trainer: dict[str, Any], data_hash: str, resume_key: dict[str, Any]) -> None:
    if trainer["data_hash"] != data_hash:
        raise TrainError("the checkpoint was made on different data (data hash differs): cannot resume exactly")
    # a setting added to TrainConfig after the checkpoint was written counts as its default there
    defaults = resume_key_defaults()
    old = {**{k: v for k, v in defaults.items() if k in resume_key}, **trainer["resume_key"]}
    changed = sorted(k for k in set(old) | set(resume_key) if old.get(k) != resume_key.get(k))
    if changed:
        raise TrainError(f"the checkpoint was made with different train settings: {', '.join(changed)}")


def prune(out: Path, keep: int = 2) -> None:
    """Keep the newest `keep` complete checkpoints."""
    done = sorted(p.parent for p in (out / "checkpoints").glob("step-*/complete"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resume_key(t: Any) -> dict[str, Any]:
    """The train settings a resume must share with its checkpoint."""
    return {k: v for k, v in t.model_dump(mode="json").items() if k not in RESUME_FREE}


def resume_key_defaults() -> dict[str, Any]:
    """`resume_key` of a default TrainConfig: what an older checkpoint's missing keys stand for."""
    return resume_key(TrainConfig())


def trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_params(model: Any, saved: dict[str, torch.Tensor]) -> None:
    mine = trainable(model)
    if set(saved) != set(mine):
        raise TrainError("the checkpoint's adapter does not match this model's LoRA parameters")
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(saved[name])
