"""Label bytes (LabelBytes in csrc/core/segloss_cpu.h): the CPU forward that also writes
float labels as one byte each, and the gradient pass that reads them instead.

The claim is exactness, so every comparison is bit for bit against the plain ops: the same
statistics, the same gradient, whether the bytes were written or not; the bytes themselves
against NumPy's (labels == 1); soft labels (any value other than 0 and 1) must leave them
unwritten. The kernels' size threshold is lowered to 0 (the op's min_input_bytes attribute)
so that small, odd shapes reach every head/tail case of the byte loop; one test runs the
default threshold at its boundary."""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
from fused_segloss import _inputs, ops

CASES = [
    dict(batch=3, spatial=(129, 127), classes=5),
    dict(batch=2, spatial=(131, 97), classes=3, data_format="channels_first"),
    dict(batch=2, spatial=(1023,), classes=1),
    dict(batch=1, spatial=(9, 7, 5), classes=17, weights="pixel", pos_weight=True),
    dict(batch=2, spatial=(333,), classes=4, labels_dtype="float16", squared=True),
    dict(batch=2, spatial=(333,), classes=4, labels_dtype="bfloat16", weights="full"),
    dict(batch=2, spatial=(61, 3), classes=6, labels_dtype="float64",
         logits_dtype="bfloat16"),
    dict(batch=2, spatial=(47, 45), classes=2, logits_dtype="float16",
         data_format="channels_first", weights="image"),
]
IDS = ["f32-cl-C5", "f32-cf-C3", "f32-C1", "f32-3d-C17-pixel-pw", "f16-labels-squared",
       "bf16-labels-full", "f64-labels-bf16-logits", "f16-logits-cf-image"]


def _op_inputs(prob):
    """The four op inputs and attributes, prepared as ops.segloss_stats prepares them."""
    p = _inputs.prepare(prob.logits, prob.labels, prob.weights, prob.pos_weight,
                        prob.data_format, prob.squared)
    inputs = (p.logits, p.labels, _inputs.canonical_weights(p), _inputs.pos_weight_or_empty(p))
    return inputs, dict(data_format=p.data_format, squared=p.squared)


def _with_bytes(inputs, attrs, min_input_bytes=0):
    return ops.library().fused_segloss_stats_with_label_bytes(
        *inputs, **attrs, min_input_bytes=min_input_bytes)


@pytest.mark.parametrize("options", CASES, ids=IDS)
def test_bytes_and_gradient_equal_the_plain_ops_bit_for_bit(options, problem, rng):
    prob = problem(**options)
    inputs, attrs = _op_inputs(prob)
    lib = ops.library()
    stats, label_bytes = _with_bytes(inputs, attrs)
    np.testing.assert_array_equal(stats.numpy(), lib.fused_segloss_stats(*inputs, **attrs))
    assert label_bytes.dtype == tf.uint8 and label_bytes.shape == prob.labels.shape
    expected = (prob.labels.astype(np.float64) == 1.0).astype(np.uint8)
    np.testing.assert_array_equal(label_bytes.numpy(), expected)
    grad_stats = tf.constant(rng.normal(0.0, 1.0, stats.shape).astype(np.float32))
    plain = lib.fused_segloss_stats_grad(*inputs, grad_stats, **attrs).numpy()
    logits, labels, weights, pos_weight = inputs
    from_bytes = lib.fused_segloss_stats_grad_with_label_bytes(
        logits, labels, label_bytes, weights, pos_weight, grad_stats, **attrs).numpy()
    assert from_bytes.dtype == plain.dtype
    np.testing.assert_array_equal(from_bytes, plain)


