"""imitate.dataset — the data stage: read and write the common instruction-tuning formats, curate, select,
generate (Self-Instruct), mix. Every module here works on `imitate.records.Record` and never imports torch,
transformers or peft (a test checks); `datasets` and tokenizers are imported lazily, only when used.

    formats.py    read/write openorca, sharegpt, alpaca, messages and imitate records (detect, round trips)
    convert.py    `imitate convert IN --to FORMAT --out PATH`
    io.py         rows from JSON/JSONL/CSV/Parquet files, save_to_disk folders and Hub datasets; `atomic_path`
    jsonarray.py  a JSON array streamed element by element, with line numbers
    writers.py    dict rows out to JSON/JSONL/CSV/Parquet, atomically
The other modules (curation, dedup, selection, Self-Instruct, ShareGPT import, mixing) say what they do at the top.
"""
