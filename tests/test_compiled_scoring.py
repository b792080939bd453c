"""``Guard.compile_scoring`` (hfguard.modelpass): the guard's maths after the model pass compiled with torch.compile
gives the eager scores for any batch size, keeps gradients and the ONNX export on the eager path, survives a refit,
is left behind by copies, and leaves the model as it was."""

import copy
import threading

import pytest
import torch

import hfguard
from hfguard.errors import NotFittedError
from hfguard.modelpass import uses_cuda_graphs
from tests.conftest import assert_same_state, model_state


@pytest.fixture(scope="module")
def compiled(fitted):
    guard = copy.deepcopy(fitted)
    before = model_state(guard.model)
    assert guard.compile_scoring() is guard
    assert_same_state(before, model_state(guard.model))
    return guard


def test_compiled_checks_give_the_eager_scores_for_any_batch(compiled, fitted, digits):
    x = digits.x_test[:64]
    eager = fitted.check(x)
    calls = []
    handle = compiled.model.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    try:
        got = compiled.check(x)
        small = compiled.check(x[:5])
    finally:
        handle.remove()
    assert calls == [64, 5]  # still one model pass per check
    spread = float(eager.score.std())
    assert float((got.score - eager.score).abs().max()) < 1e-4 * spread
    assert float((small.score - eager.score[:5]).abs().max()) < 1e-4 * spread
    assert torch.equal(got.origin, eager.origin) and torch.equal(got.logits, eager.logits)
    assert torch.equal(compiled.detect(x), fitted.detect(x))
    assert torch.equal(got.flagged, eager.flagged)


def test_gradients_and_the_onnx_export_take_the_eager_maths(compiled, fitted, digits, tmp_path):
    x = digits.x_test[:8].clone().requires_grad_(True)
    compiled.score(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    fitted.score(x).sum().backward()
    assert torch.allclose(grad, x.grad) and grad.abs().sum() > 0
    path = str(tmp_path / "g.onnx")
    compiled.export_onnx(path, digits.x_test[:2])
    onnx_guard = hfguard.OnnxGuard(path)
    assert torch.allclose(onnx_guard.check(digits.x_test[:16]).score, fitted.check(digits.x_test[:16]).score, atol=1e-3)


def test_compiled_checks_from_several_threads_agree(compiled, fitted, digits):
    x = digits.x_test[:48]
    want = fitted.check(x).score
    got, errors = {}, []

    def work(i):
        try:
            got[i] = compiled.check(x[i * 12 : (i + 1) * 12]).score
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.allclose(torch.cat([got[i] for i in range(4)]), want, atol=1e-4 * float(want.std()))


def test_a_refit_compiles_again_copies_leave_it_behind_and_it_turns_off(digits_model, digits):
    with pytest.raises(NotFittedError):
        hfguard.protect(digits_model, progress=False).compile_scoring()
    guard = hfguard.protect(digits_model, progress=False, calibration="clean").fit((digits.x_train[:600], digits.y_train[:600]))
    guard.compile_scoring()
    first = guard._compiled_scoring
    guard.fit((digits.x_train[600:], digits.y_train[600:]))
    assert guard._compiled_scoring is not None and guard._compiled_scoring is not first
    x = digits.x_test[:32]
    got = guard.check(x).score
    assert copy.deepcopy(guard)._compiled_scoring is None
    assert guard.compile_scoring(False)._compiled_scoring is None
    eager = guard.check(x).score
    assert float((got - eager).abs().max()) < 1e-4 * float(eager.std())


def test_under_cuda_graph_modes_other_threads_take_the_eager_maths(digits_model, digits):
    """torch's CUDA graph trees fail in threads other than the one that recorded them (measured on an H200,
    ``benchmarks/results/gpu-compiled-paths.json``); under such a mode other threads must get the eager maths."""
    assert uses_cuda_graphs({"mode": "reduce-overhead"}) and uses_cuda_graphs({"options": {"triton.cudagraphs": True}})
    assert not uses_cuda_graphs({}) and not uses_cuda_graphs({"mode": "max-autotune-no-cudagraphs"})
    guard = hfguard.protect(digits_model, progress=False, calibration="clean").fit((digits.x_train, digits.y_train))
    guard.compile_scoring(mode="reduce-overhead")  # on a CPU inductor records no graph, but the routing is the same
    compiled_calls = []
    compiled = guard._compiled_scoring
    guard._compiled_scoring = lambda *args: compiled_calls.append(threading.get_ident()) or compiled(*args)
    x = digits.x_test[:16]
    mine = guard.check(x).score
    assert compiled_calls == [threading.get_ident()]
    other = {}
    t = threading.Thread(target=lambda: other.setdefault("score", guard.check(x).score))
    t.start()
    t.join()
    assert compiled_calls == [threading.get_ident()]  # the other thread took the eager maths
    assert torch.allclose(other["score"], mine, atol=1e-4 * float(mine.std()))
    assert guard.compile_scoring(False)._compiled_owner is None
