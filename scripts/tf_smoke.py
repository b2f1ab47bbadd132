"""Smoke check of an *installed* fused_segloss against the installed TensorFlow/Keras.

Run it from outside the source tree (so the installed package is imported):
    cd /tmp && python /path/to/scripts/tf_smoke.py
Used by scripts/tf_matrix.sh (not part of CI). One line per check:
    ok       CHECK: detail
    FALLBACK CHECK: why   (the package imported and worked, but on the pure-TF reference)
    FAIL     CHECK: why
Exit status: 0 all ok, 3 only fallbacks, 1 any failure.
"""
import os
import sys
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
warnings.simplefilter("ignore", DeprecationWarning)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

RESULTS = []


class Fallback(Exception):
    """The check ran, but the fused/XLA path was not used."""


def check(name):
    def run(fn):
        try:
            detail = fn() or ""
            RESULTS.append("ok")
            print(f"ok       {name}: {detail}", flush=True)
        except Fallback as exc:
            RESULTS.append("fallback")
            print(f"FALLBACK {name}: {exc}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every check, then exit non-zero
            RESULTS.append("fail")
            traceback.print_exc()
            print(f"FAIL     {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  flush=True)
        return fn
    return run


import fused_segloss as fsl  # noqa: E402  (a failing import is a crash: exit 1 by itself)
import fused_segloss._loader  # noqa: E402
import fused_segloss._xla  # noqa: E402
import keras  # noqa: E402

print(f"python {sys.version.split()[0]}, tensorflow {tf.__version__}, keras {keras.__version__}, "
      f"numpy {np.__version__}, fused_segloss from {os.path.dirname(fsl.__file__)}", flush=True)


@check("import")
def _import():
    import fused_segloss.demo  # noqa: F401
    import fused_segloss.keras  # noqa: F401
    return "fused_segloss, fused_segloss.keras, fused_segloss.demo"


rng = np.random.default_rng(0)
LOGITS = tf.constant(rng.normal(size=(2, 9, 7, 3)), tf.float32)
LABELS = tf.constant((rng.random((2, 9, 7, 3)) < 0.4).astype(np.float32))
FUSED = "fused" if fsl.fused_available() else "auto"  # "auto" falls back to the reference


def close(a, b, what):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=what)


@check("library")
def _library():
    status = fused_segloss._loader.status()
    if not fsl.fused_available():
        raise Fallback(f"op library not loaded: {status.reason}")
    return os.path.basename(status.path)


@check("op")
def _op():
    got = fsl.segloss_stats(LOGITS, LABELS, implementation=FUSED)
    close(got, fsl.segloss_stats(LOGITS, LABELS, implementation="reference"), "stats")
    if FUSED != "fused":
        raise Fallback("stats equal, but computed by the reference (no op library)")
    return f"stats {tuple(got.shape)} fused == reference"


@check("gradient")
def _gradient():
    grads = {}
    for impl in (FUSED, "reference"):
        with tf.GradientTape() as tape:
            tape.watch(LOGITS)
            loss = fsl.seg_loss(LOGITS, LABELS, implementation=impl)
        grads[impl] = tape.gradient(loss, LOGITS)
    close(grads[FUSED], grads["reference"], "d seg_loss / d logits")
    if FUSED != "fused":
        raise Fallback("gradients equal, but computed by the reference (no op library)")
    return "d seg_loss/d logits fused == reference"


@check("xla")
def _xla():
    f = tf.function(lambda x: fsl.segloss_stats(x, LABELS, implementation=FUSED), jit_compile=True)
    close(f(LOGITS), fsl.segloss_stats(LOGITS, LABELS, implementation="reference"), "jit stats")
    if not fused_segloss._xla.available():
        raise Fallback(f"jit result equal, but XLA path unavailable: "
                       f"{fused_segloss._xla.unavailable_reason()}")
    hlo = f.experimental_get_compiler_ir(LOGITS)(stage="hlo")
    assert 'custom_call_target="fused_segloss_stats"' in hlo, "no fused_segloss_stats custom call in HLO"
    return "jit == reference, HLO has custom_call_target=\"fused_segloss_stats\""


def _fit(jit_compile):
    import fused_segloss.keras  # noqa: F401  (reported by the import check too)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 4)), keras.layers.Conv2D(3, 3, padding="same")])
    model.compile(optimizer="adam", loss=fsl.keras.SegLoss(), jit_compile=jit_compile)
    x = rng.normal(size=(8, 16, 16, 4)).astype(np.float32)
    y = (rng.random((8, 16, 16, 3)) < 0.3).astype(np.float32)
    losses = model.fit(x, y, batch_size=4, epochs=1, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)), f"loss not finite: {losses}"
    if not fsl.fused_available() or (model.jit_compile and not fused_segloss._xla.available()):
        raise Fallback(f"fit ok, loss {losses[-1]:.4f}, but on the reference")
    return f"fit 2 steps (jit_compile={model.jit_compile}), loss {losses[-1]:.4f}"


check("keras")(lambda: _fit("auto"))  # Keras' "auto" means no XLA on a CPU-only machine
check("keras-xla")(lambda: _fit(True))  # inside XLA: the custom call, or the reference


sys.exit(1 if "fail" in RESULTS else 3 if "fallback" in RESULTS else 0)
