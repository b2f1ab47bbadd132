"""Finds and loads the compiled op library, or explains (once) why the reference is used."""
import glob
import json
import os
import warnings

import tensorflow as tf

BUILD_COMMAND = "python -m pip install --no-build-isolation <fused_segloss source tree or git URL>"
_HERE = os.path.dirname(os.path.abspath(__file__))
DISABLE_ENV = "FUSED_SEGLOSS_DISABLE_LIBRARY"


class FusedSeglossFallbackWarning(UserWarning):
    """The compiled library is unavailable; the pure-TF reference is used instead."""


class LibraryStatus:
    def __init__(self, module=None, path=None, reason="", build_info=None):
        self.module = module
        self.path = path
        self.reason = reason
        self.build_info = build_info or {}

    @property
    def available(self):
        return self.module is not None

    def __repr__(self):
        if self.available:
            return f"LibraryStatus(available, path={self.path!r}, build={self.build_info})"
        return f"LibraryStatus(unavailable: {self.reason})"


def _find_library():
    found = sorted(glob.glob(os.path.join(_HERE, "_segloss_ops*.so")))
    return found[0] if found else None


def _read_build_info():
    try:
        with open(os.path.join(_HERE, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load_library():
    """Returns a LibraryStatus; never raises."""
    if os.environ.get(DISABLE_ENV):
        return LibraryStatus(reason=f"disabled by the environment variable {DISABLE_ENV}")
    path = _find_library()
    if path is None:
        reason = f"the compiled op library (_segloss_ops*.so) is not in {_HERE}"
        if os.path.exists(os.path.join(_HERE, os.pardir, "setup.py")):
            # `python -m` inside a clone imports the source folder, not an installed copy.
            reason += (" (this is the source tree: run from another directory to use the "
                       "installed package, or install it editable with -e)")
        return LibraryStatus(reason=reason)
    info = _read_build_info()
    built_for = info.get("tensorflow_version")
    if built_for and built_for != tf.__version__:
        return LibraryStatus(path=path, build_info=info, reason=(
            f"the op library was built for TensorFlow {built_for} but TensorFlow "
            f"{tf.__version__} is installed; rebuild it"))
    try:
        module = tf.load_op_library(path)
    except Exception as exc:  # noqa: BLE001 - any load failure means: use the reference
        return LibraryStatus(path=path, build_info=info,
                             reason=f"loading {os.path.basename(path)} failed: {exc}")
    return LibraryStatus(module=module, path=path, build_info=info)


_STATUS = None
_WARNED = False


def status():
    global _STATUS
    if _STATUS is None:
        _STATUS = load_library()
    return _STATUS


def warn_fallback_once():
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"fused_segloss: using the pure-TF reference because {status().reason}. "
            f"To build the fused kernels: {BUILD_COMMAND}",
            FusedSeglossFallbackWarning, stacklevel=3)


def _reset_for_tests(new_status=None):
    """Test hook: replace the cached status (None reloads on next use)."""
    global _STATUS, _WARNED
    _STATUS, _WARNED = new_status, False
