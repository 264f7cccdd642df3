"""train.parallel=fsdp under torchrun: 2 CPU processes (gloo), each decoder layer sharded with FSDP2, give the same
losses and the same adapter as 1 process accumulating the same micro-batches; the run is stopped after a sharded
checkpoint and resumed from it; the adapter it saves (gathered on rank 0) is peft's format and loads with peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import synthetic_records, tiny_model_dir

from imitate.records import write_jsonl

pytestmark = pytest.mark.integration

SETS = [
    "train.lr=5e-3",
    "train.pack_length=160",
    "train.eval_fraction=0.2",
    "train.lora.r=4",
    "train.lora.dropout=0",
    "train.threads=1",
    "train.save_every=2",
]


def _run(args: list[str], tmp_path, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "IMITATE_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, f"{name} failed:\n{out.stderr[-3000:]}"
    return out


def _sets(*extra: str) -> list[str]:
    return [a for s in [*SETS, *extra] for a in ("--set", s)]


def test_fsdp_matches_one_process_and_resumes_from_sharded_checkpoints(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    write_jsonl(data, synthetic_records(24, seed=5))
    common = [str(data), "--model", str(model)]
    one = [sys.executable, "-m", "imitate.train", *common, "--out", str(tmp_path / "one")]
    _run([*one, *_sets("train.grad_accum=2")], tmp_path, "single process")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    two = [*torchrun, "-m", "imitate.train", *common, "--out", str(tmp_path / "two")]
    fsdp = _sets("train.grad_accum=1", "train.parallel=fsdp")
    _run([*two, *fsdp, "--set", "train.max_steps=2"], tmp_path, "torchrun fsdp, stopped at step 2")
    step2 = tmp_path / "two" / "checkpoints" / "step-000002"
    assert (step2 / "complete").exists() and (step2 / "sharded" / ".metadata").exists()
    assert len(list((step2 / "sharded").glob("*.distcp"))) == 2  # one shard file per rank
    _run([*two, *fsdp, "--set", "train.resume=latest"], tmp_path, "torchrun fsdp, resumed")

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    a, b = rows("one"), rows("two")
    assert len(a) == len(b) > 2
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert y["tokens"] == x["tokens"]
    eval_one = json.loads((tmp_path / "one" / "summary.json").read_text())["eval_loss"]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["eval_loss"] == pytest.approx(eval_one, abs=1e-5)

    ref = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert set(got) == set(ref) and all(torch.allclose(got[k], ref[k], atol=1e-5) for k in ref)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), tmp_path / "two" / "adapter")
    params = dict(loaded.named_parameters())
    for name, tensor in got.items():
        assert torch.equal(params[name.replace(".weight", ".default.weight")], tensor)
