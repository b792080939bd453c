"""Running the user's model in eval mode without ever leaving it changed, even across threads.

A model in training mode must be evaluated in eval mode (BatchNorm would otherwise update its running
statistics and dropout would fire) and handed back exactly as it came (every submodule's own flag, so a
BatchNorm the user froze in eval mode stays frozen).  ``model.training`` is shared by every thread, so
flipping it is guarded by one lock per model: while one call has flipped the model, another call on it
waits instead of running (or restoring) in the wrong mode.  A model that has never been seen in training
mode takes no lock, so concurrent serving of an eval-mode model runs in parallel; once a model has been
flipped, every later call on it takes its lock (a lock-free path could read "eval" mid-flip and then run
while the flip is undone).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode", "any_training", "kept_modes"]

_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_ever_flipped: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_registry_lock = threading.Lock()


def any_training(model: nn.Module) -> bool:
    """Whether ``model`` or any of its submodules is in training mode (a model in eval mode may hold a BatchNorm or a
    dropout the user switched back to training, which would update statistics or fire on every call)."""
    return any(m.training for m in model.modules())


@contextlib.contextmanager
def kept_modes(module: nn.Module) -> Iterator[None]:
    """Records the ``training`` flag of ``module`` and every submodule, and sets each back on exit, even on error."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


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
    # read the mode first, then the flag: a thread that reads "eval" while another flips the model
    # then finds the flag, which the flipper sets before calling eval() and never clears
    if not any_training(model) and model not in _ever_flipped:
        yield False
        return
    with _lock(model):
        if not any_training(model):  # a nested call of this thread, or no flip needed now
            yield False
            return
        _ever_flipped.add(model)
        with kept_modes(model):
            model.eval()
            yield True
