"""Peak extra memory of one loss step (forward+backward), measured in a fresh process per path.

The child (this module's __main__) builds the inputs and the step, runs it twice (tracing,
compilation and TF's one-off allocations are not counted), hands freed heap back to the OS
(glibc malloc_trim), resets the kernel's peak-RSS mark (writes 5 to /proc/self/clear_refs),
runs the step again, its outputs kept alive, and reads VmHWM: peak extra = VmHWM - RSS just
before that step, the gradient included. Its environment makes freed memory leave the
process rather than wait in a pool the measured step would reuse unseen: TF's oneDNN
allocator on malloc (TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1), glibc's mmap threshold at 64 KiB,
and the fused gradient's buffer reuse off (FUSED_SEGLOSS_REUSE_GRAD_BUFFERS=0, its
documented switch), so every path's gradient is a fresh allocation; the same kernels run.
"""
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile

CHILD_ENV = {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
             "FUSED_SEGLOSS_REUSE_GRAD_BUFFERS": "0"}


def status_kib(field):
    with open("/proc/self/status") as f:
        return int(next(ln.split()[1] for ln in f if ln.startswith(field + ":")))


class Child:
    """`python -m module json(request)` with quiet TF logs; it answers in JSON lines."""

    def __init__(self, module, request, env=None):
        self.err = tempfile.TemporaryFile("w+")  # a file: a full pipe would block the child
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ, **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", module, json.dumps(request)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=env, text=True)

    def read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.proc.wait()
        self.err.seek(0)
        tail = " | ".join(self.err.read().strip().splitlines()[-3:])
        raise RuntimeError(f"exit {self.proc.returncode}: {tail}")

    def ask(self, line):
        self.proc.stdin.write(f"{line}\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        """Ends the child's input and returns its last answer."""
        self.proc.stdin.close()
        reply = self.read()
        self.proc.wait()
        return reply


def measure(label, shape):
    """The probe's {peak_extra_bytes, x_logits}, or {error}."""
    try:
        return Child(__name__, {"label": label, "shape": list(shape)}, CHILD_ENV).close()
    except RuntimeError as exc:
        return {"error": str(exc)}


def _probe(label, shape):
    from . import loss

    inputs = loss.make_inputs(shape)
    step = loss.make_step(label, shape)
    step(*inputs), step(*inputs)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError) as exc:
        return {"error": f"needs Linux and glibc: {exc}"}
    before = status_kib("VmRSS")
    outputs = step(*inputs)  # alive until VmHWM is read: the gradient counts
    extra = (status_kib("VmHWM") - before) * 1024
    return {"peak_extra_bytes": extra, "x_logits": extra / (4 * shape.elements),
            "loss": outputs[0]}


if __name__ == "__main__":
    from .loss import Shape

    request = json.loads(sys.argv[1])
    print(json.dumps(_probe(request["label"], Shape(*request["shape"]))), flush=True)
