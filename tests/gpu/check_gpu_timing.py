"""The timing part of check_gpu.py: forward (with and without the value check, which
synchronises) and gradient on large inputs, against the bytes-moved floor: the time a
device-to-device copy of the logits needs per byte, applied to the bytes each kernel must
read and write. Each case's forward is also compared with the CPU kernel at that size.

check_gpu.main calls run(check_gpu_module, ...): the cases, buffers and comparisons are
check_gpu's (passed in as `base`, so this module imports nothing of it).
"""
import time

import numpy as np

TIMING = [
    ("CL f32/f32 8x1024^2x5", dict(shape=(8, 1024, 1024, 5), channels_last=True,
                                   logits_dtype="float32", labels_dtype="float32")),
    ("CL f32/f32 +pixel w", dict(shape=(8, 1024, 1024, 5), channels_last=True,
                                 logits_dtype="float32", labels_dtype="float32", weights="ff1")),
    ("CL f16/u8", dict(shape=(8, 1024, 1024, 5), channels_last=True, logits_dtype="float16",
                       labels_dtype="uint8")),
    ("CL bf16/bf16", dict(shape=(8, 1024, 1024, 5), channels_last=True,
                          logits_dtype="bfloat16", labels_dtype="bfloat16")),
    ("CF f32/f32", dict(shape=(8, 5, 1024, 1024), channels_last=False, logits_dtype="float32",
                        labels_dtype="float32")),
    ("CL f32/f32 C=1", dict(shape=(8, 2048, 2048, 1), channels_last=True,
                            logits_dtype="float32", labels_dtype="float32")),
    ("CL f32/u8 C=100", dict(shape=(4, 256, 512, 100), channels_last=True,
                             logits_dtype="float32", labels_dtype="uint8")),
    ("softmax CL f32/i32 C=21", dict(shape=(8, 512, 512, 21), channels_last=True,
                                     logits_dtype="float32", labels_dtype="int32",
                                     softmax=True, sparse=True, ignore_index=255)),
    ("softmax CF bf16/u8 C=150", dict(shape=(2, 150, 512, 512), channels_last=False,
                                      logits_dtype="bfloat16", labels_dtype="uint8",
                                      softmax=True, sparse=True)),
]


def time_case(base, lib, backend, rng, name, reps, report, **options):
    case = base.Case(backend, rng, soft=False, **options)
    b, _, c = case.bnc
    stats_out = backend.empty(b * c * 8 * 4)
    grad_stats = rng.standard_normal((b, c, 8)).astype(np.float32)
    d_g = backend.upload(grad_stats)
    grad_out = backend.empty(case.x.storage.nbytes)
    copy_out = backend.empty(case.x.storage.nbytes)
    args = case.args()
    stream = backend.stream()

    def forward(check):
        code = getattr(lib.lib, case.entry("fsl_cuda_stats"))(
            *args, backend.pointer(stats_out), stream, int(check))
        if code:
            raise RuntimeError(lib.cuda_message(code))

    def backward():
        code = getattr(lib.lib, case.entry("fsl_cuda_logit_grad"))(
            *args, backend.pointer(d_g), backend.pointer(grad_out), stream)
        if code:
            raise RuntimeError(lib.cuda_message(code))

    t_copy = backend.time(lambda: backend.copy(copy_out, case.d_x, case.x.storage.nbytes), reps)
    t_fwd_async = backend.time(lambda: forward(False), reps)
    t_fwd_checked = backend.time(lambda: forward(True), reps)
    t_bwd = backend.time(backward, reps)
    copy_bandwidth = 2 * case.x.storage.nbytes / t_copy  # bytes read + written per second
    fwd_bytes = case.input_bytes()
    bwd_bytes = case.input_bytes() + case.x.storage.nbytes
    # Correctness at this size too: against the CPU kernel on the same inputs.
    t0 = time.perf_counter()
    cpu = base.cpu_stats(lib, case)
    t_cpu = time.perf_counter() - t0
    stats = np.frombuffer(backend.download(stats_out), np.float32).reshape(b, c, 8)
    report.check(base.stats_excess(stats, cpu.astype(np.float64), case.logits_dtype) <= 0 and
                 np.array_equal(stats[..., base.COUNT_COLUMNS], cpu[..., base.COUNT_COLUMNS]),
                 f"{name}: large forward matches the CPU kernel")
    row = (name, case.x.storage.size, t_copy * 1e3, copy_bandwidth / 1e9,
           t_fwd_async * 1e3, fwd_bytes / t_fwd_async / 1e9,
           (fwd_bytes / copy_bandwidth) / t_fwd_async, t_fwd_checked * 1e3,
           t_bwd * 1e3, bwd_bytes / t_bwd / 1e9, (bwd_bytes / copy_bandwidth) / t_bwd,
           t_cpu * 1e3)
    for handle in (stats_out, d_g, grad_out, copy_out):
        backend.free(handle)
    case.backend.free_all(case)
    return row


def print_table(rows):
    header = ("case", "elements", "copy ms", "copy GB/s", "fwd ms", "fwd GB/s", "fwd %floor",
              "fwd+chk ms", "bwd ms", "bwd GB/s", "bwd %floor", "cpu1t fwd ms")
    print("\nTiming (median of the repetitions; CUDA events). GB/s = bytes the kernel must "
          "move / time;\n%floor = (those bytes at the logits-copy bandwidth) / kernel time "
          "(100% = as fast as a copy).\nfwd = forward without the value check (asynchronous); "
          "fwd+chk = with it (stream sync + 32-byte readback).\ncpu1t = the CPU core, one "
          "thread, same library (for scale only).")
    widths = [26, 10, 8, 9, 8, 8, 10, 10, 8, 8, 10, 12]
    print(" ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        cells = [row[0], f"{row[1]:d}", f"{row[2]:.3f}", f"{row[3]:.0f}", f"{row[4]:.3f}",
                 f"{row[5]:.0f}", f"{100 * row[6]:.0f}%", f"{row[7]:.3f}", f"{row[8]:.3f}",
                 f"{row[9]:.0f}", f"{100 * row[10]:.0f}%", f"{row[11]:.0f}"]
        print(" ".join(c.rjust(w) for c, w in zip(cells, widths)))


def run(base, lib, backend, rng, report, quick=False, host_dry_run=False):
    rows = []
    for name, options in TIMING[:3] if quick else TIMING:
        if host_dry_run:  # the same cases, 1/64 of the elements
            shape = options["shape"]
            options = dict(options, shape=tuple(d // 8 if d > 200 else d for d in shape))
        rows.append(time_case(base, lib, backend, rng, name, 5 if quick else 20, report,
                              **options))
    print_table(rows)
