"""Runs the fused_segloss CUDA kernels on a real GPU, without TensorFlow.

Needs: a visible NVIDIA GPU (driver >= 580 for nvcc 13 output), nvcc, NumPy, and CuPy or
PyTorch (only for device memory, streams and events). It builds the TF-free launcher
library with tests/gpu/build_standalone.py (or takes --lib), then

1. correctness: both kernels on random inputs (both layouts, several dtype pairs, broadcast
   weights, pos_weight, squared, C = 1 / 100 / 1001), compared with the independent float64
   NumPy oracle (tests/numpy_reference.py) and with the CPU core compiled into the same
   library; count columns must match the CPU exactly; a repeated forward must be bitwise
   identical; invalid labels must be reported with the CPU's message;
   softmax mode (activation = softmax): dense and sparse labels (uint8 / int32 / int64 class
   ids, ignore_index), C = 2 / 21 / 150, squared, focal gamma 2, against the CPU kernel
   and the float64 NumPy oracle of tests/numpy_softmax.py; invalid class ids reported
   with the CPU's message;
2. timing on large inputs (check_gpu_timing.py): forward (with and without the value check, which synchronises)
   and gradient, against the bytes-moved floor: the time a device-to-device copy of the
   logits needs per byte, applied to the bytes each kernel must read and write.

    python tests/gpu/check_gpu.py [--lib PATH] [--arch 90] [--quick] [--timing-only]

Exit status: 0 all checks passed (or no GPU: prints "no GPU: <reason>" and does nothing),
1 a check failed.
"""
import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # numpy_reference
sys.path.insert(0, str(HERE))

import numpy_reference as ref  # noqa: E402
from gpu_backend import find_backend  # noqa: E402

DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3, "uint8": 4, "bool": 5,
               "int32": 6, "int64": 7}
COUNT_COLUMNS = [ref.WEIGHT_SUM, ref.HARD_TP, ref.HARD_PRED, ref.HARD_LABEL]
# Tolerances, as in tests/conftest.py (reasons there): stats relative per entry; gradients
# relative to the per-element scale of the terms, plus the output dtype's rounding.
STATS_RTOL = {"float64": 2.0 ** -23, "float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-5}
GRAD_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-5 + 2.0 ** -11,
             "bfloat16": 1e-5 + 2.0 ** -8}
GRAD_ATOL = {"float64": 1e-300, "float32": 1e-30, "float16": 2.0 ** -24, "bfloat16": 1e-30}
# GPU vs CPU kernel: each rounds to the output dtype once, so one whole output ulp apart.
GRAD_VS_CPU_EXTRA = {"float64": 1e-15, "float32": 1e-6, "float16": 2.0 ** -11,
                     "bfloat16": 2.0 ** -8}


# ----------------------------------------------------------------------------------------
# Host arrays in the kernels' storage formats (bfloat16 without ml_dtypes: raw bits).

class HostArray:
    """storage: the bytes the kernel reads (NumPy array); values: what they mean (float64)."""

    def __init__(self, values, dtype):
        self.dtype = dtype
        if dtype == "bfloat16":
            f32 = np.ascontiguousarray(values, np.float32)
            bits = f32.view(np.uint32)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            self.storage = rounded
            self.values = (rounded.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        else:
            np_dtype = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
                        "uint8": np.uint8, "bool": np.bool_, "int32": np.int32,
                        "int64": np.int64}[dtype]
            self.storage = np.ascontiguousarray(values).astype(np_dtype)
            self.values = self.storage.astype(np.float64)

    @staticmethod
    def decode(raw, dtype, shape):
        """Device bytes of a logits-dtype array -> float64 values."""
        if dtype == "bfloat16":
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32).astype(np.float64).reshape(shape)
        np_dtype = {"float32": np.float32, "float64": np.float64, "float16": np.float16}[dtype]
        return np.frombuffer(raw, np_dtype).astype(np.float64).reshape(shape)


# ----------------------------------------------------------------------------------------
# The library (C ABI of csrc/cuda/segloss_cuda_capi.cc).

