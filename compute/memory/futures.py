"""Small helpers for chaining ``concurrent.futures`` futures across threads."""
from __future__ import annotations

import concurrent.futures


def follow(outer: concurrent.futures.Future, inner: concurrent.futures.Future) -> None:
    """Settle ``outer`` with ``inner``'s result or exception once ``inner`` settles."""
    def settle(done: concurrent.futures.Future) -> None:
        error = done.exception()
        outer.set_exception(error) if error is not None else outer.set_result(done.result())

    inner.add_done_callback(settle)


def settled(value=None) -> concurrent.futures.Future:
    """A future already holding ``value``: what a call returns for work it did in place."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(value)
    return future
