"""The serving engine: one thread owns the model and decodes requests in batches.

Requests queue up; the engine takes what is waiting (up to ``max_batch``, after a short
window so that near-simultaneous requests share a batch) and decodes them together with
``stream_generate_batch``. Rows leave the batch when they finish; requests that arrive while
a batch runs wait for the next one (static batching, not continuous batching). Events go back
to each request through its own callback, called on the engine thread. A request whose
``cancel`` event is set (its client went away) is dropped if it has not started, or ends at
its batch's next round; ``rows_cancelled`` counts both.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..drafters.base import Drafter
from ..runtime.decode import DecodeOptions, GenerationConfig, GenerationResult, stream_generate_batch
from ..targets.hf import Target

log = logging.getLogger("prism_spec.serve")


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    config: GenerationConfig
    #: Called on the engine thread with ("tokens", list[int]), then ("done", GenerationResult)
    #: or ("error", Exception).
    on_event: Callable[[str, object], None]
    cancel: threading.Event = field(default_factory=threading.Event)


class BatchingEngine:
    def __init__(
        self, target: Target, drafter: Drafter | None, max_batch: int = 8, batch_window_s: float = 0.01,
        options: DecodeOptions | None = None,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if drafter is not None and not drafter.supports_batches:
            max_batch = 1  # this drafter drafts for one sequence at a time
        self.target, self.drafter = target, drafter
        self.options = options or DecodeOptions()  # tree shape and cache mode of every batch
        self.max_batch, self.batch_window_s = max_batch, batch_window_s
        self._queue: queue.Queue[EngineRequest] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Written by the engine thread only; read by anyone (/health, tests).
        self.batches_run = 0
        self.largest_batch = 0
        self.rows_cancelled = 0

    def start(self) -> "BatchingEngine":
        self._thread = threading.Thread(target=self._loop, name="prism-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: EngineRequest) -> None:
        if self._stop.is_set():
            raise RuntimeError("the engine is stopped")
        self._queue.put(request)

    def _take_batch(self) -> list[EngineRequest]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        live = [r for r in batch if not r.cancel.is_set()]
        self.rows_cancelled += len(batch) - len(live)
        return live

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            if batch:
                self._run(batch)

    def _run(self, batch: list[EngineRequest]) -> None:
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        configs = []
        for request in batch:
            config = request.config
            config.cancelled = request.cancel.is_set
            configs.append(config)
        streamed: set[int] = set()  # rows that have had tokens delivered
        try:
            for item in stream_generate_batch(self.target, [r.prompt_ids for r in batch], self.drafter, configs,
                                              self.options):
                if isinstance(item, list):
                    for request, result in zip(batch, item):
                        self.rows_cancelled += result.finish_reason == "cancelled"
                        _deliver(request, "done", result)
                else:
                    row, tokens = item
                    streamed.add(row)
                    _deliver(batch[row], "tokens", tokens)
        except Exception as exc:  # a failed batch must not take the engine down
            log.exception("batch of %d failed", len(batch))
            if len(batch) == 1:
                _deliver(batch[0], "error", exc)
                return
            # One row's failure must end only that row: the rows that have seen no token yet
            # are decoded again, each alone; a row already streaming cannot restart unseen.
            for row, request in enumerate(batch):
                if row in streamed:
                    _deliver(request, "error", exc)
            for row, request in enumerate(batch):
                if row in streamed:
                    continue
                if request.cancel.is_set():  # its client is gone: nobody waits for a retry
                    self.rows_cancelled += 1
                else:
                    self._run([request])


def _deliver(request: EngineRequest, kind: str, payload) -> None:
    try:
        request.on_event(kind, payload)
    except Exception:  # a broken client callback only affects that client
        log.exception("request callback failed")
        request.cancel.set()


__all__ = ["BatchingEngine", "EngineRequest", "GenerationResult"]
