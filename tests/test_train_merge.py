"""Merge with self-check, chat, `--check`, and one-line errors for bad data and bad models."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from train_fixtures import synthetic_records, tiny_model_dir

from imitate.errors import ImitateError, InputError, TrainError
from imitate.records import write_jsonl
from imitate.train.commands import chat_command, merge_command, train_command


def _console() -> Console:
    return Console(file=io.StringIO(), width=200, force_terminal=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny student trained a few steps at a high learning rate, so its adapter really changes the logits."""
    root = tmp_path_factory.mktemp("merge")
    model = tiny_model_dir(root / "model")
    data = root / "data.jsonl"
    write_jsonl(data, synthetic_records(12, seed=4))
    sets = [f"train.cache_dir={root / 'cache'}", "train.lr=3e-2", "train.max_steps=3", "train.threads=1"]
    train_command(data, root / "run", model=str(model), overrides=sets, console=_console())
    return root / "run" / "adapter"


def test_merge_self_check_passes_and_merged_model_matches(tmp_path, trained):
    from transformers import AutoModelForCausalLM

    from imitate.train.merge import attach, base_of
    from imitate.train.model import load_model

    report = merge_command(trained, tmp_path / "merged", console=_console())
    assert report["max_abs_logit_diff"] < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with_adapter = attach(load_model(base_of(trained)), trained)
    base = load_model(base_of(trained)).eval()
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        a = with_adapter(input_ids=ids).logits
        m = merged(input_ids=ids).logits
        b = base(input_ids=ids).logits
    assert torch.allclose(a, m, atol=1e-4)
    assert (a - b).abs().max() > 1e-3  # the adapter is not a no-op, so the check means something
    assert json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"] == 2


def _corrupt(adapter: Path, dest: Path, edit) -> Path:
    shutil.copytree(adapter, dest)
    tensors = load_file(dest / "adapter_model.safetensors")
    save_file(edit(tensors), dest / "adapter_model.safetensors")
    return dest


def test_merge_fails_on_a_corrupted_adapter(tmp_path, trained):
    def poison(t):
        name = next(k for k in t if "lora_B" in k)
        t[name][0, 0] = float("nan")
        return t

    with pytest.raises(TrainError, match="not finite"):
        merge_command(_corrupt(trained, tmp_path / "nan", poison), tmp_path / "out1", console=_console())

    def rename(t):
        name = next(iter(t))
        t[name.replace("lora_A", "lora_X")] = t.pop(name)
        return t

    with pytest.raises(TrainError, match="does not fit the base model"):
        merge_command(_corrupt(trained, tmp_path / "renamed", rename), tmp_path / "out2", console=_console())

    truncated = _corrupt(trained, tmp_path / "truncated", lambda t: t)
    blob = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="cannot read the adapter"):
        merge_command(truncated, tmp_path / "out3", console=_console())
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_chat_one_shot_and_interactive(trained):
    console = _console()
    answer = chat_command(str(trained), prompt="What is 2+2?", max_new_tokens=4, console=console)
    assert isinstance(answer, str)
    assert chat_command(str(trained), lines=["hi\n", "\n", "never read\n"], max_new_tokens=3, console=console) is None


def test_check_shows_masks_and_trains_nothing(tmp_path, trained):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, synthetic_records(5, seed=2))
    console = _console()
    sets = [f"train.cache_dir={tmp_path / 'cache'}", "train.check_examples=2", "train.max_length=40"]
    student = trained.parent.parent / "model"
    report = train_command(data, tmp_path / "run", model=str(student), overrides=sets, check=True, console=console)
    text = console.file.getvalue()
    assert "examples kept" in text and "pad fraction" in text and "<|im_end|>" in text
    assert report["records"] == 5
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "setup, model, match",
    [
        ("missing", None, "does not exist"),
        ("bad-line", None, r"data\.jsonl:2: not a valid record"),
        ("empty-dir", None, "no \\*.jsonl or \\*.parquet"),
        ("ok", "nowhere/at/all", "does not exist"),
        ("ok", "dir-without-model", "not a model folder"),
        ("ok", "broken.gguf", "cannot load tokenizer"),
    ],
)
def test_bad_data_or_model_is_one_clear_line(tmp_path, setup, model, match):
    data = tmp_path / "data.jsonl"
    if setup == "bad-line":
        write_jsonl(data, synthetic_records(1))
        with open(data, "a") as f:
            f.write('{"id": "x"}\n')
    elif setup == "empty-dir":
        data = tmp_path / "empty"
        data.mkdir()
    elif setup == "ok":
        write_jsonl(data, synthetic_records(2))
    if model == "dir-without-model":
        (tmp_path / model).mkdir()
        model = str(tmp_path / model)
    elif model == "broken.gguf":
        (tmp_path / model).write_bytes(b"GGUF not really")
        model = str(tmp_path / model)
    with pytest.raises(ImitateError, match=match) as info:
        train_command(data, tmp_path / "run", model=model, overrides=[f"train.cache_dir={tmp_path}"], check=True)
    assert isinstance(info.value, InputError)
    assert "\n" not in info.value.one_line()


def test_train_package_and_commands_import_no_torch():
    code = "import sys, imitate.train, imitate.train.commands; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
