"""Device memory, a stream and event timing for check_gpu.py, from CuPy or PyTorch.

Arrays cross as raw bytes (uint8 device buffers), so every kernel dtype (bfloat16 and
bool included) travels the same way and neither library's dtype support matters. Work
runs on a non-default stream of the library's own, which the launchers receive as their
cudaStream_t.
"""
import statistics

import numpy as np


def _raw_bytes(array):
    return np.ascontiguousarray(array).view(np.uint8).reshape(-1)


class _CudaEventBackend:
    """Timing and release shared by the CuPy and PyTorch backends. A subclass provides
    self._stream, synchronize(), _event(), _seconds_between(start, end) and
    _release_cached_memory()."""

    def time(self, fn, reps):
        """Median seconds of fn() over reps, by CUDA events on the stream (after 2 warm-ups)."""
        for _ in range(2):
            fn()
        times = []
        for _ in range(reps):
            start, end = self._event(), self._event()
            start.record(self._stream)
            fn()
            end.record(self._stream)
            end.synchronize()
            times.append(self._seconds_between(start, end))
        return statistics.median(times)

    def free(self, handle):
        del handle

    def free_all(self, case):
        case.d_x = case.d_z = case.d_w = case.d_pw = None
        self.synchronize()
        self._release_cached_memory()


class CupyBackend(_CudaEventBackend):
    name = "cupy"

    def __init__(self):
        import cupy

        self.cp = cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._stream.use()

    def describe(self):
        rt = self.cp.cuda.runtime
        props = rt.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return (f"{name}, sm_{props['major']}{props['minor']}, "
                f"{props['totalGlobalMem'] / 2**30:.0f} GiB, driver API {rt.driverGetVersion()}, "
                f"CuPy {self.cp.__version__} (runtime {rt.runtimeGetVersion()})")

    def upload(self, array):
        return self.cp.asarray(_raw_bytes(array))

    def empty(self, nbytes):
        return self.cp.empty(max(int(nbytes), 1), self.cp.uint8)

    def pointer(self, handle):
        return handle.data.ptr

    def download(self, handle):
        self.synchronize()
        return self.cp.asnumpy(handle).tobytes()

    def stream(self):
        return self._stream.ptr

    def synchronize(self):
        self._stream.synchronize()

    def copy(self, dst, src, nbytes):
        self.cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes,
                                         self.cp.cuda.runtime.memcpyDeviceToDevice,
                                         self._stream.ptr)

    def _event(self):
        return self.cp.cuda.Event()

    def _seconds_between(self, start, end):
        return self.cp.cuda.get_elapsed_time(start, end) / 1e3

    def _release_cached_memory(self):
        self.cp.get_default_memory_pool().free_all_blocks()


class TorchBackend(_CudaEventBackend):
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False")
        self._stream = torch.cuda.Stream()
        torch.cuda.set_stream(self._stream)

    def describe(self):
        t = self.torch
        props = t.cuda.get_device_properties(0)
        return (f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                f"PyTorch {t.__version__} (CUDA {t.version.cuda})")

    def upload(self, array):
        host = self.torch.from_numpy(_raw_bytes(array).copy())
        return host.to("cuda")

    def empty(self, nbytes):
        return self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device="cuda")

    def pointer(self, handle):
        return handle.data_ptr()

    def download(self, handle):
        self.synchronize()
        return handle.cpu().numpy().tobytes()

    def stream(self):
        return self._stream.cuda_stream

    def synchronize(self):
        self._stream.synchronize()

    def copy(self, dst, src, nbytes):
        dst[:nbytes].copy_(src[:nbytes])

    def _event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def _seconds_between(self, start, end):
        return start.elapsed_time(end) / 1e3

    def _release_cached_memory(self):
        self.torch.cuda.empty_cache()


class HostDryRunBackend:
    """check_gpu.py --host-dry-run: host memory and wall-clock timing, no GPU."""
    name = "host-dry-run"

    def describe(self):
        return "none (host dry run)"

    def upload(self, array):
        return _raw_bytes(array).copy()

    def empty(self, nbytes):
        return np.zeros(max(int(nbytes), 1), np.uint8)

    def pointer(self, handle):
        return handle.ctypes.data

    def download(self, handle):
        return handle.tobytes()

    def stream(self):
        return None

    def synchronize(self):
        pass

    def copy(self, dst, src, nbytes):
        dst[:nbytes] = src[:nbytes]

    def time(self, fn, reps):
        import time
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def free(self, handle):
        del handle

    def free_all(self, case):
        case.d_x = case.d_z = case.d_w = case.d_pw = None


def find_backend(preferred=None):
    """(backend, None) for the first usable library, else (None, why none is usable)."""
    reasons = []
    for cls in (CupyBackend, TorchBackend):
        if preferred and cls.name != preferred:
            continue
        try:
            return cls(), None
        except ImportError as error:
            reasons.append(f"{cls.name} not importable ({error})")
        except Exception as error:  # noqa: BLE001 - any failure means "this one cannot run"
            reasons.append(f"{cls.name}: {type(error).__name__}: {error}")
    return None, "; ".join(reasons) or "no backend requested"
