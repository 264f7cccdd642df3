"""Helpers for the train tests: the SmolLM2 tokenizer from the local GGUF (loaded once per session, saved to a
temporary folder), tiny random LLaMA models built in-process, and record factories.

Nothing here reaches the Hub: HF_HUB_OFFLINE is forced on before transformers is imported.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from imitate.records import Message, Provenance, Query, Record

MODEL_DIR = Path(os.environ.get("IMITATE_MODEL_DIR", "~/.cache/imitate/models")).expanduser()
GGUF = MODEL_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"

# `imitate.train` in one process, and under torchrun in two CPU processes (gloo)
TRAIN_ONE = [sys.executable, "-m", "imitate.train"]
TRAIN_TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
             "-m", "imitate.train"]  # fmt: skip


def train_env(tmp_path: Path) -> dict[str, str]:
    """A training subprocess's environment: offline, one thread per process, its own tokenised-data cache."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "IMITATE_CACHE_DIR": str(tmp_path / "cache")}


def run_train(args: list[str], tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, env=train_env(tmp_path), timeout=240)
    assert out.returncode == 0, f"{name} failed:\n{out.stderr[-3000:]}"
    return out


def sets(*settings: str) -> list[str]:
    """--set arguments."""
    return [a for s in settings for a in ("--set", s)]


def require_gguf() -> Path:
    if not GGUF.exists():
        pytest.fail(f"{GGUF} is missing: run `make install` (it downloads the SmolLM2 student)", pytrace=False)
    return GGUF


@functools.cache
def smol_tokenizer_dir() -> Path:
    """The GGUF's tokenizer saved as a plain HF tokenizer folder (GGUF parsing is slow: once per session)."""
    from transformers import AutoTokenizer

    gguf = require_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = Path(tempfile.mkdtemp(prefix="imitate-test-tokenizer-"))
    atexit.register(shutil.rmtree, folder, True)
    tok.save_pretrained(folder)
    return folder


def smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir())


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random LlamaForCausalLM with the SmolLM2 vocabulary: small enough for a few CPU steps in a unit test."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smol_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def tiny_model_dir(dest: Path, seed: int = 0) -> Path:
    """A tiny model saved as a local HF folder (weights + tokenizer), the way a user's own student would be."""
    dest.mkdir(parents=True, exist_ok=True)
    tiny_llama(seed).save_pretrained(dest)
    smol_tokenizer().save_pretrained(dest)
    return dest


def make_record(
    rid: str,
    question: str,
    answer: str,
    *,
    system: str | None = None,
    teacher: str = "teacher-a",
    collection: str | None = None,
    turns: list[Message] | None = None,
    truncated: bool = False,
) -> Record:
    query = Query(id=rid, question=question, system=system, collection=collection, turns=turns or [])
    return Record(
        id=rid,
        query=query,
        messages=query.messages(system),
        response=answer,
        truncated=truncated,
        provenance=Provenance(teacher=teacher, model="m", base_url="http://127.0.0.1/v1", request_key=rid),
    )


WORDS = [
    "the",
    "model",
    "learns",
    "to",
    "explain",
    "each",
    "step",
    "before",
    "it",
    "answers",
    "and",
    "checks",
    "the",
    "result",
    "again",
    "because",
    "careful",
    "reasoning",
    "makes",
    "short",
    "answers",
    "more",
    "reliable",
    "for",
    "every",
    "student",
]


def synthetic_records(n: int, seed: int = 0, teacher: str = "teacher-a", min_words: int = 4, max_words: int = 40):
    """Deterministic question/answer records of varied length."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "?"
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + "."
        system = "Answer step by step." if i % 3 == 0 else None
        out.append(make_record(f"{teacher}-{seed}-{i}", q, a, system=system, teacher=teacher))
    return out