class Library:
    PROBLEM = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
               ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
               ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]

    def __init__(self, path, cpu_stands_in=False):
        lib = ctypes.CDLL(str(path))
        lib.fsl_cuda_stats.argtypes = self.PROBLEM + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        lib.fsl_cuda_logit_grad.argtypes = self.PROBLEM + [ctypes.c_void_p] * 3
        lib.fsl_cpu_stats.argtypes = self.PROBLEM + [ctypes.c_void_p]
        lib.fsl_cpu_logit_grad.argtypes = self.PROBLEM + [ctypes.c_void_p] * 2
        softmax = self.PROBLEM + [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_float]
        lib.fsl_cuda_softmax_stats.argtypes = softmax + [ctypes.c_void_p] * 2 + [ctypes.c_int]
        lib.fsl_cuda_softmax_logit_grad.argtypes = softmax + [ctypes.c_void_p] * 3
        lib.fsl_cpu_softmax_stats.argtypes = softmax + [ctypes.c_void_p]
        lib.fsl_cpu_softmax_logit_grad.argtypes = softmax + [ctypes.c_void_p] * 2
        lib.fsl_cuda_error_message.argtypes = [ctypes.c_int]
        for name in ("fsl_cuda_error_message", "fsl_cpu_error_message"):
            getattr(lib, name).restype = ctypes.c_char_p
        self.lib = lib
        self.cpu_stands_in = cpu_stands_in
        if cpu_stands_in:
            self.lib = _CpuStandIn(lib)

    def cuda_message(self, code):
        return self.lib.fsl_cuda_error_message(code).decode()


class _CpuStandIn:
    """--host-dry-run: the fsl_cuda_* entry points answered by the CPU kernel (host pointers)."""

    def __init__(self, lib):
        self._lib = lib

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def fsl_cuda_stats(self, *args):
        problem, out = args[:14], args[14]
        return 0 if self._lib.fsl_cpu_stats(*problem, out) == 0 else 2

    def fsl_cuda_logit_grad(self, *args):
        problem, grad_stats, out = args[:14], args[14], args[15]
        return 0 if self._lib.fsl_cpu_logit_grad(*problem, grad_stats, out) == 0 else 2

    def fsl_cuda_softmax_stats(self, *args):
        problem, out = args[:18], args[18]
        return 0 if self._lib.fsl_cpu_softmax_stats(*problem, out) == 0 else 2

    def fsl_cuda_softmax_logit_grad(self, *args):
        problem, grad_stats, out = args[:18], args[18], args[19]
        return 0 if self._lib.fsl_cpu_softmax_logit_grad(*problem, grad_stats, out) == 0 else 2

    def fsl_cuda_error_message(self, code):
        return self._lib.fsl_cpu_error_message() if code else b"success"


