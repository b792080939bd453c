"""``Guard.compile_scoring`` (hfguard.compiled): the guard's maths after the model pass compiled with torch.compile
gives the eager scores for any batch size, keeps gradients and the ONNX export on the eager path, survives a refit,
is left behind by copies, keeps CUDA-graph modes in their own thread, gives each guard its own compiled versions,
and leaves the model as it was."""

import copy
import pickle
import threading
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import hfguard
from hfguard.compiled import uses_cuda_graphs
from hfguard.errors import NotFittedError
from tests.conftest import assert_same_state, model_state


def _count_compiled_calls(guard):
    """Wraps the compiled function: the list gets the calling thread's id each time ``check`` uses it."""
    calls, fn = [], guard._compiled.fn
    guard._compiled.fn = lambda *args: calls.append(threading.get_ident()) or fn(*args)
    return calls


@pytest.fixture(scope="module")
def compiled(fitted):
    guard = copy.deepcopy(fitted)
    before, graphs = model_state(guard.model), counters["stats"]["unique_graphs"]
    assert guard.compile_scoring() is guard
    assert counters["stats"]["unique_graphs"] > graphs  # torch made a graph now, not at the first check
    assert_same_state(before, model_state(guard.model))
    return guard


def test_compiled_checks_give_the_eager_scores_for_any_batch(compiled, fitted, digits):
    x = digits.x_test[:64]
    eager = fitted.check(x)
    used = _count_compiled_calls(compiled)
    forwards = []
    handle = compiled.model.register_forward_pre_hook(lambda m, a: forwards.append(len(a[0])))
    try:
        got = compiled.check(x)
        small = compiled.check(x[:5])
        with torch.inference_mode():
            inf = compiled.check(x[:7])
    finally:
        handle.remove()
    assert len(used) == 3 and forwards == [64, 5, 7]  # the compiled maths ran, after one model pass per check
    spread = float(eager.score.std())
    assert float((got.score - eager.score).abs().max()) < 1e-4 * spread
    assert float((small.score - eager.score[:5]).abs().max()) < 1e-4 * spread
    assert float((inf.score - eager.score[:7]).abs().max()) < 1e-4 * spread
    assert torch.equal(got.origin, eager.origin) and torch.equal(got.logits, eager.logits)
    assert torch.equal(compiled.detect(x), fitted.detect(x)) and torch.equal(got.flagged, eager.flagged)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_compiled, auto_eager = compiled.check(x).score, fitted.check(x).score
    assert float((auto_compiled - auto_eager).abs().max()) < 1e-3 * spread


def test_gradients_and_the_onnx_export_take_the_eager_maths(compiled, fitted, digits, tmp_path):
    used = _count_compiled_calls(compiled)
    x = digits.x_test[:8].clone().requires_grad_(True)
    compiled.score(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    fitted.score(x).sum().backward()
    assert torch.allclose(grad, x.grad) and grad.abs().sum() > 0
    path = str(tmp_path / "g.onnx")
    compiled.export_onnx(path, digits.x_test[:2])
    assert used == []
    onnx_guard = hfguard.OnnxGuard(path)
    assert torch.allclose(onnx_guard.check(digits.x_test[:16]).score, fitted.check(digits.x_test[:16]).score, atol=1e-3)


def test_compiled_checks_from_several_threads_agree(compiled, fitted, digits):
    x = digits.x_test[:48]
    want = fitted.check(x).score
    used = _count_compiled_calls(compiled)
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
    assert not errors and len(set(used)) == 4  # the default mode runs compiled in every thread
    assert torch.allclose(torch.cat([got[i] for i in range(4)]), want, atol=1e-4 * float(want.std()))


def test_a_failed_compile_keeps_the_previous_one_and_copies_leave_it_behind(compiled):
    previous = compiled._compiled
    with pytest.raises(Exception):
        compiled.compile_scoring(backend="no-such-backend")
    assert compiled._compiled is previous
    assert copy.deepcopy(compiled)._compiled is None
    assert pickle.loads(pickle.dumps(compiled))._compiled is None
    assert compiled._compiled is previous


def test_a_refit_compiles_again_and_guards_never_share_compiled_versions(digits_model, digits):
    """torch keeps at most 8 compiled versions per code object and then runs it uncompiled; guards (and refits)
    sharing one code object would use up each other's versions."""
    with pytest.raises(NotFittedError):
        hfguard.protect(digits_model, progress=False).compile_scoring()
    guard = hfguard.protect(digits_model, progress=False, calibration="clean").fit((digits.x_train[:600], digits.y_train[:600]))
    other = hfguard.protect(digits_model, progress=False, calibration="clean").fit((digits.x_train, digits.y_train))
    guard.compile_scoring(backend="eager")  # the code objects are dynamo's concern; inductor's code is tested above
    other.compile_scoring(backend="eager")
    first = guard._compiled
    assert first.code is not other._compiled.code and first.code is not type(guard)._scoring_from_pass.__code__
    guard.fit((digits.x_train[600:], digits.y_train[600:]))
    assert guard._compiled is not None and guard._compiled.code is not first.code
    used = _count_compiled_calls(guard)
    x = digits.x_test[:32]
    got = guard.check(x).score
    assert len(used) == 1
    assert guard.compile_scoring(False)._compiled is None
    eager = guard.check(x).score
    assert float((got - eager).abs().max()) < 1e-4 * float(eager.std())


def test_under_cuda_graph_modes_other_threads_take_the_eager_maths(digits_model, digits):
    """torch's CUDA graph trees fail in threads other than the one that recorded them (measured on an H200,
    ``benchmarks/results/gpu-compiled-paths-before-thread-fix.json``); under such a mode other threads get the eager
    maths, with one warning."""
    assert uses_cuda_graphs({"mode": "reduce-overhead"}) and uses_cuda_graphs({"options": {"triton.cudagraphs": True}})
    assert uses_cuda_graphs({"backend": "cudagraphs"}) and uses_cuda_graphs({"mode": "max-autotune"})
    assert not uses_cuda_graphs({}) and not uses_cuda_graphs({"mode": "max-autotune-no-cudagraphs"})
    guard = hfguard.protect(digits_model, progress=False, calibration="clean").fit((digits.x_train, digits.y_train))
    guard.compile_scoring(mode="reduce-overhead")  # on a CPU inductor records no graph, but the routing is the same
    used = _count_compiled_calls(guard)
    x = digits.x_test[:16]
    mine = guard.check(x).score
    assert used == [threading.get_ident()]
    other, caught = {}, []

    def work():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            other["score"] = guard.check(x).score
            other["again"] = guard.check(x).score
            caught.extend(str(m.message) for m in w)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert used == [threading.get_ident()]  # the other thread took the eager maths
    assert len(caught) == 1 and "thread" in caught[0]
    assert torch.allclose(other["score"], mine, atol=1e-4 * float(mine.std()))
