"""The student's GPU-only options (`train.quantization`, `train.attn_implementation`) and quiet loading
(imitate/train/model.py) on a CPU machine: one-line errors before any weights load, bitsandbytes / flash-attn
never imported unless asked, configs that round-trip, and no progress bar when a GGUF loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imitate.config import TrainConfig, load_config, to_yaml
from imitate.errors import ConfigError, TrainError
from imitate.train.model import Machine, ModelSource, check_options, load_model, quiet_progress, resolve

REPO = Path(__file__).resolve().parent.parent
GPU_PACKAGES = ("bitsandbytes", "flash_attn")
CPU = Machine(cuda=False, installed=frozenset())
GPU_BARE = Machine(cuda=True, installed=frozenset())
GPU_FULL = Machine(cuda=True, installed=frozenset(GPU_PACKAGES))
FOLDER = ModelSource("folder", "/models/student")
GGUF = ModelSource("gguf", "/models", "student.gguf")
EXTRA = "(pip install 'imitate[gpu]')"


def write_tiny_gguf(path: Path, vocab: int = 64, hidden: int = 16, ff: int = 32) -> Path:
    """A one-layer random LLaMA as an F32 GGUF (~15 kB): the real student's loader path, in a blink."""
    import numpy as np
    from gguf import GGUFWriter

    heads, kv = 2, 1
    rng = np.random.default_rng(0)

    def weight(*shape: int):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_block_count(1)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    kv_dim = kv * hidden // heads
    tensors = {
        "token_embd.weight": weight(vocab, hidden),
        "output_norm.weight": np.ones(hidden, np.float32),
        "blk.0.attn_norm.weight": np.ones(hidden, np.float32),
        "blk.0.attn_q.weight": weight(hidden, hidden),
        "blk.0.attn_k.weight": weight(kv_dim, hidden),
        "blk.0.attn_v.weight": weight(kv_dim, hidden),
        "blk.0.attn_output.weight": weight(hidden, hidden),
        "blk.0.ffn_norm.weight": np.ones(hidden, np.float32),
        "blk.0.ffn_gate.weight": weight(ff, hidden),
        "blk.0.ffn_up.weight": weight(ff, hidden),
        "blk.0.ffn_down.weight": weight(hidden, ff),
    }
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------------------------- error lines


@pytest.mark.parametrize(
    ("src", "options", "machine", "line"),
    [
        (
            FOLDER,
            {"quantization": "4bit"},
            CPU,
            f"TrainError: train.quantization=4bit needs a CUDA GPU and bitsandbytes {EXTRA}; this machine has no "
            "CUDA GPU — or set train.quantization=none to train the full-precision base",
        ),
        (
            FOLDER,
            {"quantization": "8bit"},
            GPU_BARE,
            f"TrainError: train.quantization=8bit needs a CUDA GPU and bitsandbytes {EXTRA}; bitsandbytes is not "
            "installed — or set train.quantization=none to train the full-precision base",
        ),
        (
            GGUF,
            {"quantization": "4bit"},
            GPU_FULL,
            "TrainError: train.quantization=4bit cannot quantise a GGUF student (/models/student.gguf): transformers "
            "de-quantises GGUF to float — give an HF model folder or Hub name as the student, or set "
            "train.quantization=none",
        ),
        (
            FOLDER,
            {"attn_implementation": "flash_attention_2"},
            CPU,
            f"TrainError: train.attn_implementation=flash_attention_2 needs a CUDA GPU and flash-attn {EXTRA}; this "
            "machine has no CUDA GPU — or use train.attn_implementation=auto (SDPA)",
        ),
        (
            GGUF,
            {"attn_implementation": "flash_attention_2", "dtype": torch.bfloat16},
            GPU_BARE,
            f"TrainError: train.attn_implementation=flash_attention_2 needs a CUDA GPU and flash-attn {EXTRA}; "
            "flash-attn is not installed — or use train.attn_implementation=auto (SDPA)",
        ),
        (
            FOLDER,
            {"attn_implementation": "flash_attention_2", "dtype": torch.float32},
            GPU_FULL,
            "TrainError: train.attn_implementation=flash_attention_2 needs bfloat16 weights; the student would load "
            "in float32 — set train.dtype=bfloat16, or use train.attn_implementation=auto",
        ),
    ],
)
def test_unusable_gpu_options_fail_in_one_line_naming_the_field(src, options, machine, line):
    with pytest.raises(TrainError) as err:
        check_options(src, machine=machine, **options)
    assert err.value.one_line() == line


