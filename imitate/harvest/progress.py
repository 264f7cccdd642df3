"""What a running harvest shows: a rich live view (a terminal), plain status lines (a log or pipe), JSON log lines
(`--json-log`), or nothing (`--quiet`).

Both pass through `redact_text`: a teacher name or limiter detail that carries a URL must not show its
credentials on a terminal or in a CI log.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from imitate.config import redact_text


def snapshot(collector: Any, total_hint: int | None) -> dict[str, Any]:
    s = collector.stats
    elapsed = max(1e-6, time.monotonic() - s.started)
    finished = s.ok + s.failed
    data: dict[str, Any] = {
        "done": s.ok,
        "failed": s.failed,
        "skipped_done": s.skipped_done,
        "total": total_hint,
        "requests": s.requests,
        "throttled_429": s.throttled,
        "retries": s.retries,
        "req_per_min": round(s.requests / elapsed * 60, 1),
        "rows_per_min": round(finished / elapsed * 60, 1),
        "tok_per_min": round(s.tokens / elapsed * 60, 1),
        "spend_usd": round(s.spend_usd, 6),
        "elapsed_s": round(elapsed, 1),
        "teachers": {},
    }
    if total_hint:
        left = max(0, total_hint - finished - s.skipped_done)
        rate = finished / elapsed
        data["eta_s"] = round(left / rate, 1) if rate > 0 else None
    for name, rt in collector.teachers.items():
        data["teachers"][name] = rt.snapshot()
    return data


def _table(data: dict[str, Any]) -> Table:
    t = Table(title="imitate harvest", title_justify="left", show_header=False, box=None)
    total = data["total"] if data["total"] is not None else "?"
    t.add_row("rows", f"{data['done']} done · {data['failed']} failed · {data['skipped_done']} resumed / {total}")
    t.add_row("rate", f"{data['req_per_min']:.0f} req/min · {data['tok_per_min']:.0f} tok/min")
    t.add_row("429s", f"{data['throttled_429']} ({data['retries']} retries)")
    t.add_row("spend", f"${data['spend_usd']:.4f}")
    eta = data.get("eta_s")
    t.add_row("elapsed", f"{data['elapsed_s']:.0f}s" + (f" · ETA {eta:.0f}s" if eta is not None else ""))
    for name, snap in data["teachers"].items():
        util = snap.get("utilisation")
        util_txt = f"{util * 100:.0f}% of limit" if isinstance(util, int | float) else "limit unknown"
        state = f"DOWN ({snap['dead']})" if snap.get("dead") else util_txt
        if replicas := snap.get("replicas"):  # a fleet: how many of its servers are in service
            state += f" · {sum(r['state'] == 'in' for r in replicas)}/{len(replicas)} replicas in"
        t.add_row(
            redact_text(f"teacher {name}"),
            f"{snap['ok']} ok · conc {snap.get('concurrency_limit', '?')} · in flight "
            f"{snap.get('in_flight', '?')} · {state}",
        )
    return t


def status_line(data: dict[str, Any]) -> str:
    """One plain line of a snapshot, for logs (stderr that is not a terminal)."""
    total = f"/{data['total']}" if data.get("total") else ""
    eta = f", eta {data['eta_s']:.0f} s" if data.get("eta_s") is not None else ""
    skipped = f" (+{data['skipped_done']} done before)" if data.get("skipped_done") else ""
    return (
        f"harvest {data['done']}{total} ok{skipped}, {data['failed']} failed · {data['requests']} requests, "
        f"{data['throttled_429']} throttled, {data['retries']} retries · {data['req_per_min']:.0f} req/min, "
        f"{data['tok_per_min']:.0f} tok/min · ${data['spend_usd']:.4f} · {data['elapsed_s']:.0f} s{eta}"
    )


class Progress:
    """mode: 'live' (rich view on a terminal), 'lines' (a plain status line every 10 s: stderr that is a log
    file or a pipe), 'json' (one JSON line per interval on stderr), 'quiet'."""

    def __init__(self, mode: str, collector: Any, total_hint: int | None, interval: float | None = None):
        self.mode = mode
        self.collector = collector
        self.total_hint = total_hint
        self.interval = interval or {"live": 0.5, "lines": 10.0}.get(mode, 5.0)
        self._live: Live | None = None

    def start(self) -> None:
        if self.mode == "live":
            self._live = Live(_table(self.data()), console=Console(stderr=True), refresh_per_second=4)
            self._live.start()

    def data(self) -> dict[str, Any]:
        return snapshot(self.collector, self.total_hint)

    def tick(self) -> None:
        if self.mode == "live" and self._live:
            self._live.update(_table(self.data()))
        elif self.mode == "json":
            sys.stderr.write(redact_text(json.dumps({"event": "progress", **self.data()})) + "\n")
            sys.stderr.flush()
        elif self.mode == "lines":
            sys.stderr.write(redact_text(status_line(self.data())) + "\n")
            sys.stderr.flush()

    def stop(self) -> None:
        if self._live:
            self._live.update(_table(self.data()))
            self._live.stop()
            self._live = None


def settings_summary(cfg: Any, out: Any) -> str:
    """The few lines a harvest prints at start (teachers, limits, preset, params, budget, output) instead of the
    whole resolved config, which is written to OUT/config.yaml (and printed by `--verbose`)."""
    from imitate.config import redact_url

    h = cfg.harvest

    def limit(name: str, value: Any) -> str:
        return f"{name} {value}" if value is not None else f"{name} from headers"

    lines = []
    for t in h.teachers:
        urls = [redact_url(u) for u in (t.base_urls or [t.base_url])]
        where = urls[0] if len(urls) == 1 else f"{urls[0]} (+{len(urls) - 1} replicas)"
        lines.append(
            f"teacher  {t.name}: {t.model} at {where} · {limit('rpm', t.rpm)}, {limit('tpm', t.tpm)}, "
            f"concurrency {t.max_concurrency}" + (" · fallback" if t.fallback else "")
        )
    p = h.params
    lines.append(
        f"prompts  preset {h.preset} · {h.samples_per_prompt} sample(s) per prompt · max_tokens {p.max_tokens}, "
        f"temperature {p.temperature} · mode {h.mode}"
    )
    b = h.budget
    caps = [f"${b.max_usd}" if b.max_usd else None, f"{b.max_tokens} tokens" if b.max_tokens else None]
    caps.append(f"{b.max_requests} requests" if b.max_requests else None)
    lines.append("budget   " + (", ".join(c for c in caps if c) or "none (set --max-usd to cap the spend)"))
    lines.append(f"output   {out} (resolved config in {out}/config.yaml; --verbose prints it)")
    return redact_text("\n".join(lines))
