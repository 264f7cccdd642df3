#!/usr/bin/env bash
# make demo — the whole mission offline, with real model text, on a laptop CPU:
#   imitate serve (SmolLM2-135M-Instruct as the local teacher) → harvest with Orca system messages → curate
#   → LoRA-train the SmolLM2-135M student → evaluate student vs base (benchmarks + the local teacher as judge)
#   → export the dataset with its provenance card → a summary with paths and numbers.
# Every stage is a plain `imitate ...` command (the README shows them). A second `make demo` resumes: the harvest
# journal skips answered rows, and finished stages (training, evaluation) are reused.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL="${IMITATE_MODEL_DIR:-$HOME/.cache/imitate/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT=data/runs/demo
CONFIG=data/samples/demo.config.yaml
START=$(date +%s)
mkdir -p "$OUT"
stage() { printf '\n== [%4ss] %s\n' "$(($(date +%s) - START))" "$*"; }

stage "1. imitate serve: SmolLM2-135M-Instruct as an OpenAI-compatible teacher on 127.0.0.1 (continuous batching)"
PORT=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
imitate serve "$MODEL" --port "$PORT" --model-name smollm2 > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
python - "$PORT" "$SERVER" <<'PY'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
for _ in range(600):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
        print(f"teacher up: http://127.0.0.1:{port}/v1 (model smollm2)"); break
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit("imitate serve exited: see data/runs/demo/serve.log")
        time.sleep(0.5)
else:
    sys.exit("imitate serve did not answer within 5 minutes: see data/runs/demo/serve.log")
PY
TEACHER="http://127.0.0.1:$PORT/v1"

stage "2. harvest the 24 sample queries with Orca system messages (journaled: a rerun asks nothing twice)"
imitate harvest data/samples/queries.jsonl --out "$OUT/harvest" --config "$CONFIG" --base-url "$TEACHER"

stage "3. curate: failed, truncated, refusals, empty, exact and near duplicates out (reasons in dropped.jsonl)"
imitate curate "$OUT/harvest" --out "$OUT/curated"

stage "4. LoRA-train the SmolLM2-135M student on the curated rows (CPU)"
if [ -f "$OUT/student/summary.json" ]; then
  echo "trained already: $OUT/student/adapter (remove $OUT/student to train again)"
else
  RESUME=()
  [ -d "$OUT/student/checkpoints" ] && RESUME=(--set train.resume=latest)
  imitate train "$OUT/curated" --out "$OUT/student" --config "$CONFIG" "${RESUME[@]}" 2>&1 \
    | grep -v "de-quantizing GGUF"
fi

stage "5. evaluate student vs base: 100 multiple-choice questions (log-likelihood), 50 arithmetic problems (exact match)"
if [ -f "$OUT/eval/.bench-done" ]; then
  echo "evaluated already: $OUT/eval/report.md"
else
  imitate eval bench --model "$MODEL" --adapter "$OUT/student/adapter" \
    --data data/eval/general_mc.jsonl --data data/eval/arithmetic.jsonl \
    --train-data "$OUT/curated" --max-new-tokens 160 --batch-size 16 --out "$OUT/eval"
  touch "$OUT/eval/.bench-done"
fi

stage "6. judge student vs base with the local teacher (pairwise, both orders; answers cached, verdicts journaled)"
# A 135M judge rambles on past its verdict: its replies are capped at 48 tokens and re-asked once at most; the
# server's port changes from run to run, the identity keeps the verdicts' journal keys (a rerun re-asks nothing).
imitate eval judge --model "$MODEL" --adapter "$OUT/student/adapter" --questions data/eval/judge_questions.jsonl \
  --limit 6 --max-new-tokens 96 --mode pairwise --judge-base-url "$TEACHER" --judge-model smollm2 \
  --judge-max-tokens 48 --max-reasks 1 --set harvest.teachers.0.identity=http://127.0.0.1:8000/v1 --out "$OUT/eval"

stage "7. export the curated dataset (Parquet + provenance card), loadable with datasets.load_dataset"
imitate export "$OUT/curated" --out "$OUT/dataset" --licence apache-2.0 --name "imitate demo (SmolLM2 teacher)"

stage "8. summary"
python - "$OUT" "$START" <<'PY'
import json, sys, time
from pathlib import Path
out, start = Path(sys.argv[1]), int(sys.argv[2])
h = json.loads((out / "harvest" / "manifest.json").read_text())
c = json.loads((out / "curated" / "manifest.json").read_text())
t = json.loads((out / "student" / "summary.json").read_text())
r = json.loads((out / "eval" / "report.json").read_text())
print(f"harvest  {h['totals']['ok']} answered by the local teacher -> {out / 'harvest'}")
print(f"curate   kept {c['output']['kept']}, dropped {c['output']['dropped_rows']} -> {out / 'curated'}")
print(f"train    {t['steps']} steps, final loss {t['final_loss']:.3f} -> {out / 'student' / 'adapter'}")
for name, b in r.get("benchmarks", {}).items():
    accs = ", ".join(f"{label} {100 * v['accuracy']:.1f}%" for label, v in b["results"].items() if v.get("accuracy") is not None)
    diff = (b.get("paired") or {}).get("diff")
    print(f"eval     {name}: {accs}" + (f" (student - base {100 * diff:+.1f} points)" if diff is not None else ""))
for name, t3 in r.get("sections", {}).get("judge", {}).get("data", {}).get("summary", {}).get("pairwise", {}).items():
    print(f"judge    {name}: win {t3['win']}, tie {t3['tie']}, loss {t3['loss']}, unreadable verdicts {t3['unparsed']}"
          + (" (a 135M judge seldom writes one: point --judge-base-url at a strong model)" if t3["unparsed"] else ""))
print(f"report   {out / 'eval' / 'report.md'} (plots beside it)")
print(f"dataset  {out / 'dataset'} (README.md is the card)")
print(f"done in {int(time.time()) - start} s")
PY