class Case:
    """One problem: host arrays, their device copies, and the C ABI argument list."""

    def __init__(self, backend, rng, shape, channels_last, logits_dtype, labels_dtype,
                 weights=None, pos_weight=False, squared=False, soft=True, softmax=False,
                 sparse=False, ignore_index=None, focal_gamma=0.0):
        self.shape, self.channels_last, self.squared = shape, channels_last, squared
        self.logits_dtype, self.labels_dtype = logits_dtype, labels_dtype
        self.softmax, self.sparse = softmax, sparse
        self.ignore_index, self.focal_gamma = ignore_index, focal_gamma
        b = shape[0]
        c = shape[-1] if channels_last else shape[1]
        n = int(np.prod(shape[1:-1] if channels_last else shape[2:]))
        self.bnc = (b, n, c)
        x = rng.standard_normal(shape, dtype=np.float32) * 3.0
        z = (rng.random(shape, dtype=np.float32) < 0.4).astype(np.float32)
        if soft and labels_dtype not in ("uint8", "bool"):
            z = np.where(rng.random(shape, dtype=np.float32) < 0.3,
                         rng.random(shape, dtype=np.float32), z)
        if softmax:  # one class per pixel: ids, or their one-hot (the logits' layout)
            class_axis = -1 if channels_last else 1
            ids = rng.integers(0, c, np.delete(shape, class_axis % len(shape)))
            if sparse:
                if ignore_index is not None:
                    ids[rng.random(ids.shape) < 0.1] = ignore_index
                z = ids
            else:
                z = np.moveaxis(np.eye(c, dtype=np.float32)[ids], -1, class_axis)
        self.x = HostArray(x, logits_dtype)
        self.z = HostArray(z, labels_dtype)
        # weights: three characters for (batch, positions, classes), 'f' full or '1'.
        self.w = None
        self.w_dims = (1, 1, 1)
        if weights is not None:
            full = dict(zip("bnc", self.bnc))
            dims = [full[a] if f == "f" else 1 for a, f in zip("bnc", weights)]
            self.w_dims = tuple(dims)
            canonical = dims if channels_last else [dims[0], dims[2], dims[1]]
            w = rng.uniform(0.0, 2.0, canonical).astype(np.float32)
            w[rng.random(canonical) < 0.2] = 0.0
            self.w = w
        self.pw = rng.uniform(0.5, 4.0, c).astype(np.float32) if pos_weight else None
        self.backend = backend
        self.d_x = backend.upload(self.x.storage)
        self.d_z = backend.upload(self.z.storage)
        self.d_w = backend.upload(self.w) if self.w is not None else None
        self.d_pw = backend.upload(self.pw) if self.pw is not None else None

    def args(self, device=True):
        """The problem arguments of the C ABI, with device or host pointers."""
        if device:
            ptr = self.backend.pointer
            x, z = ptr(self.d_x), ptr(self.d_z)
            w = ptr(self.d_w) if self.d_w is not None else None
            pw = ptr(self.d_pw) if self.d_pw is not None else None
        else:
            x, z = self.x.storage.ctypes.data, self.z.storage.ctypes.data
            w = self.w.ctypes.data if self.w is not None else None
            pw = self.pw.ctypes.data if self.pw is not None else None
        b, n, c = self.bnc
        args = [x, DTYPE_CODES[self.logits_dtype], z, DTYPE_CODES[self.labels_dtype], w,
                *self.w_dims, pw, b, n, c, int(self.channels_last), int(self.squared)]
        if self.softmax:
            args += [int(self.sparse), int(self.ignore_index is not None),
                     self.ignore_index or 0, self.focal_gamma]
        return args

    def entry(self, name):
        """The C ABI function `name` (fsl_cuda_stats, ...) of this case's activation."""
        return name.replace("_stats", "_softmax_stats").replace(
            "_logit_grad", "_softmax_logit_grad") if self.softmax else name

    @property
    def data_format(self):
        return "channels_last" if self.channels_last else "channels_first"

    def full_weights(self):
        b, n, c = self.bnc
        view = (b, n, c) if self.channels_last else (b, c, n)
        return np.broadcast_to(self.w, view).reshape(self.shape)

    def input_bytes(self):
        total = self.x.storage.nbytes + self.z.storage.nbytes
        return total + (self.w.nbytes if self.w is not None else 0)


def gpu_stats(lib, backend, case, check_values=True):
    b, _, c = case.bnc
    out = backend.empty(b * c * 8 * 4)
    code = getattr(lib.lib, case.entry("fsl_cuda_stats"))(
        *case.args(), backend.pointer(out), backend.stream(), int(check_values))
    backend.synchronize()
    if code != 0:
        raise RuntimeError(f"fsl_cuda_stats: {code}: {lib.cuda_message(code)}")
    return np.frombuffer(backend.download(out), np.float32).reshape(b, c, 8)


def gpu_grad(lib, backend, case, grad_stats):
    d_g = backend.upload(grad_stats)
    out = backend.empty(case.x.storage.nbytes)
    code = getattr(lib.lib, case.entry("fsl_cuda_logit_grad"))(
        *case.args(), backend.pointer(d_g), backend.pointer(out), backend.stream())
    backend.synchronize()
    if code != 0:
        raise RuntimeError(f"fsl_cuda_logit_grad: {code}: {lib.cuda_message(code)}")
    return HostArray.decode(backend.download(out), case.logits_dtype, case.shape)


def cpu_stats(lib, case):
    b, _, c = case.bnc
    out = np.zeros((b, c, 8), np.float32)
    if getattr(lib.lib, case.entry("fsl_cpu_stats"))(*case.args(device=False),
                                                     out.ctypes.data) != 0:
        raise RuntimeError(lib.lib.fsl_cpu_error_message().decode())
    return out


def cpu_grad(lib, case, grad_stats):
    out = np.zeros(case.x.storage.shape, case.x.storage.dtype)
    code = getattr(lib.lib, case.entry("fsl_cpu_logit_grad"))(
        *case.args(device=False), grad_stats.ctypes.data, out.ctypes.data)
    if code != 0:
        raise RuntimeError(lib.lib.fsl_cpu_error_message().decode())
    return HostArray.decode(out.tobytes(), case.logits_dtype, case.shape)


