"""When the XLA custom calls are not available (the private API changed, its self-check
failed, or the library was built without the FFI handlers), a jit-compiled loss runs the
pure-TF reference inside XLA: never an error, one FusedSeglossXlaWarning, the reference's
values. And the self-check passes on the installed TensorFlow."""
import warnings

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
from fused_segloss import _xla
from xla_helpers import hlo_text, loss_and_grad_fn, small_inputs

pytestmark = pytest.mark.skipif(not fsl.fused_available(), reason="op library not built")


@pytest.fixture(autouse=True)
def _restore_availability():
    """Tests that force or re-decide availability leave the process's decision behind."""
    saved = (_xla._available, _xla._reason)
    yield
    _xla._available, _xla._reason = saved



def test_jit_falls_back_to_the_reference_when_unavailable(rng, monkeypatch, custom_calls):
    monkeypatch.setattr(_xla, "available", lambda: False)
    logits, labels = small_inputs(rng)
    step = tf.function(loss_and_grad_fn(), jit_compile=True)
    loss, grad = step(logits, labels)
    assert custom_calls == []
    assert "custom-call" not in hlo_text(step, logits, labels)
    want_loss, want_grad = loss_and_grad_fn("reference")(logits, labels)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("failure", ["import", "self_check", "no_ffi_handlers"])
def test_unavailable_private_api_warns_once_and_uses_the_reference(rng, monkeypatch, failure):
    if failure == "import":
        monkeypatch.setattr(_xla, "_IMPORT_ERROR", "ImportError: no module named ...")
    elif failure == "no_ffi_handlers":  # a library built against a TF without xla/ffi headers
        from fused_segloss import _loader

        monkeypatch.setattr(_loader.status(), "build_info",
                            dict(_loader.status().build_info, xla_ffi="OFF"))
    else:
        def broken_self_check():
            raise AttributeError("changed private API")
        monkeypatch.setattr(_xla, "_self_check", broken_self_check)
    _xla._reset_for_tests(None)
    logits, labels = small_inputs(rng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _xla.available() is False
        assert _xla.available() is False
        step = tf.function(loss_and_grad_fn(), jit_compile=True)
        loss, _ = step(logits, labels)
    xla_warnings = [w for w in caught if issubclass(w.category, _xla.FusedSeglossXlaWarning)]
    assert len(xla_warnings) == 1, [str(w.message) for w in caught]
    assert "reference" in str(xla_warnings[0].message)
    assert "custom-call" not in hlo_text(step, logits, labels)
    np.testing.assert_allclose(loss, loss_and_grad_fn("reference")(logits, labels)[0], rtol=1e-6)


def test_self_check_passes_on_this_tensorflow():
    _xla._reset_for_tests(None)
    assert _xla._self_check() == ""
    assert _xla.available(), _xla.unavailable_reason()
