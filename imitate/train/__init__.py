"""The train stage: records → masked token sequences → LoRA-tuned student (`imitate train`, `merge`, `chat`).

Modules, in the order data flows through them:

- `data`      read records (harvest dir, dataset folder, JSONL/Parquet), stage selection, eval split, data hash
- `tokenize`  the one mask function: chat template → `input_ids` + `labels`, refusals, over-length policy
- `pack`      packing with restarting `position_ids`, length-grouped padded batches, pad fraction
- `model`     load the student (HF folder, GGUF → plain float model, or a Hub name) and its tokenizer
- `loss`      cross-entropy computed only at supervised positions, chunked, never materialising all logits
- `recipe`    the training loop, read top to bottom (STYLE.md §8)
- `merge`     adapter → full model, with a self-check; `chat` quick generation
- `commands`  the plain functions the CLI calls

Importing this package imports nothing heavy: torch, transformers and peft load inside the modules above,
which the CLI imports only inside its command functions.
"""