# ----------------------------------------------------------------------------------------
# Checks

class Report:
    def __init__(self):
        self.failures = []

    def check(self, ok, what):
        print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failures.append(what)


def stats_excess(actual, expected, dtype):
    allowed = STATS_RTOL[dtype] * np.abs(expected) + 1e-30
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected) - allowed))


def grad_excess(actual, expected, scale, dtype, extra=0.0):
    allowed = (GRAD_RTOL[dtype] + extra) * scale + GRAD_ATOL[dtype]
    return float(np.max(np.abs(actual - expected) - allowed))


def check_case(lib, backend, rng, report, name, oracle=True, **options):
    case = Case(backend, rng, **options)
    dtype = case.logits_dtype
    print(f"{name}: shape {case.shape} {case.data_format} logits {dtype} labels "
          f"{case.labels_dtype} weights {options.get('weights')} pos_weight "
          f"{options.get('pos_weight', False)} squared {case.squared}", flush=True)
    stats = gpu_stats(lib, backend, case)
    cpu = cpu_stats(lib, case)
    again = gpu_stats(lib, backend, case)
    report.check(np.array_equal(stats.view(np.uint32), again.view(np.uint32)),
                 f"{name}: forward bitwise identical on a second run")
    report.check(stats_excess(stats, cpu.astype(np.float64), dtype) <= 0,
                 f"{name}: stats match the CPU kernel (rtol {STATS_RTOL[dtype]:g})")
    if case.w is None or np.array_equal(case.w, np.round(case.w)):
        report.check(np.array_equal(stats[..., COUNT_COLUMNS], cpu[..., COUNT_COLUMNS]),
                     f"{name}: count columns equal the CPU kernel's exactly")
    grad_stats = rng.standard_normal((case.bnc[0], case.bnc[2], 8)).astype(np.float32)
    grad = gpu_grad(lib, backend, case, grad_stats)
    grad_cpu = cpu_grad(lib, case, grad_stats)
    if oracle:
        w = case.full_weights() if case.w is not None else None
        expected = ref.stats(case.x.values, case.z.values, w, case.pw, case.data_format,
                             case.squared)
        report.check(stats_excess(stats, expected, dtype) <= 0,
                     f"{name}: stats match the float64 NumPy oracle")
        g_expected = ref.logit_grad(case.x.values, case.z.values, w, case.pw, grad_stats,
                                    case.data_format, case.squared)
        scale = ref.logit_grad_scale(case.x.values, case.z.values, w, case.pw, grad_stats,
                                     case.data_format, case.squared)
        report.check(grad_excess(grad, g_expected, scale, dtype) <= 0,
                     f"{name}: gradient matches the float64 NumPy oracle")
        report.check(grad_excess(grad, grad_cpu, scale, dtype, GRAD_VS_CPU_EXTRA[dtype]) <= 0,
                     f"{name}: gradient matches the CPU kernel")
    else:
        # Without the oracle's scale: relative to the larger magnitude, dtype rounding.
        scale = np.maximum(np.abs(grad_cpu), 1e-3)
        report.check(grad_excess(grad, grad_cpu, scale, dtype, 2 * GRAD_RTOL[dtype]) <= 0,
                     f"{name}: gradient matches the CPU kernel")
    return case


def messages_for_bad_labels(lib, backend, case, bad, launch):
    """(code, the GPU's message, the CPU kernel's message) for the stats of `case` with its
    labels replaced by `bad`; `launch` is the fsl_cuda_* stats entry point of its mode."""
    case.d_z = backend.upload(bad)
    b, _, c = case.bnc
    out = backend.empty(b * c * 8 * 4)
    code = launch(*case.args(), backend.pointer(out), backend.stream(), 1)
    case.z.storage = bad
    try:
        cpu_stats(lib, case)
        cpu_message = ""
    except RuntimeError as error:
        cpu_message = str(error)
    return code, lib.cuda_message(code), cpu_message


