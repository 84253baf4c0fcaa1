"""The read-ahead / process / write-behind pipeline: order, batching bounds, failures."""
from __future__ import annotations

import threading
from typing import List, Tuple

import pytest

from ckpt_rtn import pipeline
from ckpt_rtn.pipeline import run_pipeline


def test_every_item_is_stored_once_in_order() -> None:
    stored: List[Tuple[int, int]] = []
    run_pipeline(range(10_000), lambda i: i * 2, lambda i, x: x + i,
                 lambda i, y: stored.append((i, y)), size=lambda _: 1)
    assert stored == [(i, 3 * i) for i in range(10_000)]


@pytest.mark.parametrize("sizes", [[1] * 20_000, [1 << 20] * 200, [3 << 20] * 50,
                                   [100, 64 << 20, 100, 100] * 10])
def test_loaded_but_unstored_bytes_stay_bounded(sizes: List[int]) -> None:
    """At most five batches are in flight (one being filled, one in each queue, one in the
    middle stage, one being stored), each within BATCH_BYTES (or one larger item) and
    BATCH_ITEMS: the bound the converter's memory rests on."""
    lock = threading.Lock()
    held = {"bytes": 0, "items": 0, "peak_bytes": 0, "peak_items": 0}

    def load(i: int) -> int:
        with lock:
            held["bytes"] += sizes[i]
            held["items"] += 1
            held["peak_bytes"] = max(held["peak_bytes"], held["bytes"])
            held["peak_items"] = max(held["peak_items"], held["items"])
        return i

    def store(i: int, _: int) -> None:
        with lock:
            held["bytes"] -= sizes[i]
            held["items"] -= 1

    run_pipeline(range(len(sizes)), load, lambda i, x: x, store, size=lambda i: sizes[i])
    largest = max(sizes)
    assert held["peak_bytes"] <= 5 * max(pipeline.BATCH_BYTES, largest)
    assert held["peak_items"] <= 5 * pipeline.BATCH_ITEMS
    assert held["bytes"] == 0 and held["items"] == 0


@pytest.mark.parametrize("stage", ["load", "process", "store"])
def test_a_failing_stage_stops_the_others_and_raises_here(stage: str) -> None:
    seen: List[int] = []

    def fail_at(name: str, i: int) -> None:
        if name == stage and i == 5000:
            raise RuntimeError(f"{name} failed")

    def load(i: int) -> int:
        fail_at("load", i)
        return i

    def process(i: int, x: int) -> int:
        fail_at("process", i)
        return x

    def store(i: int, _: int) -> None:
        fail_at("store", i)
        seen.append(i)

    with pytest.raises(RuntimeError, match=f"{stage} failed"):
        run_pipeline(range(100_000), load, process, store, size=lambda _: 1)
    assert seen == list(range(len(seen))) and len(seen) < 100_000
    assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-rtn-")]


def test_each_stage_counts_the_time_it_was_busy_not_waiting() -> None:
    """Store is the slow stage here: it is busy for about the whole run, the others for
    what they did, although they spend the rest of it waiting on the queues."""
    import time

    def nap(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:  # busy, as a real stage would be
            pass

    started = time.perf_counter()
    times = run_pipeline(range(40), lambda i: nap(0.002), lambda i, x: nap(0.001),
                         lambda i, x: nap(0.01), size=lambda _: 10 * 1024 * 1024)
    wall = time.perf_counter() - started
    assert 0.07 <= times.load <= 0.2 and 0.035 <= times.process <= 0.15
    assert 0.4 <= times.store <= wall and times.store > 0.8 * wall


def test_several_storing_threads_store_every_item_once_and_share_the_work() -> None:
    """writers=3: every item stored exactly once, by more than one thread; the stage's busy
    time is what the threads cover together (here they overlap: less than their sum)."""
    import time

    stored: List[Tuple[int, str]] = []
    lock = threading.Lock()

    def store(i: int, _: int) -> None:
        time.sleep(0.002)  # sleeps release the GIL, as a pwrite does
        with lock:
            stored.append((i, threading.current_thread().name))

    started = time.perf_counter()
    times = run_pipeline(range(300), lambda i: i, lambda i, x: x, store,
                         size=lambda _: 8 * 1024 * 1024, writers=3)
    wall = time.perf_counter() - started
    assert sorted(i for i, _ in stored) == list(range(300))
    assert len({name for _, name in stored}) > 1
    assert times.store <= wall and times.store < 300 * 0.002
    assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-rtn-")]


def test_a_failing_storing_thread_stops_the_others() -> None:
    def store(i: int, _: int) -> None:
        if i == 50:
            raise RuntimeError("store failed")

    with pytest.raises(RuntimeError, match="store failed"):
        run_pipeline(range(100_000), lambda i: i, lambda i, x: x, store,
                     size=lambda _: 8 * 1024 * 1024, writers=4)
    assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-rtn-")]


def test_ctrl_c_while_the_writers_finish_stops_them_before_returning() -> None:
    """A SIGINT that lands once every item is processed, while the caller's thread waits for
    the storing threads, must not return to the caller (who then closes the file) while
    they are still writing: they are stopped and waited for first."""
    import os
    import signal
    import time

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    storing, release = threading.Semaphore(0), threading.Event()
    stored: List[int] = []

    def store(i: int, _: int) -> None:
        storing.release()
        release.wait(5)
        stored.append(i)

    def interrupt() -> None:
        storing.acquire()
        storing.acquire()  # both writers are storing: the caller is now waiting for them
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
        release.set()

    helper = threading.Thread(target=interrupt)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(range(2), lambda i: i, lambda i, x: x, store,
                         size=lambda _: pipeline.BATCH_BYTES, writers=2)
        assert sorted(stored) == [0, 1]  # both writes ended before the interrupt came out
        assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-rtn-")]
    finally:
        release.set()
        helper.join()
        signal.signal(signal.SIGINT, previous)