@pytest.mark.parametrize(
    ("src", "options", "machine"),
    [
        (GGUF, {}, CPU),
        (GGUF, {"attn_implementation": "sdpa"}, CPU),
        (FOLDER, {"attn_implementation": "eager", "dtype": torch.float32}, CPU),
        (FOLDER, {"quantization": "4bit", "attn_implementation": "flash_attention_2"}, GPU_FULL),
        (GGUF, {"attn_implementation": "flash_attention_2", "dtype": torch.bfloat16}, GPU_FULL),
    ],
)
def test_usable_options_pass(src, options, machine):
    check_options(src, machine=machine, **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")
@pytest.mark.parametrize("options", [{"quantization": "4bit"}, {"attn_implementation": "flash_attention_2"}])
def test_load_model_refuses_before_touching_the_weights_on_this_machine(options):
    missing = ModelSource("folder", "/nonexistent/student")  # were it opened, this would be an InputError
    with pytest.raises(TrainError, match="this machine has no CUDA GPU"):
        load_model(missing, **options)


# ---------------------------------------------------------------------------------------------- config


def test_options_default_to_todays_behaviour_and_round_trip(tmp_path: Path):
    default = load_config().train
    assert (default.quantization, default.attn_implementation) == ("none", "auto")
    cfg = load_config(overrides=["train.quantization=4bit", "train.attn_implementation=flash_attention_2"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg, "imitate train data --out run"))
    again = load_config(path)
    assert again == cfg
    assert (again.train.quantization, again.train.attn_implementation) == ("4bit", "flash_attention_2")


def test_bad_option_values_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.quantization=2bit", "train.attn_implementation=xformers"])
    assert "train.quantization" in err.value.message and "train.attn_implementation" in err.value.message


def test_flash_attention_packs_only_one_row_per_batch():
    flash = "train.attn_implementation=flash_attention_2"
    with pytest.raises(ConfigError, match=r"train.attn_implementation=flash_attention_2 .* train.batch_rows=1"):
        load_config(overrides=[flash, "train.batch_rows=2"])
    load_config(overrides=[flash, "train.batch_rows=2", "train.batching=pad"])
    load_config(overrides=[flash, "train.batch_rows=1"])


# ---------------------------------------------------------------------------------------------- quiet loading


def test_gguf_load_prints_no_progress_bar(tmp_path: Path, capsys):
    from transformers import AutoModelForCausalLM

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    model = load_model(resolve(gguf))
    assert model.num_parameters() > 0
    err = capsys.readouterr().err
    assert "de-quantizing GGUF tensors" not in err and "Loading weights" not in err
    # The same load without the scope shows the bar: the silencing is scoped and this test can see a bar.
    AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name)
    assert "de-quantizing GGUF tensors" in capsys.readouterr().err


def test_quiet_progress_puts_back_what_it_replaced():
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar = gguf_utils.tqdm

    def hook(factory, args, kwargs):
        return factory(*args, **kwargs)

    before = hf_logging.set_tqdm_hook(hook)
    try:
        with pytest.raises(KeyError), quiet_progress(gguf=True):
            assert gguf_utils.tqdm is not bar
            raise KeyError("a load that fails")
        assert gguf_utils.tqdm is bar
    finally:
        assert hf_logging.set_tqdm_hook(before) is hook


# ---------------------------------------------------------------------------------------------- lazy imports


def _run(code: str, *args: str, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=240
    )


@pytest.mark.integration
def test_gpu_packages_are_not_imported_even_when_installed(tmp_path: Path):
    """With booby-trapped bitsandbytes and flash_attn installed (package + dist-info, as pip leaves them),
    importing the trainer, loading a student and refusing the GPU options on a CPU machine import neither."""
    site = tmp_path / "site"
    for name, version in zip(GPU_PACKAGES, ("0.45.0", "2.7.0"), strict=True):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"raise ImportError('{name} was imported')\n")
        (site / f"{name}-{version}.dist-info").mkdir()
        (site / f"{name}-{version}.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    code = (
        "import sys\n"
        "import imitate.train, imitate.train.recipe\n"
        "from imitate.errors import TrainError\n"
        "from imitate.train.model import Machine, ModelSource, check_options, load_model, resolve\n"
        "print('FOUND', sorted(Machine.here().installed))\n"
        "load_model(resolve(sys.argv[1]))\n"
        "for options in ({'quantization': '4bit'}, {'attn_implementation': 'flash_attention_2'}):\n"
        "    try:\n"
        "        check_options(ModelSource('folder', 'unused'), **options)\n"
        "    except TrainError as exc:\n"
        "        print('REFUSED', exc.message)\n"
        "print('IMPORTED', sorted(m for m in ('bitsandbytes', 'flash_attn') if m in sys.modules))\n"
    )
    out = _run(code, str(gguf), pythonpath=[site, REPO])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FOUND ['bitsandbytes', 'flash_attn']" in out.stdout  # the traps are armed
    assert "IMPORTED []" in out.stdout
    if not torch.cuda.is_available():
        assert out.stdout.count("this machine has no CUDA GPU") == 2


