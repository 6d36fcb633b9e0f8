"""A bounded queue that batches concurrent segment requests into one forward pass.

Requests wait at most ``max_wait_s`` for company; the worker takes up to ``max_batch`` (image, query) pairs
at once and runs them through ``LensPipeline.batch`` on the model's single thread. Past ``max_pending``
requests (queued or running) a new one is refused at once with ``QueueFull`` (the service answers 503),
so load beyond capacity never piles up as latency.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from lens.pipeline import LensPipeline, Segmentation

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are pending than the bound allows."""


@dataclass
class _Job:
    image: Image.Image
    queries: list[str]
    future: asyncio.Future = field(repr=False)


class SegmentQueue:
    def __init__(
        self,
        pipeline: LensPipeline,
        executor: Executor,
        max_pending: int = 64,
        max_batch: int = 16,
        max_wait_s: float = 0.01,
    ):
        self.pipeline, self.executor = pipeline, executor
        self.max_pending, self.max_batch, self.max_wait_s = max_pending, max_batch, max_wait_s
        self.pending = 0
        self.batches = 0  # forward passes run (each over one or more requests)
        self.batched_requests = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    def full(self) -> bool:
        return self.pending >= self.max_pending

    async def submit(self, image: Image.Image, queries: list[str]) -> list[Segmentation]:
        if self._queue is None:
            raise RuntimeError("SegmentQueue.start() was not called")
        if self.pending >= self.max_pending:
            raise QueueFull(f"{self.pending} requests pending (bound {self.max_pending})")
        self.pending += 1
        try:
            job = _Job(image, queries, asyncio.get_running_loop().create_future())
            await self._queue.put(job)
            return await job.future
        finally:
            self.pending -= 1

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            pairs = len(jobs[0].queries)
            deadline = loop.time() + self.max_wait_s
            while pairs < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    job = (
                        self._queue.get_nowait()
                        if timeout <= 0
                        else await asyncio.wait_for(self._queue.get(), timeout)
                    )
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                jobs.append(job)
                pairs += len(job.queries)
            self.batches += 1
            self.batched_requests += len(jobs)
            requests = [(job.image, job.queries) for job in jobs]
            try:
                results = await loop.run_in_executor(self.executor, self.pipeline.batch, requests)
            except Exception as error:  # one bad batch fails its own requests, never the worker
                logger.exception("segment batch of %d requests failed", len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            for job, result in zip(jobs, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)

    def stats(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "max_pending": self.max_pending,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
        }
