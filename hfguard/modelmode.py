"""Running the user's model in eval mode without ever leaving it changed, even across threads.

A model in training mode must be evaluated in eval mode (BatchNorm would otherwise update its running
statistics and dropout would fire) and handed back in training mode.  ``model.training`` is shared by
every thread, so flipping it is guarded by one lock per model: while one call has flipped the model,
another call on it waits instead of running (or restoring) in the wrong mode.  A model already in eval
mode, and not flipped by hfguard, takes no lock, so concurrent serving of an eval-mode model runs in
parallel.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]

_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_flipped: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_registry_lock = threading.Lock()


def _lock(model: nn.Module) -> threading.RLock:
    with _registry_lock:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[bool]:
    """Runs the block with ``model`` in eval mode and restores its mode afterwards, even on error.

    Yields:
        True when the model was in training mode (and was flipped for the block).
    """
    if not model.training and model not in _flipped:
        yield False
        return
    with _lock(model):
        if not model.training:  # a nested call of this thread, or the flip is over
            yield False
            return
        _flipped.add(model)  # before eval(): a thread that sees eval mode then also sees the flag
        model.eval()
        try:
            yield True
        finally:
            model.train(True)  # before discard(): a thread that misses the flag sees training mode
            _flipped.discard(model)
