"""tf.distribute: make every replica's loss the loss of the *global* batch.

The Dice of a batch is not a mean of per-sample values, so a replica cannot compute its
share from its own images. Each replica therefore exchanges the tiny statistics
(never the logits) and combines the global ones:

  dice_mode="batch":     all_reduce(SUM) of the [1, C, 8] batch totals (combine only uses
                         the totals in this mode), 8*C floats per step.
  dice_mode="per_image": all_gather of the [B_r, C, 8] per-image rows, so the class and
                         image means, `empty="exclude"` and the CE normalisation by the
                         global weight sum are all exact.

Gradients: the exchanged values enter under stop_gradient, and the replica's own rows are
added back as (local - stop_gradient(local)), whose value is exactly 0. Replica r's loss
thus has the global value L, and its gradient is dL/dstats_r . dstats_r/dθ; Keras sums the
replicas' gradients (all-reduce SUM), which gives exactly dL/dθ of the global batch.

Keras' convention is that the replicas' loss values *sum* to the global loss (its own
losses divide a per-replica mean by the number of replicas, and the loss tracker
multiplies back for logging); `split_for_replicas` returns L / R with the gradient of L.
"""
import tensorflow as tf


def replica_context_with_peers():
    """The replica context when there is more than one replica in sync, else None."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def _with_local_gradient(global_value, local_part_with_gradient):
    """global_value + (local - stop_gradient(local)): the value of global, the gradient of local."""
    return tf.stop_gradient(global_value) + (
        local_part_with_gradient - tf.stop_gradient(local_part_with_gradient))


def global_stats(stats, dice_mode, context):
    """Stats whose combine() is the global batch's loss, differentiable through this replica's rows."""
    if dice_mode == "batch":
        local_totals = tf.reduce_sum(stats, axis=0, keepdims=True)  # [1, C, 8]
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(local_totals))
        return _with_local_gradient(summed, local_totals)

    gathered = context.all_gather(tf.stop_gradient(stats), axis=0)  # [B_global, C, 8], replica order
    sizes = context.all_gather(tf.shape(stats, out_type=tf.int32)[:1], axis=0)  # [R]
    replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
    before = tf.reduce_sum(sizes[:replica_id])
    after = tf.reduce_sum(sizes) - before - sizes[replica_id]
    placed = tf.pad(stats, [[before, after], [0, 0], [0, 0]])  # this replica's rows, zeros elsewhere
    return _with_local_gradient(gathered, placed)


def split_for_replicas(total, context):
    """Value total / R (Keras' per-replica convention), gradient of the full total."""
    replicas = context.num_replicas_in_sync
    return tf.stop_gradient(total) / float(replicas) + (total - tf.stop_gradient(total))
