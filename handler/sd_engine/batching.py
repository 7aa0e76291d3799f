"""Micro-batching for fronts that have no batcher of their own (KServe's model server; TorchServe batches itself).

Requests submitted from many threads or asyncio tasks within `max_delay_s` of the first waiting one are handed to
Engine.generate together, until they hold `max_images` images: the oldest waiting one and the later ones with its
shape key (size, steps, guidance, LoRA adapters); the others wait, in order, for the next call (run()). The engine
then runs them in pipeline calls of at most its batch size. One thread owns the engine, so pipeline calls never
overlap on the GPU (one engine per GPU process): a worker thread the batcher starts, or the caller's own thread in
run() (start=False). A front
whose engine may run on the CPU should run it on the main thread: PyTorch's CPU kernels measured 2-9x slower called
from another thread here (libgomp, 2 cores). Every submission gets its own results, in order: a failing group fails
only its own requests (the engine's rule), an unexpected exception fails only the batch it happened in, and the
worker goes on.

close() stops taking submissions, finishes those already queued, then stops the worker: a front calls it on SIGTERM
(a scale-down) so nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

from .errors import EngineError, GenerationError
from .requests import GenerationRequest

logger = logging.getLogger(__name__)


class BatcherClosed(EngineError):
    """The server is shutting down and takes no new requests."""

    status = 503


class QueueFull(EngineError):
    """More submissions wait than the queue holds (TorchServe's jobQueueSize); the client should retry later."""

    status = 503


@dataclass
class _Job:
    requests: list[GenerationRequest]
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class Batch:
    """What the worker handed to the engine in one go, for metrics."""

    images: int
    submissions: int
    queue_seconds: list[float]  # per submission: from submit() to the start of its engine call


def _key(job: _Job) -> tuple:
    """What a submission is grouped by: its first request's shape key (a submission's images share their settings,
    except where a v2 request gives each image its own adapters: the engine then splits the call)."""
    return job.requests[0].shape_key if job.requests else ()


class Batcher:
    def __init__(self, engine, max_images: int, max_delay_s: float, on_batch=None, start: bool = True,
                 max_queued: int = 0):
        if max_images < 1 or max_delay_s < 0:
            raise ValueError(f"max_images must be >= 1 and max_delay_s >= 0, got {max_images}, {max_delay_s}")
        self.engine = engine
        self.max_images = max_images
        self.max_delay_s = max_delay_s
        self.on_batch = on_batch  # called with a Batch before each engine call (metrics); must not raise
        self.max_queued = max_queued  # submissions waiting at most; 0: no bound
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._held = 0  # submissions the worker took from the queue but holds back for a later call (run())
        self._worker = threading.Thread(target=self.run, name="sd-batcher", daemon=True) if start else None
        if self._worker is not None:
            self._worker.start()

    def submit(self, requests: Sequence[GenerationRequest]) -> Future:
        """Queue one submission (one or more images); its Future gives one result or EngineError per request."""
        with self._lock:  # so that nothing is queued after close()'s end marker
            if self._closed:
                raise BatcherClosed("the server is shutting down and takes no new requests")
            waiting = self._queue.qsize() + self._held
            if self.max_queued and waiting >= self.max_queued:
                raise QueueFull(f"{waiting} requests are waiting already; try again later")
            job = _Job(list(requests))
            self._queue.put(job)
        return job.future

    async def generate(self, requests: Sequence[GenerationRequest]) -> list:
        """submit() for asyncio fronts: the event loop stays free while the GPU works."""
        return await asyncio.wrap_future(self.submit(requests))

    def close(self, timeout: float | None = None) -> None:
        """Take no more submissions, finish the queued ones, stop the worker (run() returns)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout)

    def run(self) -> None:
        """The worker loop: the batcher's own thread runs it, or with start=False the caller, until close().

        Each engine call takes the oldest waiting submission and, up to `max_images`, the later ones with the same
        shape key (size, steps, guidance, LoRA adapter set), so that requests spread over several adapters still
        make full batches: a batch of 8 mixing 4 adapters would run as 4 pipeline calls of 2 (measured on an H200,
        SD 1.5: 81% of the images/s of one adapter). Submissions with other keys stay held, in order, for the next
        calls; the oldest always goes first, so none waits behind a busier key for long."""
        held: deque[_Job] = deque()  # taken from the queue, not yet given to the engine, oldest first
        stopping = False
        while held or not stopping:
            if held:
                deadline = time.monotonic()  # held submissions have had their wait: take only what is queued now
            else:
                job = self._queue.get()
                if job is None:
                    break
                held.append(job)
                self._held = len(held)
                deadline = time.monotonic() + self.max_delay_s
            key = _key(held[0])
            while not stopping and sum(len(j.requests) for j in held if _key(j) == key) < self.max_images:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:  # close(): finish what is held, then stop
                    stopping = True
                else:
                    held.append(more)
                    self._held = len(held)  # still waiting: max_queued counts it
            batch, images = [], 0
            for job in list(held):
                if _key(job) == key and (not batch or images + len(job.requests) <= self.max_images):
                    held.remove(job)
                    if job.future.set_running_or_notify_cancel():  # False: its client gave up while it waited
                        batch.append(job)
                        images += len(job.requests)
            self._held = len(held)
            if batch:
                self._process(batch)

    def _process(self, batch: list[_Job]) -> None:
        requests = [request for job in batch for request in job.requests]
        started = time.perf_counter()
        if self.on_batch is not None:
            try:
                self.on_batch(Batch(len(requests), len(batch), [started - job.queued_at for job in batch]))
            except Exception:  # noqa: BLE001 - metrics must never cost a request
                logger.exception("on_batch failed")
        results: list = [GenerationError("generation failed; see the server log")] * len(requests)
        try:
            results = self.engine.generate(requests)
        except Exception:  # noqa: BLE001 - the engine answers per group; this is the last guard for the batch
            logger.exception("unexpected engine failure for a batch of %d", len(requests))
        finally:  # every taken submission is answered, whatever happened
            for job in batch:
                own, results = results[:len(job.requests)], results[len(job.requests):]
                job.future.set_result(own)
