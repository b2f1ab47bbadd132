"""Peak extra memory of one benchmark step, measured in a fresh process.

Parent side: `measure(path, direction, shape)` starts `python -m fused_segloss._bench_memory`
and reads the one JSON line it prints. Child side (this module's __main__):

1. import TensorFlow and fused_segloss, build the inputs, run the step twice (tracing, XLA
   compilation, TF's one-off allocations happen here and are not counted);
2. release freed heap pages to the OS (glibc malloc_trim), so that memory freed by the
   warm-up cannot silently be reused by the measured step and hide its footprint;
3. reset the kernel's peak-RSS counter (write "5" to /proc/self/clear_refs, Linux >= 4.0),
   read the current RSS as the baseline, run the step once keeping its outputs alive, and
   read the peak (VmHWM). Peak extra = VmHWM - baseline: every page the step touched beyond
   what the process already held, the outputs (the gradient) included.

The child runs with TF's oneDNN allocator switched to malloc and a fixed glibc mmap threshold
(see SYSTEM_ALLOCATOR_ENV below for why). Where clear_refs cannot be written, VmRSS is
sampled every 0.2 ms from a thread during the step instead (TF releases the GIL while it
computes); the JSON records which method was used.
"""
import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time

from . import _bench_paths as bp

# TF's default CPU allocator (oneDNN builds) keeps freed blocks in a pool sized by the largest
# step so far, so after the warm-up a step never grows RSS and every path would read ~0.
# With oneDNN's system-allocator switch TF allocates with malloc, freed blocks go back to the
# OS (after malloc_trim), and the RSS peak of the measured step is that step's own footprint,
# which is what the default pool must hold for it. The kernels run are the same either way.
# glibc then serves every block of 64 KiB or more from its own mapping, returned to the OS on
# free (a fixed threshold: glibc's default one adapts upwards as blocks are freed, and freed
# heap blocks re-used by the measured step would hide part of its footprint at small sizes).
SYSTEM_ALLOCATOR_ENV = "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
# The fused CPU gradient kernel keeps its idle output buffers for the next call
# (csrc/tf/gradient_buffer_cache.h); that memory would sit in the baseline after the warm-up
# and the measured step would read ~0 for the gradient. Reuse is off in the probe, so the
# gradient's allocation is counted as every other path's is.
REUSE_GRAD_BUFFERS_ENV = "FUSED_SEGLOSS_REUSE_GRAD_BUFFERS"
METHOD_CLEAR_REFS = "VmHWM after clear_refs"
METHOD_SAMPLED = "VmRSS sampled every 0.2 ms"


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _release_free_heap():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed pages may stay resident; the baseline then includes them


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_of(run):
    """(peak extra bytes, method) of calling run() once."""
    _release_free_heap()
    if _reset_peak():
        baseline = _status_kib("VmRSS")
        outputs = run()
        peak = _status_kib("VmHWM")
        del outputs
        return (peak - baseline) * 1024, METHOD_CLEAR_REFS
    baseline = _status_kib("VmRSS")
    highest = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            highest[0] = max(highest[0], _status_kib("VmRSS"))
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outputs = run()
    highest[0] = max(highest[0], _status_kib("VmRSS"))
    done.set()
    sampler.join()
    del outputs
    return (highest[0] - baseline) * 1024, METHOD_SAMPLED


def probe(path, direction, shape: bp.CaseShape):
    """Runs in the child: returns the JSON-ready measurement."""
    spec = bp.PATHS[path]
    inputs = bp.make_inputs(shape)
    step = bp.make_step(spec, direction, shape.layout)
    for _ in range(2):
        bp.run_step(step, inputs)
    label = spec.label
    if spec.mode == "xla":
        label = bp.xla_label(spec, bp.compiled_custom_calls(step, inputs))
    extra, method = _peak_of(lambda: bp.run_step(step, inputs))
    return {"path": path, "label": label, "direction": direction, **shape._asdict(),
            "logits_bytes": bp.logits_bytes(shape), "peak_extra_bytes": extra,
            "x_logits": extra / bp.logits_bytes(shape), "method": method,
            "allocator": {name: os.environ.get(name, "unset")
                          for name in (SYSTEM_ALLOCATOR_ENV, MMAP_THRESHOLD_ENV,
                                       REUSE_GRAD_BUFFERS_ENV)}}


def measure(path, direction, shape: bp.CaseShape, timeout=600):
    """Runs probe() in a fresh Python process; returns its dict, or one with an "error"."""
    cmd = [sys.executable, "-m", "fused_segloss._bench_memory", "--path", path,
           "--direction", direction, "--batch", str(shape.batch), "--size", str(shape.size),
           "--classes", str(shape.classes), "--layout", shape.layout,
           "--logits-dtype", shape.logits_dtype, "--labels-dtype", shape.labels_dtype]
    if shape.weights:
        cmd.append("--weights")
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault(SYSTEM_ALLOCATOR_ENV, "1")
    env.setdefault(MMAP_THRESHOLD_ENV, "65536")
    env[REUSE_GRAD_BUFFERS_ENV] = "0"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"path": path, "direction": direction, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"path": path, "direction": direction,
                "error": f"exit {done.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, choices=sorted(bp.PATHS))
    parser.add_argument("--direction", required=True, choices=bp.DIRECTIONS)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--layout", default="channels_last", choices=bp.LAYOUTS)
    parser.add_argument("--logits-dtype", default="float32", choices=bp.LOGIT_DTYPES)
    parser.add_argument("--labels-dtype", default="float32", choices=bp.LABEL_DTYPES)
    parser.add_argument("--weights", action="store_true")
    args = parser.parse_args(argv)
    shape = bp.CaseShape(args.batch, args.size, args.classes, args.layout, args.logits_dtype,
                         args.labels_dtype, args.weights)
    print(json.dumps(probe(args.path, args.direction, shape)), flush=True)


if __name__ == "__main__":
    main()