@pytest.mark.parametrize("labels_dtype", ["float32", "float16", "bfloat16", "float64"])
def test_one_soft_label_leaves_the_bytes_unwritten(labels_dtype, problem, rng):
    """A single label other than 0 and 1 empties the bytes, wherever it is: the positions
    cover the byte loop's scalar head (up to a 64-byte line of the output), its 64-label
    vector body and its tail, in both images (each image is its own work item, the second
    starting at a byte offset that is not a multiple of 64). The gradient op then reads the
    labels and still equals the plain op."""
    prob = problem(batch=2, spatial=(257,), classes=5, labels_dtype="float32")
    lib = ops.library()
    size = prob.labels.size  # 2 x 1285: image 1 starts at 1285 = 20 * 64 + 5
    for position in (0, 63, 64, 100, 1279, 1284, 1285, 1288, 1344, 1400, 2563, size - 1):
        labels = prob.labels.astype(np.float64)
        labels.reshape(-1)[position] = 0.5
        soft = prob._replace(labels=tf.constant(labels, tf.as_dtype(labels_dtype)).numpy())
        inputs, attrs = _op_inputs(soft)
        stats, label_bytes = _with_bytes(inputs, attrs)
        assert label_bytes.shape == (0,), f"soft label at {position} not seen"
        np.testing.assert_array_equal(stats.numpy(), lib.fused_segloss_stats(*inputs, **attrs))
    grad_stats = tf.constant(rng.normal(0.0, 1.0, stats.shape).astype(np.float32))
    logits, labels_t, weights, pos_weight = inputs
    np.testing.assert_array_equal(
        lib.fused_segloss_stats_grad_with_label_bytes(logits, labels_t, label_bytes, weights,
                                                      pos_weight, grad_stats, **attrs),
        lib.fused_segloss_stats_grad(*inputs, grad_stats, **attrs))


def test_a_float64_label_next_to_one_is_not_binary(problem):
    """Compared in the labels' own precision: 1 - 1e-12 is a soft label in float64 even
    though it rounds to 1 in float32."""
    prob = problem(batch=1, spatial=(100,), classes=3, labels_dtype="float64")
    labels = prob.labels.copy()
    labels[0, 50, 1] = 1.0 - 1e-12
    inputs, attrs = _op_inputs(prob._replace(labels=labels))
    assert _with_bytes(inputs, attrs)[1].shape == (0,)


def test_default_threshold_boundary(rng):
    """The default min_input_bytes (32 MiB of logits + labels): exactly at it the bytes are
    written, one image row below it they are not."""
    assert ops.label_bytes_min_input_bytes == 32 << 20
    for width, written in ((1024, True), (1023, False)):
        shape = (1, 1024, width, 4)  # float32 logits + labels: 32 MiB at width 1024
        logits = tf.constant(rng.normal(0.0, 2.0, shape).astype(np.float32))
        labels = tf.constant((rng.random(shape) < 0.3).astype(np.float32))
        inputs = (logits, labels, tf.zeros([0]), tf.zeros([]))
        _, label_bytes = ops.library().fused_segloss_stats_with_label_bytes(*inputs)
        assert (label_bytes.shape == shape) is written, (width, label_bytes.shape)
        if written:
            np.testing.assert_array_equal(label_bytes.numpy(), labels.numpy().astype(np.uint8))


def test_wrong_label_bytes_name_the_argument(problem):
    prob = problem(batch=2, spatial=(9,), classes=3)
    (logits, labels, weights, pos_weight), attrs = _op_inputs(prob)
    wrong = tf.zeros([2, 9, 2], tf.uint8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="label_bytes"):
        ops.library().fused_segloss_stats_grad_with_label_bytes(
            logits, labels, wrong, weights, pos_weight, tf.zeros([2, 3, 8]), **attrs)


def test_invalid_labels_still_raise(problem):
    prob = problem(batch=2, spatial=(9,), classes=3)
    labels = prob.labels.copy()
    labels[1, 4, 2] = 1.5
    inputs, attrs = _op_inputs(prob._replace(labels=labels))
    with pytest.raises(tf.errors.InvalidArgumentError, match="`labels` must lie in"):
        _with_bytes(inputs, attrs)


