#!/usr/bin/env bash
# make demo — the offline end-to-end demo: fake teacher → harvest (Orca presets, live view) → status → records
# → curate → export with a provenance card → LoRA-train the student on the curated rows.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
PORT=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
OUT=data/runs/demo
rm -rf "$OUT"

echo "== 1. a loopback OpenAI-compatible teacher on port $PORT (600 RPM, 5% 429s and 10% 500s injected)"
imitate fake-teacher --port "$PORT" --rpm 600 --tpm 200000 --latency 0.15 --faults 500=0.1,429=0.05 --seed 3 &
FAKE=$!
trap 'kill $FAKE 2>/dev/null || true' EXIT
python - "$PORT" <<'PY'
import socket, sys, time
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.2).close(); break
    except OSError:
        time.sleep(0.1)
PY

echo "== 2. harvest the sample queries with Orca system messages chosen per collection"
imitate harvest data/samples/queries.jsonl --out "$OUT" --config data/samples/demo.config.yaml \
  --base-url "http://127.0.0.1:$PORT/v1"

echo "== 3. rerun the same command: everything is journaled, nothing is paid twice"
imitate harvest data/samples/queries.jsonl --out "$OUT" --config data/samples/demo.config.yaml \
  --base-url "http://127.0.0.1:$PORT/v1" --quiet

echo "== 4. status"
imitate status "$OUT"

echo "== 5. three harvested records"
python - "$OUT" <<'PY'
import sys, pathlib
from imitate.records import read_jsonl
out = pathlib.Path(sys.argv[1])
rows = [r for shard in sorted(out.glob("shard-*.jsonl")) for r in read_jsonl(shard)]
for r in rows[:3]:
    p = r.provenance
    print(f"--- {r.id}  [{r.query.collection}] system={p.system_prompt_id} attempts={p.attempts} "
          f"tokens={p.usage.total_tokens} cost=${p.cost_usd:.6f}")
    print("Q:", r.query.question)
    print("A:", (r.response or "")[:300])
PY

echo "== 6. curate: failed, truncated, refusals, too short, exact and near duplicates out; reasons in dropped.jsonl"
imitate curate "$OUT" --out data/runs/demo-curated --min-words 5

echo "== 7. export the curated rows as Parquet with a dataset card that records their provenance"
imitate export data/runs/demo-curated --out data/runs/demo-dataset --licence apache-2.0
python - <<'PY'
from datasets import load_dataset
ds = load_dataset("data/runs/demo-dataset")
print(f"load_dataset('data/runs/demo-dataset'): {ds}")
PY

echo "== 8. LoRA-train the SmolLM2-135M student on the curated rows for a few steps (CPU)"
rm -rf data/runs/demo-student
imitate train data/runs/demo-curated --out data/runs/demo-student --set train.max_steps=2 --set train.grad_accum=1 \
  --set train.eval_fraction=0 2>&1 | grep -v "de-quantizing GGUF"