@pytest.mark.integration
def test_default_train_imports_no_gpu_package_and_keeps_packed_attention(tmp_path: Path):
    from train_fixtures import synthetic_records, tiny_model_dir

    from imitate.records import write_jsonl

    model = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    write_jsonl(data, synthetic_records(6))
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from imitate.config import load_config\n"
        "from imitate.train.recipe import train\n"
        "data, model, out = sys.argv[1:4]\n"
        "cfg = load_config(overrides=['train.max_steps=1', 'train.grad_accum=1', 'train.eval_fraction=0',\n"
        "                             'train.threads=1', f'train.cache_dir={out}/cache'])\n"
        "trained = train(cfg, Path(data), Path(out) / 'run', model=model)\n"
        "print('ATTN', trained.model.get_base_model().config._attn_implementation)\n"
        "print('IMPORTED', sorted(m for m in ('bitsandbytes', 'flash_attn') if m in sys.modules))\n"
    )
    out = _run(code, str(data), str(model), str(tmp_path / "out"), pythonpath=[REPO])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ATTN imitate_packed" in out.stdout
    assert "IMPORTED []" in out.stdout


# ---------------------------------------------------------------------------------------------- in the recipe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    from train_fixtures import synthetic_records, tiny_model_dir

    from imitate.records import write_jsonl

    root = tmp_path_factory.mktemp("options")
    data = root / "data.jsonl"
    write_jsonl(data, synthetic_records(6))
    return data, tiny_model_dir(root / "model")


def _train(tmp_path: Path, tiny_run: tuple[Path, Path], *overrides: str):
    from imitate.train.recipe import train

    data, model = tiny_run
    base = ["train.max_steps=1", "train.grad_accum=1", "train.eval_fraction=0", "train.threads=1"]
    cfg = load_config(overrides=[*base, f"train.cache_dir={tmp_path / 'cache'}", *overrides])
    return train(cfg, data, tmp_path / "run", model=str(model))


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")
def test_train_refuses_quantization_before_training(tmp_path: Path, tiny_run):
    with pytest.raises(TrainError, match="train.quantization=4bit needs a CUDA GPU"):
        _train(tmp_path, tiny_run, "train.quantization=4bit")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.integration
def test_train_uses_the_chosen_attention_when_packing(tmp_path: Path, tiny_run):
    trained = _train(tmp_path, tiny_run, "train.attn_implementation=eager")
    assert trained.model.get_base_model().config._attn_implementation == "eager"


def test_a_checkpoint_older_than_a_new_setting_resumes_when_the_setting_is_at_its_default():
    """Checkpoints written before `quantization` / `attn_implementation` existed lack those keys: they stand for
    the defaults, so resuming with defaults works and resuming with another value is refused."""
    from imitate.train import checkpoint

    current = checkpoint.resume_key(TrainConfig())
    older = {k: v for k, v in current.items() if k not in ("quantization", "attn_implementation")}
    checkpoint.check_compatible({"data_hash": "h", "resume_key": older}, "h", current)
    changed = checkpoint.resume_key(TrainConfig(attn_implementation="eager"))
    with pytest.raises(TrainError, match="different train settings: attn_implementation$"):
        checkpoint.check_compatible({"data_hash": "h", "resume_key": older}, "h", changed)


def test_peft_model_keeps_pefts_deprecation_noise_out_of_user_output():
    """peft 0.21 + transformers 5 warn through get_peft_model; `peft_model` (recipe and merge) must not. (Whether
    peft itself still warns is not ours to pin: a peft that stops warning must not fail this test.)"""
    import warnings

    from peft import LoraConfig
    from train_fixtures import tiny_llama

    from imitate.train.model import peft_model

    def future_warnings(wrap) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            wrap(tiny_llama(seed=1), LoraConfig(r=2, target_modules="all-linear"))
        return [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]

    assert not any("is_gradient_checkpointing" in m for m in future_warnings(peft_model))
