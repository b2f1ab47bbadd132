"""The softmax-mode part of check_gpu.py (activation = softmax, one class per pixel): the
CUDA kernels on a real GPU against the CPU kernel compiled into the same library and the
float64 NumPy oracle of tests/numpy_softmax.py, with dense and sparse labels (uint8 /
int32 / int64 class ids, ignore_index), C = 1 / 2 / 5 / 21 / 150, both layouts, squared,
focal gamma 2; invalid class ids must be reported with the CPU kernel's message.

check_gpu.main calls run(check_gpu_module, ...): the cases, buffers and comparisons are
check_gpu's (passed in as `base`, so this module imports nothing of it).
"""
import numpy as np

import numpy_reference as ref
import numpy_softmax

def softmax_grad_scale(case, grad_stats):
    """Per element, the magnitudes dL/dx_j = u_j - p_j·Σ_c u_c adds up (u_c = p_c·dL/dp_c,
    every part of dL/dp_c in magnitude; as tests/test_cuda_softmax_simulation.py)."""
    w = case.full_weights() if case.w is not None else None
    x, z, w = numpy_softmax.elements(case.x.values, case.z.storage if case.sparse else
                                      case.z.values, w, case.data_format, case.ignore_index)
    p = numpy_softmax.softmax(x)
    gamma, k = case.focal_gamma, 2.0 if case.squared else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(p < 1.0, gamma * (1.0 - p) ** (gamma - 1.0) * -np.log(p), 0.0)
    g = np.abs(grad_stats.astype(np.float64))[:, None]
    d_p = w * (g[..., ref.CE_SUM] * z * (first + (1.0 - p) ** gamma / p) +
               g[..., ref.INTERSECTION] * z + g[..., ref.PRED_SUM] * k * p ** (k - 1.0))
    u = p * d_p
    scale = (u + p * u.sum(axis=-1, keepdims=True)).reshape(case.bnc)
    return scale.reshape(case.shape) if case.channels_last else \
        np.swapaxes(scale, 1, 2).reshape(case.shape)


def check_softmax_case(base, lib, backend, rng, report, name, **options):
    """Softmax mode: GPU vs CPU kernel (count columns exactly) vs the float64 oracle."""
    case = base.Case(backend, rng, softmax=True, soft=False, **options)
    dtype = case.logits_dtype
    print(f"{name}: softmax shape {case.shape} {case.data_format} logits {dtype} labels "
          f"{case.labels_dtype}{' ids' if case.sparse else ''} ignore {case.ignore_index} "
          f"weights {options.get('weights')} squared {case.squared} gamma {case.focal_gamma}",
          flush=True)
    stats = base.gpu_stats(lib, backend, case)
    again = base.gpu_stats(lib, backend, case)
    report.check(np.array_equal(stats.view(np.uint32), again.view(np.uint32)),
                 f"{name}: forward bitwise identical on a second run")
    rtol = base.STATS_RTOL[dtype] if case.focal_gamma == 0 or dtype == "float64" else 1e-4
    labels = case.z.storage if case.sparse else case.z.values
    w = case.full_weights() if case.w is not None else None
    expected = numpy_softmax.stats(case.x.values, labels, w, case.data_format, case.squared,
                                   case.ignore_index, case.focal_gamma)
    within = lambda a, e: float(np.max(np.abs(np.asarray(a, np.float64) - e) -  # noqa: E731
                                       rtol * np.abs(e) - 1e-30)) <= 0
    report.check(within(stats, expected), f"{name}: stats match the float64 NumPy oracle")
    grad_stats = rng.standard_normal((case.bnc[0], case.bnc[2], 8)).astype(np.float32)
    grad = base.gpu_grad(lib, backend, case, grad_stats)
    scale = softmax_grad_scale(case, grad_stats)
    extra = 0.0 if dtype == "float64" else 4e-6 * max(1.0, np.log2(case.bnc[2]))
    if case.bnc[1] * case.bnc[2] ** 2 <= 4e6:  # the oracle builds C x C per pixel
        g_expected = numpy_softmax.logit_grad(case.x.values, labels, w, grad_stats,
                                              case.data_format, case.squared,
                                              case.ignore_index, case.focal_gamma)
        report.check(base.grad_excess(grad, g_expected, scale, dtype, extra) <= 0,
                     f"{name}: gradient matches the float64 NumPy oracle")
    try:
        cpu = base.cpu_stats(lib, case)
        grad_cpu = base.cpu_grad(lib, case, grad_stats)
    except RuntimeError as error:
        report.check(False, f"{name}: the CPU kernel runs softmax mode ({error})")
        return case
    report.check(within(stats, cpu.astype(np.float64)), f"{name}: stats match the CPU kernel")
    if case.w is None or np.array_equal(case.w, np.round(case.w)):
        counts = base.COUNT_COLUMNS
        report.check(np.array_equal(stats[..., counts], cpu[..., counts]),
                     f"{name}: count columns equal the CPU kernel's exactly")
    extra += base.GRAD_VS_CPU_EXTRA[dtype]
    report.check(base.grad_excess(grad, grad_cpu, scale, dtype, extra) <= 0,
                 f"{name}: gradient matches the CPU kernel")
    return case


def check_invalid_class_ids(base, lib, backend, rng, report):
    case = base.Case(backend, rng, (2, 300, 7), True, "float32", "int32", softmax=True,
                     sparse=True, ignore_index=255)
    bad = case.z.storage.copy()
    bad.reshape(-1)[rng.choice(bad.size, 5, replace=False)] = [-2, 7, 9, 300, 7]
    code, message, cpu_message = base.messages_for_bad_labels(
        lib, backend, case, bad, lib.lib.fsl_cuda_softmax_stats)
    print(f"invalid class ids: code {code}, message {message!r}")
    report.check(code == 2 and message == cpu_message and "from -2 to 300" in message,
                 "invalid class ids reported with the CPU kernel's message")


SOFTMAX_CORRECTNESS = [
    ("SM-CL-f32-ids-C21", dict(shape=(2, 64, 65, 21), channels_last=True, logits_dtype="float32",
                               labels_dtype="int32", sparse=True, ignore_index=255,
                               weights="ff1")),
    ("SM-CF-bf16-u8ids-C150", dict(shape=(2, 150, 40, 41), channels_last=False,
                                   logits_dtype="bfloat16", labels_dtype="uint8", sparse=True,
                                   ignore_index=255, squared=True)),
    ("SM-CL-f16-dense-C2", dict(shape=(3, 97, 101, 2), channels_last=True, logits_dtype="float16",
                                labels_dtype="float32", weights="fff")),
    ("SM-CF-f64-i64-C5-focal", dict(shape=(2, 5, 33, 35), channels_last=False,
                                    logits_dtype="float64", labels_dtype="int64", sparse=True,
                                    focal_gamma=2.0, weights="ff1")),
    ("SM-CL-f32-u8dense-C1", dict(shape=(2, 1025, 1), channels_last=True,
                                  logits_dtype="float32", labels_dtype="uint8")),
    ("SM-CL-f32-ids-C150-focal", dict(shape=(1, 48, 48, 150), channels_last=True,
                                      logits_dtype="float32", labels_dtype="int64", sparse=True,
                                      focal_gamma=2.0, squared=True)),
]


def run(base, lib, backend, rng, report):
    for name, options in SOFTMAX_CORRECTNESS:
        case = check_softmax_case(base, lib, backend, rng, report, name, **options)
        backend.free_all(case)
    check_invalid_class_ids(base, lib, backend, rng, report)
