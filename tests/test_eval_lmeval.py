"""`imitate eval lm-eval`: the harness runs offline on local task YAMLs (a JSONL file, `dataset_path: json`) with a
tiny random model and a random LoRA adapter; its numbers land in report.json, equal to log-likelihoods computed
here directly, for the student (base + adapter) and the base; the CLI never imports lm_eval for --help.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import smol_tokenizer, tiny_llama, tiny_model_dir

from imitate.evaluate.lmeval import fold, headline, paired_items, parse_tasks, task_metrics, top_level
from imitate.evaluate.report import Report

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    ("What is two plus two?", ["three", "four", "five", "twenty-two"], 1),
    ("Which of these is a colour?", ["red", "dog", "run", "seven"], 0),
    ("Where does the sun rise?", ["west", "north", "east", "south"], 2),
    ("Which animal barks?", ["cat", "fish", "bird", "dog"], 3),
    ("What do bees make?", ["milk", "honey", "silk", "wax paper"], 1),
    ("Which number is even?", ["seven", "nine", "eight", "eleven"], 2),
    ("What falls from clouds?", ["rain", "sand", "stone", "light"], 0),
]
# What the network-free run is allowed: no Hub, no datasets/evaluate downloads, and any HTTP attempt goes nowhere.
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_ENDPOINT": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "no_proxy": "",
}


def _mc_task(folder: Path, name: str, rows: list[tuple[str, list[str], int]]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def _tasks(folder: Path) -> Path:
    """Two MC tasks in a group (accuracy weighted by size, as mmlu) and a generated-answer task."""
    folder.mkdir()
    _mc_task(folder, "tiny_mc_a", QUESTIONS[:4])
    _mc_task(folder, "tiny_mc_b", QUESTIONS[4:])
    (folder / "tiny_group.yaml").write_text(
        "group: tiny_group\ntask:\n  - tiny_mc_a\n  - tiny_mc_b\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
    )
    data = folder / "tiny_gen.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} plus {i}?", "answer": str(2 * i)}) + "\n" for i in range(3)))
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\n'
        "doc_to_target: answer\n"
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def _adapter(base_dir: Path, dest: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights on the tiny base, saved as `imitate train` leaves one."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(dest)
    smol_tokenizer().save_pretrained(dest)
    (dest / "imitate.json").write_text(json.dumps({"base_model": str(base_dir)}))
    return dest


def _expected(model, rows: list[tuple[str, list[str], int]]) -> list[bool]:
    """Per item: does the summed log-likelihood of " " + choice after the prompt pick the answer?"""
    import torch

    tok = smol_tokenizer()
    right = []
    with torch.inference_mode():
        for question, choices, answer in rows:
            context = f"Question: {question}\nAnswer:"
            n_ctx = len(tok.encode(context))
            scores = []
            for choice in choices:
                ids = tok.encode(context + " " + choice)
                logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
                scores.append(sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids))))
            right.append(max(range(len(choices)), key=scores.__getitem__) == answer)
    return right


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lmeval")
    base_dir = tiny_model_dir(root / "base")
    adapter = _adapter(base_dir, root / "adapter")
    tasks = _tasks(root / "tasks")
    out = root / "report"
    cmd = [sys.executable, "-m", "imitate.cli", "eval", "lm-eval", "--model", str(base_dir), "--adapter", str(adapter)]
    cmd += ["--tasks", "tiny_group,tiny_gen", "--include-path", str(tasks), "--batch-size", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **OFFLINE}, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout, "base": base_dir, "adapter": adapter}


def test_harness_numbers_land_in_the_report_for_student_and_base(run):
    from imitate.evaluate.generate import load_student

    report = json.loads((run["out"] / "report.json").read_text())
    assert report["models"]["student"] == {"model": str(run["base"]), "adapter": str(run["adapter"])}
    group = report["benchmarks"]["lm-eval/tiny_group"]
    expected = {
        "student": _expected(load_student(str(run["base"]), run["adapter"]).model, QUESTIONS),
        "base": _expected(load_student(str(run["base"])).model, QUESTIONS),
    }
    assert expected["student"] != expected["base"]  # the adapter changes answers, so the labels cannot be swapped
    for label, right in expected.items():
        result = group["results"][label]
        assert result["metric"] == "acc,none"
        assert (result["n"], result["correct"]) == (len(QUESTIONS), sum(right))
        assert result["accuracy"] == pytest.approx(sum(right) / len(QUESTIONS))
        assert result["stderr"] > 0 and result["ci95"][0] <= result["accuracy"] <= result["ci95"][1]
    s, b = expected["student"], expected["base"]
    assert group["paired"]["student_only"] == sum(x and not y for x, y in zip(s, b, strict=True))
    assert group["paired"]["base_only"] == sum(y and not x for x, y in zip(s, b, strict=True))
    gen = report["benchmarks"]["lm-eval/tiny_gen"]
    assert gen["results"]["student"]["metric"] == "exact_match,none" and gen["results"]["base"]["n"] == 3
    # Every metric of every task (group, its members, the generated task) is in the lm-eval section.
    section = report["sections"]["lm-eval"]
    assert {"tiny_group", "tiny_mc_a", "tiny_mc_b", "tiny_gen"} <= set(section["data"]["models"]["base"]["results"])
    assert "| tiny_mc_a | acc,none |" in section["markdown"]
    md = (run["out"] / "report.md").read_text()
    assert "lm-eval/tiny_group" in md and "## lm-eval" in md
    items = [json.loads(x) for x in (run["out"] / "lm-eval" / "student-items.jsonl").read_text().splitlines()]
    by_task = {t: [i["acc"] == 1.0 for i in items if i["task"] == t] for t in ("tiny_mc_a", "tiny_mc_b")}
    assert by_task["tiny_mc_a"] + by_task["tiny_mc_b"] == s
    assert "lm-eval/tiny_group (acc,none): student" in run["stdout"]


def test_a_second_eval_keeps_the_first_ones_numbers(run, tmp_path):
    report = Report.open(run["out"])
    report.add_benchmark("general_mc", kind="multiple_choice", results={"student": {"accuracy": 0.5, "n": 2}})
    report.save()
    again = Report.open(run["out"])
    assert {"general_mc", "lm-eval/tiny_group", "lm-eval/tiny_gen"} <= set(again.data["benchmarks"])


def test_unknown_task_is_one_line_before_any_model_loads(tmp_path):
    tasks = _tasks(tmp_path / "tasks")
    cmd = [sys.executable, "-m", "imitate.cli", "eval", "lm-eval", "--model", str(tmp_path / "no-such-model")]
    cmd += ["--tasks", "tiny_mc_a,no_such_task", "--include-path", str(tasks), "--out", str(tmp_path / "r")]
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=200)
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines()[-1].startswith("error: InputError: unknown lm-eval task(s): no_such_task")
    assert not (tmp_path / "r").exists()


def test_help_does_not_import_the_harness():
    code = (
        "import sys; from imitate.cli import main; main(['eval', '--help']); main(['eval', 'lm-eval', '--help']); "
        "print('HEAVY', sorted(m for m in ('lm_eval', 'torch', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    assert "lm-eval" in out.stdout and "--include-path" in out.stdout


# ---------------------------------------------------------------------------------------------- pure folding


def _raw(per_doc: dict[str, list[int]], weighted: bool = True) -> dict:
    """A harness result: a group `g` of tasks with 0/1 `acc` per doc (mean over docs, or over tasks if not
    `weighted`)."""
    results, samples = {}, {}
    for task, values in per_doc.items():
        mean = sum(values) / len(values)
        results[task] = {"alias": task, "acc,none": mean, "acc_stderr,none": 0.1}
        samples[task] = [{"doc_id": i, "filter": "none", "acc": float(v)} for i, v in enumerate(values)]
    means = [r["acc,none"] for r in results.values()]
    pooled = sum(map(sum, per_doc.values())) / sum(map(len, per_doc.values()))
    results["g"] = {"alias": "g", "acc,none": pooled if weighted else sum(means) / len(means), "acc_stderr,none": "N/A"}
    return {
        "results": results,
        "samples": samples,
        "group_subtasks": {"g": list(per_doc)},
        "n-samples": {t: {"original": len(v), "effective": len(v)} for t, v in per_doc.items()},
        "lm_eval_version": "0.4.x",
    }


def test_fold_pairs_items_across_a_groups_tasks(tmp_path):
    student = _raw({"a": [1, 1, 0], "b": [1, 0]})
    base = _raw({"a": [0, 1, 0], "b": [0, 1]})
    assert top_level(student) == ["g"]
    report = Report.open(tmp_path)
    assert fold(report, {"student": student, "base": base}) == ["lm-eval/g"]
    g = report.data["benchmarks"]["lm-eval/g"]
    assert (g["results"]["student"]["correct"], g["results"]["student"]["n"]) == (3, 5)
    assert g["results"]["student"]["ci95"] == [0.6, 0.6]  # the harness gave no stderr: no interval invented
    assert (g["paired"]["student_only"], g["paired"]["base_only"], g["paired"]["both"]) == (2, 1, 1)


def test_no_paired_difference_when_the_group_mean_is_not_the_item_mean():
    student = _raw({"a": [1, 1, 0], "b": [1, 0]}, weighted=False)
    base = _raw({"a": [0, 1, 0], "b": [0, 1]}, weighted=False)
    assert paired_items(student, base, "g") is None
    assert paired_items(student, base, "a") is not None


def test_headline_metric_and_task_parsing():
    metrics = task_metrics(
        {"alias": "gsm8k", "exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01,
         "exact_match,flexible-extract": 0.2, "exact_match_stderr,flexible-extract": "N/A"}
    )  # fmt: skip
    assert [m.key for m in metrics] == ["exact_match,strict-match", "exact_match,flexible-extract"]
    assert headline(metrics).key == "exact_match,strict-match" and metrics[1].stderr is None
    assert parse_tasks(["mmlu, gsm8k", "mmlu", "arc_easy"]) == ["mmlu", "gsm8k", "arc_easy"]
