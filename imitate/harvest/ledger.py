"""The attempt ledger: every request the teacher may bill, written down *before* it is sent.

`ledger.bin` in a harvest output directory is a sequence of fixed 40-byte entries, appended with one unbuffered
`write` each (in the kernel at once, so a kill -9 cannot lose one; fsynced with the journal):

    S  seq  est_usd  est_tokens  key    an attempt is about to be sent (its upper-bound estimate)
    B  seq  usd      tokens      key    that attempt was answered and billed (what the usage says)
    E  seq  0        0           key    that attempt ended without an answer (error status, no connection)

Budgets count from it, across every run of the same output: requests = every `S`; spend and tokens = every `B`
plus, for an attempt that was open when a run died (an `S` with no end), its estimate: the teacher may have
answered and billed it, so it is counted as if it had, at its upper bound. Keys open at a crash are remembered
for the rerun, which counts how many of them it really sends again (`resent_after_crash`).

The journal stores a checkpoint (offset, totals, attempts open at that moment) in its index at every flush, so a
resume replays only the tail written since; without a checkpoint (a new or rebuilt index) the whole file is read.
A torn last entry (a crash inside a 40-byte write) is cut off. Pure file I/O; no asyncio.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate.errors import StorageError

LEDGER = "ledger.bin"
ENTRY = struct.Struct("<c3xIQd16s")  # kind, tokens, seq, usd, request key (first 16 bytes)
SENT, BILLED, UNBILLED = b"S", b"B", b"E"


@dataclass
class Spent:
    """What the teacher may have billed: requests sent, and the spend/tokens of those answered (or open)."""

    requests: int = 0
    usd: float = 0.0
    tokens: int = 0


def storage_error(path: Path, exc: OSError) -> StorageError:
    """The one-line error for an output that cannot be written (disk full, read-only, too large)."""
    return StorageError(
        f"cannot write {path}: {exc.strerror or exc}",
        hint="what was written is valid; free space (or fix the permissions), then rerun the same command to resume",
    )


class Ledger:
    """The ledger of one output directory. `checkpoint` is what `checkpoint()` returned at the last flush."""

    def __init__(self, out_dir: Path, checkpoint: dict[str, Any] | None = None, *, readonly: bool = False):
        self.path = Path(out_dir) / LEDGER
        self.readonly = readonly
        self.spent = Spent()
        self.seq = 0
        self.open: dict[int, tuple[bytes, float, int]] = {}  # seq -> (key, est_usd, est_tokens)
        self.crashed: set[bytes] = set()  # keys of attempts open when the last run died
        self.existed = self.path.exists()
        offset = 0
        if checkpoint and self.existed:
            offset = int(checkpoint["offset"])
            self.spent = Spent(int(checkpoint["requests"]), float(checkpoint["usd"]), int(checkpoint["tokens"]))
            self.seq = int(checkpoint["seq"])
            self.open = {int(s): (bytes.fromhex(k), float(u), int(t)) for s, (k, u, t) in checkpoint["open"].items()}
        self._size = self._replay(offset) if self.existed else 0
        for key, est_usd, est_tokens in self.open.values():  # no end written: the run died with it in flight
            self.spent.usd += est_usd
            self.spent.tokens += est_tokens
            self.crashed.add(key)
        self.open.clear()
        self._fd: int | None = None
        if not readonly:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                raise storage_error(self.path, exc) from exc

    def _replay(self, offset: int) -> int:
        """Apply the entries from `offset` on; returns the size of the whole entries (a torn tail is cut)."""
        size = self.path.stat().st_size
        if offset > size:  # the file lost entries the checkpoint covered: read all of it again
            offset, self.spent, self.seq, self.open = 0, Spent(), 0, {}
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read()
        whole = len(data) - len(data) % ENTRY.size
        for kind, tokens, seq, usd, key in ENTRY.iter_unpack(data[:whole]):
            self.seq = max(self.seq, seq)
            if kind == SENT:
                self.spent.requests += 1
                self.open[seq] = (key, usd, tokens)
            elif kind == BILLED:
                self.spent.usd += usd
                self.spent.tokens += tokens
                self.open.pop(seq, None)
            else:
                self.open.pop(seq, None)
        end = offset + whole
        if end < size and not self.readonly:
            with open(self.path, "r+b") as f:
                f.truncate(end)
        return end

    # ------------------------------------------------------------------------------------------ writing

    def _write(self, kind: bytes, seq: int, usd: float, tokens: int, key: bytes) -> None:
        assert self._fd is not None, "read-only ledger"
        data = ENTRY.pack(kind, max(0, min(tokens, 2**32 - 1)), seq, usd, key)
        try:
            n = os.write(self._fd, data)
        except OSError as exc:
            os.ftruncate(self._fd, self._size)
            raise storage_error(self.path, exc) from exc
        if n != len(data):  # a short write on a full disk: cut it, so every entry stays whole
            os.ftruncate(self._fd, self._size)
            raise storage_error(self.path, OSError(28, "short write (disk full?)"))
        self._size += n

    def sent(self, key: str, est_usd: float, est_tokens: int) -> int:
        """Record an attempt about to be sent; returns its sequence number for `billed` / `unbilled`."""
        self.seq += 1
        raw = bytes.fromhex(key)[:16]
        self._write(SENT, self.seq, est_usd, est_tokens, raw)
        self.spent.requests += 1
        self.open[self.seq] = (raw, est_usd, est_tokens)
        return self.seq

    def billed(self, seq: int, usd: float, tokens: int) -> None:
        raw = self.open.pop(seq)[0]
        self.spent.usd += usd
        self.spent.tokens += tokens
        self._write(BILLED, seq, usd, tokens, raw)

    def unbilled(self, seq: int) -> None:
        raw = self.open.pop(seq)[0]
        self._write(UNBILLED, seq, 0.0, 0, raw)

    def was_open_at_crash(self, key: str) -> bool:
        """True once per key that the last run had in flight when it died (so a resend can be counted)."""
        raw = bytes.fromhex(key)[:16]
        if raw in self.crashed:
            self.crashed.discard(raw)
            return True
        return False

    # ------------------------------------------------------------------------------------------ durability

    def sync(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise storage_error(self.path, exc) from exc

    def checkpoint(self) -> dict[str, Any]:
        """The state at the end of what is written (call after `sync`): stored in the index at each flush. The
        totals exclude attempts open now; they are kept with their estimates and counted if the run dies."""
        return {
            "offset": self._size,
            "requests": self.spent.requests,
            "usd": self.spent.usd,
            "tokens": self.spent.tokens,
            "seq": self.seq,
            "open": {str(s): [k.hex(), u, t] for s, (k, u, t) in self.open.items()},
        }

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
