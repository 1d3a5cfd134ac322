"""Micro-batching: concurrent requests share one model call.

A model call costs a fixed overhead plus a little per image, so under load it pays to wait a few
milliseconds for more requests and run them together. One worker thread takes the first waiting
job, then gathers more until it has ``max_batch`` or ``wait_s`` has passed since the first, and
hands the whole list to ``process``. With ``max_batch=1`` every job runs alone (batching off).

Given ``arriving`` (how many jobs are on their way, e.g. being decoded), the worker stops waiting
as soon as none is: a lone request then costs no wait at all, while under load the batch still
takes in every request already received.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")

_STOP = object()


class MicroBatcher(Generic[Job, Result]):
    """Run ``process(jobs) -> results`` (one result per job, in order) on batches of submitted
    jobs; each ``submit`` returns a future of its own result. A result that is an exception fails
    that job alone; an exception raised by ``process`` fails every job of the batch. Either way
    the worker goes on with the next batch."""

    def __init__(
        self,
        process: Callable[[Sequence[Job]], Sequence[Result]],
        max_batch: int = 32,
        wait_s: float = 0.005,
        arriving: Callable[[], int] | None = None,
    ) -> None:
        if max_batch < 1 or wait_s < 0:
            raise ValueError(f"need max_batch >= 1 and wait_s >= 0, got {max_batch}, {wait_s}")
        self.process = process
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.arriving = arriving
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the jobs already submitted, then end the worker."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> Future[Result]:
        future: Future[Result] = Future()
        self._queue.put((job, future))
        return future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._gather(first)
            self._call(batch)
            if stop:
                return

    def _gather(self, first: tuple[Job, Future]) -> tuple[list[tuple[Job, Future]], bool]:
        """``first`` and whatever else arrives before the batch is full or the wait is over."""
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            if self.arriving is not None and self._queue.empty() and not self.arriving():
                break
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _call(self, batch: list[tuple[Job, Future]]) -> None:
        live = [(job, f) for job, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self.process([job for job, _ in live])
        except Exception as err:  # handed to every caller of the batch
            for _, future in live:
                future.set_exception(err)
            return
        for (_, future), result in zip(live, results):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
