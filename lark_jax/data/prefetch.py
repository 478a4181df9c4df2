"""Host work ahead of the accelerator: run an iterator in a background thread.

Reading the pool, chat-templating, tokenizing and packing are host work that
would otherwise leave the device idle between batches: a window of a million
tokens takes the host about a second (1M tok/s measured for the byte tokenizer
on one core), which is a tenth to a third of what a GPU needs to score it. A
producer thread fills a bounded queue while the main thread waits on the
device (JAX's blocking waits and the Rust tokenizers release the GIL).

Items arrive in order; an exception raised by the producer is re-raised in the
consumer at the position where it occurred (everything before it is delivered
first), so errors read exactly as they would without the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = range(3)


def prefetch(items: Iterable[T], size: int) -> Iterator[T]:
    """Iterate ``items``, produced up to ``size`` ahead by a daemon thread (0: inline).

    Closing the returned generator (or an exception in the consumer) stops the
    producer at its next item; an iterator that can take long between items should
    check a stop flag of its own (the scoring runner checks one per record).
    """
    if size <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(msg) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((_ITEM, item)):
                    return
            put((_END, None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            put((_ERROR, e))

    thread = threading.Thread(target=work, name="lark-jax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, value = q.get(timeout=1.0)
            except queue.Empty:
                if thread.is_alive():
                    continue
                # The producer posts before it exits; this is only a safety net.
                raise RuntimeError("prefetch thread ended without a result") from None
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
