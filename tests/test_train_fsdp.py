"""train.parallel=fsdp under torchrun: 2 CPU processes (gloo), each decoder layer sharded with FSDP2, give the same
losses and the same adapter as 1 process accumulating the same micro-batches; the run is killed (SIGKILL to the torchrun
launcher and both ranks) after its first sharded checkpoint and resumed from it; the adapter it saves (gathered on
rank 0) is peft's format and loads with peft."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import TRAIN_ONE, TRAIN_TWO, run_train, sets, synthetic_records, tiny_model_dir, train_env

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
    "train.epochs=6",
]
STEPS = 8  # both runs stop here (max_steps is not part of the schedule), long before the 6 epochs end


def _complete(out: Path) -> list[int]:
    return sorted(int(c.parent.name.split("-")[1]) for c in out.glob("checkpoints/step-*/complete"))


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux /proc): torchrun starts its workers in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def _kill_after_first_checkpoint(args: list[str], tmp_path, out: Path) -> int:
    """Run under torchrun until a complete checkpoint exists, then SIGKILL the launcher and both ranks at once, as
    a machine that loses power or the OOM killer would."""
    log = tmp_path / "killed.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=train_env(tmp_path))
        try:
            deadline = time.monotonic() + 240
            while not _complete(out):
                assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no checkpoint within 240 s"
                time.sleep(0.01)
        finally:
            tree = _tree(proc.pid)
            for pid in tree:
                os.kill(pid, signal.SIGKILL)
            proc.wait()
    assert len(tree) >= 3, f"expected the launcher and two ranks, found processes {tree}"
    assert proc.returncode == -signal.SIGKILL
    return _complete(out)[-1]


def test_fsdp_matches_one_process_and_resumes_after_a_kill(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    write_jsonl(data, synthetic_records(24, seed=5))
    common = [str(data), "--model", str(model)]
    one = [*TRAIN_ONE, *common, "--out", str(tmp_path / "one")]
    run_train([*one, *sets(*SETS, "train.grad_accum=2", f"train.max_steps={STEPS}")], tmp_path, "single process")
    two = [*TRAIN_TWO, *common, "--out", str(tmp_path / "two")]
    fsdp = sets(*SETS, "train.grad_accum=1", "train.parallel=fsdp")
    killed_at = _kill_after_first_checkpoint([*two, *fsdp], tmp_path, tmp_path / "two")
    assert killed_at < STEPS, "the killed run got too far for the resume to be tested"
    step = tmp_path / "two" / "checkpoints" / f"step-{killed_at:06d}"
    assert (step / "sharded" / ".metadata").exists()
    assert len(list((step / "sharded").glob("*.distcp"))) == 2  # one shard file per rank
    resumed = run_train(
        [*two, *fsdp, "--set", "train.resume=latest", "--set", f"train.max_steps={STEPS}"],
        tmp_path,
        "torchrun fsdp, resumed after the kill",
    )
    said = "".join((resumed.stdout + resumed.stderr).split())  # the console may wrap a long path anywhere
    assert f"resumedfrom{step}" in said

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    a, b = rows("one"), rows("two")
    assert len(a) == len(b) == STEPS
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
