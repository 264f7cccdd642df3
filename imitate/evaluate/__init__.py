"""The evaluate stage: the student beside its base on benchmarks with right answers, judged answers, best-of-n.

Modules:

- `data`           eval set readers: MMLU, ARC, GSM8K shapes and a column mapping; bad rows are one line
- `generate`       load a student (base + adapter, merged folder, GGUF) and its base; batched chat generation
- `scoring`        multiple choice by log-likelihood, the shared prompt run once per question
- `extract`        final-number / choice-letter / regex extraction from generated answers
- `stats`          accuracy with a Wilson interval, paired student − base difference (McNemar, bootstrap)
- `contamination`  13-gram overlap of eval items with the training records
- `report`         report.md + report.json that every eval command folds its numbers into
- `bench`          `imitate eval bench`
- `judge`          judge prompts (`prompts/judge.yaml`), verdict parsing, the both-orders rule, win/tie/loss tables
- `judging`        judge calls through the harvester engine: unreadable verdicts re-asked, resume, budget
- `judge_eval`     `imitate eval judge`: local answers, judging, outputs (`judge_report`: tables, section, chart)
- `answers`        per-prompt journals of local answers and scores (a rerun skips them), model fingerprints
- `bestofn`        `imitate generate best-of-n`: rejection sampling (`reward`: reward-model scores)

Importing this package imports nothing heavy: torch and transformers load inside the model-running functions.
"""
