"""Both cores on the elementwise work: the pieces of an operation shared out among a few threads.

NumPy's elementwise operations run on one core, but they release the GIL, so threads that work on different
pieces of the same arrays run side by side. ``each_piece(fn, *arrays)`` cuts the arrays into the same pieces as
``workspace.pieces``, calls ``fn`` on every piece, the pieces split into one run of consecutive pieces per
thread, and returns what ``fn`` returned, in piece order. The pieces, and so every number, are the same with one
thread or several; whatever the caller adds up from the results, it adds in piece order. So the results are
bit-for-bit those of one thread (``tests/fast/test_threads.py``).

``set_threads(n)`` picks the number of threads (``SCRATCHVAE_THREADS`` in the environment; default: the CPUs
this process may run on, at most ``MAX_THREADS``); 1 runs everything on the calling thread. The threads need
OpenBLAS's idle threads asleep, which ``scratchvae/__init__.py`` asks for when it is imported before NumPy; where
NumPy came first and ``OPENBLAS_THREAD_TIMEOUT`` is not set, the default is 1 thread (two threads would wait on
OpenBLAS's spinning ones and lose time).
"""
from __future__ import annotations

import contextvars
import os
import queue
import threading
from concurrent.futures import Future

from .. import OPENBLAS_SPIN_SET
from .workspace import WORKER_PREFIX, pieces

MAX_THREADS = 4  # elementwise work is bound by memory, which a few cores already keep busy
ENV_VAR = "SCRATCHVAE_THREADS"

_state = {"threads": None, "pool": None, "owner": None}
_lock = threading.RLock()


def default_threads():
    """The threads to use unless told: $SCRATCHVAE_THREADS, else the CPUs this process may use (at most MAX_THREADS)."""
    value = os.environ.get(ENV_VAR)
    if value:
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{ENV_VAR}={value!r}: give a whole number of threads, 1 or more") from None
        if n < 1:
            raise ValueError(f"{ENV_VAR}={value!r}: give a whole number of threads, 1 or more")
        return n
    if not OPENBLAS_SPIN_SET:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, MAX_THREADS))


def set_threads(n):
    """Use ``n`` threads (1 or more) for the fast engine's elementwise work from now on; returns n."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads must be a whole number, 1 or more, not {n!r}")
    with _lock:  # (not while an each_piece hands out its pieces)
        if n != _state["threads"] and _state["owner"] == os.getpid():
            for inbox in _state["pool"]:
                inbox.put(None)  # the worker ends, after the jobs before it
            _state["pool"], _state["owner"] = None, None
        _state["threads"] = n
    return n


def get_threads():
    """The number of threads ``each_piece`` uses."""
    if _state["threads"] is None:
        set_threads(default_threads())
    return _state["threads"]


def _serve(inbox):
    """A worker: runs the jobs put in its inbox, one after the other, until it gets None."""
    while (job := inbox.get()) is not None:
        future, context, work = job
        try:
            future.set_result(context.run(work))  # in the caller's context: its numpy.errstate, for one
        except BaseException as e:  # noqa: BLE001  (handed to the caller, who raises it)
            future.set_exception(e)


def _pool():
    """One inbox per worker thread, the calling thread being the first of the threads (so threads - 1 workers).
    Made anew in a child process, which inherits its parent's inboxes but not the threads behind them."""
    if _state["owner"] != os.getpid():
        _state["pool"] = [queue.SimpleQueue() for _ in range(get_threads() - 1)]
        for i, inbox in enumerate(_state["pool"]):
            threading.Thread(target=_serve, args=(inbox,), name=f"{WORKER_PREFIX}{i + 1}", daemon=True).start()
        _state["owner"] = os.getpid()
    return _state["pool"]


def each_piece(fn, *arrays, size):
    """``[fn(*piece) for piece in pieces(*arrays, size=size)]``, the pieces shared among the threads: one run of
    consecutive pieces each, the calling thread taking the first. ``fn`` must only write into its own piece."""
    parts = list(pieces(*arrays, size=size))
    if len(parts) == 1 or get_threads() == 1 or threading.current_thread().name.startswith(WORKER_PREFIX):
        return [fn(*part) for part in parts]
    futures = []
    with _lock:  # the pool and the runs handed to it agree, whatever set_threads another thread calls
        pool = _pool()
        count = min(len(pool) + 1, len(parts))
        bounds = [len(parts) * t // count for t in range(count + 1)]
        runs = [parts[a:b] for a, b in zip(bounds, bounds[1:])]
        for inbox, run in zip(pool, runs[1:]):
            futures.append(Future())
            inbox.put((futures[-1], contextvars.copy_context(), lambda run=run: [fn(*part) for part in run]))
    try:
        first = [fn(*part) for part in runs[0]]
    finally:  # the other threads finish their pieces before anything goes on, an exception included
        failed = [e for e in (future.exception() for future in futures) if e is not None]
    if failed:
        raise failed[0]
    return first + [result for future in futures for result in future.result()]
