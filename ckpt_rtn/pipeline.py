"""A three-stage pipeline: read ahead, process, write behind.

Reading a tensor, quantizing it and writing it use different resources
(the disk, the cores, the disk again), so they overlap: while one tensor is
quantized the next is read and the previous is written. The queues hold
one batch each (below), which bounds memory to a handful of tensors
whatever the model's size. Any stage failing (or Ctrl-C in the main
thread) stops the others and the first error is raised in the caller.

Items travel between the stages in batches of at most `BATCH_BYTES` (as
`size` counts them) and `BATCH_ITEMS` items: a thread hand-off costs tens of
microseconds, which MoE checkpoints of 100 000 tiny tensors would pay per
tensor, while an item larger than a batch travels alone, so memory holds
what the unbatched pipeline held.

Several threads may store at once (`writers`), for a sink that writes
each item at its own place in the output (the formats' writers do): the
copy into the page cache is then shared among cores instead of bounding the
run on one.

Each stage counts the seconds it was busy (loading, processing, storing;
not waiting on a queue), so a caller can tell which stage bounds the run:
the wall time is at least the busiest stage's. For several storing threads
that is the time at least one of them was storing.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple, TypeVar

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")

_DONE = object()
_POLL = 0.1  # seconds between checks for a failed stage
#: A batch holds at most this many bytes (unless one item is larger) and this many items.
BATCH_BYTES = 4 * 1024 * 1024
BATCH_ITEMS = 4096


@dataclass
class StageTimes:
    """Seconds each stage spent working, not waiting; each is written by one thread only
    (for several storing threads, `store` is set at the end to the time at least one of
    them was storing)."""
    load: float = 0.0
    process: float = 0.0
    store: float = 0.0


def _covered(spans: List[Tuple[float, float]]) -> float:
    """Seconds covered by at least one of the (start, end) spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _join(threads: List[threading.Thread], ended: List[threading.Event],
          abort: threading.Event) -> None:
    """Wait until the stages' `threads` have ended their work (each sets its `ended`).

    A Ctrl-C meanwhile aborts them, and is raised once they have ended:
    the caller closes the file they write as soon as this returns. Their
    own events are waited on, not Thread.join: once a signal interrupts a
    join (CPython 3.11), the thread counts as stopped while it still runs,
    and joining it again returns at once.
    """
    interrupted: Optional[BaseException] = None
    for event in ended:
        while not event.is_set():
            try:
                event.wait()
            except BaseException as exc:  # KeyboardInterrupt, or a stop signal made one
                abort.set()
                interrupted = interrupted or exc
    for thread in threads:  # ending now: nothing is left to write
        thread.join()
    if interrupted is not None:
        raise interrupted


def run_pipeline(items: Iterable[T], load: Callable[[T], A], process: Callable[[T, A], B],
                 store: Callable[[T, B], None], *, size: Callable[[T], int],
                 writers: int = 1) -> StageTimes:
    """load(item) in a thread, process(item, loaded) here, store(item, processed) in
    `writers` threads (a batch each at a time; items of one batch in order).

    `size(item)` is the bytes an item holds once loaded: batches are bounded by it, so
    memory is too (each extra storing thread holds one more processed batch). Returns how
    long each stage was busy.
    """
    times = StageTimes()
    loaded: "queue.Queue[object]" = queue.Queue(maxsize=1)
    processed: "queue.Queue[object]" = queue.Queue(maxsize=1)
    abort = threading.Event()
    errors: List[BaseException] = []

    def put(q: "queue.Queue[object]", value: object) -> bool:
        while not abort.is_set():
            try:
                q.put(value, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def get(q: "queue.Queue[object]") -> Optional[object]:
        while not abort.is_set():
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                continue
        return None

    def guarded(stage: Callable[[], None], ended: threading.Event) -> Callable[[], None]:
        def run() -> None:
            try:
                stage()
            except BaseException as exc:  # reported in the caller's thread
                errors.append(exc)
                abort.set()
            finally:
                ended.set()
        return run

    def reader() -> None:
        batch: List[Tuple[T, A]] = []
        weight = 0
        for item in items:
            nbytes = size(item)
            # Hand over what is gathered before loading an item that would overfill it: a
            # large tensor must not be read while the batch before it waits for the stage.
            if batch and (weight + nbytes > BATCH_BYTES or len(batch) == BATCH_ITEMS):
                if not put(loaded, batch):
                    return
                batch, weight = [], 0
            started = time.perf_counter()
            batch.append((item, load(item)))
            times.load += time.perf_counter() - started
            weight += nbytes
        if not batch or put(loaded, batch):
            put(loaded, _DONE)

    storing: List[Tuple[float, float]] = []  # (start, end) of each batch stored

    def writer() -> None:
        while True:
            entry = get(processed)
            if entry is None:
                return
            if entry is _DONE:
                put(processed, _DONE)  # for the other storing threads
                return
            started = time.perf_counter()
            for item, result in entry:  # type: ignore[attr-defined]
                store(item, result)
            storing.append((started, time.perf_counter()))

    stages = [(reader, "ckpt-rtn-read")] + [(writer, f"ckpt-rtn-write-{n}")
                                            for n in range(writers)]
    ended = [threading.Event() for _ in stages]
    threads = [threading.Thread(target=guarded(stage, event), name=name, daemon=True)
               for (stage, name), event in zip(stages, ended)]
    for thread in threads:
        thread.start()
    try:
        while True:
            entry = get(loaded)
            if entry is None:  # a stage failed
                break
            if entry is _DONE:
                put(processed, _DONE)
                break
            batch: List[Tuple[T, A]] = entry  # type: ignore[assignment]
            started = time.perf_counter()
            results = [(item, process(item, data)) for item, data in batch]
            times.process += time.perf_counter() - started
            if not put(processed, results):
                break
    except BaseException:
        abort.set()
        raise
    finally:
        # On success the writers drain the queue up to _DONE; on failure abort stops them.
        _join(threads, ended, abort)
    if errors:
        raise errors[0]
    times.store = _covered(storing)
    return times
