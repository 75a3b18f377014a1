"""Recording a sample of served inputs (``parm serve --record-inputs DIR``), for training parity
models on real traffic without labels (``parm train-parity --inputs DIR``).

The serving path only draws which rows to keep and hands a copy of them to a queue (a few
microseconds per request); a writer thread gathers them into ``.npy`` files of float32 model
inputs (N, *query_shape), written atomically (temporary file, then rename) and named
``inputs-<UTC time>-<sequence>.npy`` so that name order is time order. After each file the oldest
files in the folder are deleted until the folder's ``inputs-*.npy`` files fit ``max_bytes``:
disk use is bounded however long the server runs. If the writer falls behind (a slow disk), new
samples are dropped and counted rather than held in memory.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from parm.errors import ConfigError

log = logging.getLogger(__name__)

PATTERN = "inputs-*.npy"
QUEUE_BATCHES = 1024  # requests' samples waiting for the writer before new ones are dropped


@dataclass(frozen=True)
class RecordSpec:
    """Where and how much to record: ``fraction`` of served inputs (each row kept with that
    probability), at most ``max_bytes`` of files in ``directory``, files of up to ``rows_per_file``
    rows written at least every ``flush_s`` seconds while inputs arrive."""

    directory: Path
    fraction: float = 0.01
    max_bytes: int = 1 << 30
    rows_per_file: int = 4096
    flush_s: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--record-fraction must be in (0, 1]; got {self.fraction}", field="record_fraction",
                              value=self.fraction)
        if self.max_bytes <= 0 or self.rows_per_file <= 0 or self.flush_s <= 0:
            raise ConfigError(f"--record-max-bytes must be > 0; got {self.max_bytes}", field="record_max_bytes",
                              value=self.max_bytes)


class InputRecorder:
    """See module docstring. ``offer`` is called on the serving loop; ``close`` writes what is left."""

    def __init__(self, spec: RecordSpec, *, seed: int | None = None) -> None:
        self.spec = spec
        spec.directory.mkdir(parents=True, exist_ok=True)
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=QUEUE_BATCHES)
        self.recorded = 0  # rows written to files
        self.dropped = 0  # rows sampled but dropped because the writer was behind
        self.files_deleted = 0
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="parm-input-recorder", daemon=True)
        self._thread.start()

    def offer(self, queries: torch.Tensor) -> None:
        """Keep each row of ``queries`` (N, *S) with probability ``fraction`` (a copy)."""
        keep = self._rng.random(queries.shape[0]) < self.spec.fraction
        if not keep.any():
            return
        rows = queries.detach().cpu().numpy()[keep].astype(np.float32, copy=True)  # (n, *S)
        try:
            self._queue.put_nowait(rows)
        except queue.Full:
            self.dropped += len(rows)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write the rows still buffered, then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    # ---- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        pending: list[np.ndarray] = []
        rows, since = 0, time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=max(0.05, self.spec.flush_s - (time.monotonic() - since)))
            except queue.Empty:
                item = np.empty((0,), dtype=np.float32)  # a timeout: flush what there is
            if item is None:
                self._write(pending)
                return
            if item.size:
                pending.append(item)
                rows += len(item)
            if rows >= self.spec.rows_per_file or (pending and time.monotonic() - since >= self.spec.flush_s):
                self._write(pending)
                pending, rows, since = [], 0, time.monotonic()
            elif not pending:
                since = time.monotonic()

    def _write(self, parts: list[np.ndarray]) -> None:
        if not parts:
            return
        data = np.concatenate(parts)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        final = self.spec.directory / f"inputs-{stamp}-{os.getpid()}-{self._seq:06d}.npy"
        self._seq += 1
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, data)
            os.replace(tmp, final)
            self.recorded += len(data)
            self._trim()
        except OSError as exc:  # a full or read-only disk must not stop serving
            log.warning("could not record %d inputs to %s: %s", len(data), self.spec.directory, exc)
            tmp.unlink(missing_ok=True)

    def _trim(self) -> None:
        files = sorted(self.spec.directory.glob(PATTERN))
        sizes = [f.stat().st_size for f in files]
        total = sum(sizes)
        for path, size in zip(files, sizes):
            if total <= self.spec.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.files_deleted += 1