def check_invalid_labels(lib, backend, rng, report):
    case = Case(backend, rng, (2, 300, 7), True, "float32", "float32")
    bad = case.z.storage.copy()
    bad.reshape(-1)[rng.choice(bad.size, 5, replace=False)] = 1.5
    code, message, cpu_message = messages_for_bad_labels(lib, backend, case, bad,
                                                         lib.lib.fsl_cuda_stats)
    print(f"invalid labels: code {code}, message {message!r}")
    report.check(code == 2 and message == cpu_message and "found 5 " in message,
                 "invalid labels reported with the CPU kernel's message")


CORRECTNESS = [
    ("CL-f32-pixelw", dict(shape=(4, 128, 128, 5), channels_last=True, logits_dtype="float32",
                           labels_dtype="float32", weights="ff1", pos_weight=True)),
    ("CL-f16-u8", dict(shape=(2, 96, 97, 3), channels_last=True, logits_dtype="float16",
                       labels_dtype="uint8")),
    ("CL-bf16-bool-C100", dict(shape=(2, 33, 31, 100), channels_last=True,
                               logits_dtype="bfloat16", labels_dtype="bool", squared=True)),
    ("CF-f32-fullw", dict(shape=(2, 5, 64, 63), channels_last=False, logits_dtype="float32",
                          labels_dtype="float32", weights="fff", squared=True)),
    ("CF-f16-f16-C1", dict(shape=(3, 1, 1023), channels_last=False, logits_dtype="float16",
                           labels_dtype="float16", pos_weight=True)),
    ("CL-f64-classw", dict(shape=(2, 64, 64, 5), channels_last=True, logits_dtype="float64",
                           labels_dtype="float32", weights="11f")),
    ("CL-f32-C1-3d", dict(shape=(2, 17, 33, 65, 1), channels_last=True, logits_dtype="float32",
                          labels_dtype="bfloat16", weights="1f1")),
    ("CL-f32-C1001-column", dict(shape=(2, 40, 1001), channels_last=True,
                                 logits_dtype="float32", labels_dtype="uint8", weights="f11")),
    ("CL-f32-rank0", dict(shape=(9, 7), channels_last=True, logits_dtype="float32",
                          labels_dtype="float32")),
]

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", help="an existing libfused_segloss_cuda.so (default: build)")
    parser.add_argument("--arch", help="SM numbers for the build (default: the visible GPU)")
    parser.add_argument("-D", dest="defines", action="append", default=[],
                        help="extra preprocessor definition for the kernels' build")
    parser.add_argument("--quick", action="store_true", help="fewer timing cases and reps")
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--backend", choices=["cupy", "torch"], help="default: whichever imports")
    parser.add_argument("--host-dry-run", action="store_true",
                        help="develop this script without a GPU: host memory, and the CPU "
                             "kernel standing in for the CUDA launchers (checks nothing on "
                             "the GPU; small timing shapes)")
    args = parser.parse_args(argv)

    if args.lib:
        library_path = Path(args.lib)
    else:
        from build_standalone import build
        t0 = time.perf_counter()
        library_path = build(args.arch, defines=args.defines)
        print(f"library: {library_path} (ready in {time.perf_counter() - t0:.1f} s)")
    if args.host_dry_run:
        from gpu_backend import HostDryRunBackend
        backend, lib = HostDryRunBackend(), Library(library_path, cpu_stands_in=True)
        print("HOST DRY RUN: the CPU kernel stands in for the GPU; nothing is checked on a GPU")
    else:
        backend, reason = find_backend(args.backend)
        if backend is None:
            print(f"no GPU: {reason}")
            return 0
        lib = Library(library_path)
    print(f"GPU: {backend.describe()}")
    rng = np.random.default_rng(20240611)
    report = Report()
    if not args.timing_only:
        for name, options in CORRECTNESS:
            case = check_case(lib, backend, rng, report, name, **options)
            backend.free_all(case)
        check_invalid_labels(lib, backend, rng, report)
        import check_gpu_softmax
        check_gpu_softmax.run(sys.modules[__name__], lib, backend, rng, report)
    import check_gpu_timing
    check_gpu_timing.run(sys.modules[__name__], lib, backend, rng, report, args.quick,
                         args.host_dry_run)
    print(f"\n{len(report.failures)} check(s) failed" if report.failures else "\nall checks passed")
    for failure in report.failures:
        print(f"  FAILED: {failure}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