def test_one_byte_labels_are_not_accepted(problem):
    """uint8 and bool labels are one byte already: the op's type constraint refuses them."""
    prob = problem(batch=2, spatial=(9,), classes=3, labels_dtype="uint8")
    inputs, attrs = _op_inputs(prob)
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError)):
        _with_bytes(inputs, attrs)


class _Recorder:
    """ops.library() whose op calls are recorded by name."""

    def __init__(self, library):
        self.library, self.calls = library, []

    def __getattr__(self, name):
        op = getattr(self.library, name)
        if not name.startswith("fused_segloss"):
            return op

        def call(*args, **kwargs):
            self.calls.append(name)
            return op(*args, **kwargs)
        return call


@pytest.fixture
def low_threshold(monkeypatch):
    """The kernels write bytes at any size; skips where seg_loss does not use them at all."""
    if not ops.label_bytes_wanted(tf.constant([0.0])):
        pytest.skip("label bytes are off here (a GPU is visible, or FUSED_SEGLOSS_LABEL_BYTES=0)")
    monkeypatch.setattr(ops, "label_bytes_min_input_bytes", 0)


def _loss_and_grad(prob, **options):
    logits = tf.constant(prob.logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = fsl.seg_loss(logits, prob.labels, prob.weights, prob.pos_weight,
                            data_format=prob.data_format, squared=prob.squared,
                            implementation="fused", **options)
    return loss.numpy(), tape.gradient(loss, logits).numpy()


@pytest.mark.parametrize("options", [{}, dict(check_numerics=True)], ids=["eager", "op-by-op"])
@pytest.mark.parametrize("case", [0, 1, 3], ids=[IDS[0], IDS[1], IDS[3]])
def test_seg_loss_eager_uses_the_bytes_and_equals_them_off(case, options, problem,
                                                           monkeypatch, low_threshold):
    """The eager fused path (and the op-by-op path that check_numerics takes) under a tape
    uses the bytes ops; loss and gradient equal those with label bytes turned off."""
    prob = problem(**CASES[case])
    recorder = _Recorder(ops.library())
    monkeypatch.setattr(ops, "library", lambda: recorder)
    with_bytes = _loss_and_grad(prob, **options)
    assert "fused_segloss_stats_with_label_bytes" in recorder.calls, recorder.calls
    assert "fused_segloss_stats_grad_with_label_bytes" in recorder.calls, recorder.calls
    monkeypatch.setattr(ops, "label_bytes_enabled", False)
    recorder.calls.clear()
    without = _loss_and_grad(prob, **options)
    assert not any("label_bytes" in name for name in recorder.calls), recorder.calls
    assert with_bytes[0] == without[0]
    np.testing.assert_array_equal(with_bytes[1], without[1])


def test_graph_uses_the_bytes_only_under_a_tape(problem, low_threshold):
    prob = problem(**CASES[0])
    logits, labels = tf.constant(prob.logits), tf.constant(prob.labels)

    @tf.function
    def step(x, z):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = fsl.seg_loss(x, z, implementation="fused")
        return loss, tape.gradient(loss, x)

    @tf.function
    def forward_only(x, z):
        return fsl.seg_loss(x, z, implementation="fused")

    def op_types(fn):
        graph = fn.get_concrete_function(logits, labels).graph
        return {op.type for op in graph.get_operations() if op.type.startswith("FusedSegloss")}

    assert op_types(step) == {"FusedSeglossStatsWithLabelBytes",
                              "FusedSeglossStatsGradWithLabelBytes"}
    assert op_types(forward_only) == {"FusedSeglossStats"}
    loss, grad = step(logits, labels)
    eager_loss, eager_grad = _loss_and_grad(prob)
    assert loss.numpy() == eager_loss
    np.testing.assert_array_equal(grad.numpy(), eager_grad)
