// The operand rules of segloss_operands.h: the framework adapters' shapes and pointers
// -> SeglossProblem (the [B, N, C] / [B, C, N] view, the canonical weights view,
// pos_weight), and the grad_stats shape check. Every message names the argument.
#include "segloss_operands.h"

namespace fused_segloss {

std::string ShapeString(const int64_t* dims, int rank) {
  std::string s = "[";
  for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

std::string ProblemFromOperands(const OperandView& logits, const OperandView& labels,
                                const OperandView& weights, const OperandView& pos_weight,
                                const ProblemOptions& options, SeglossProblem* p) {
  const bool channels_last = options.channels_last;
  const bool softmax = options.activation == Activation::kSoftmax;
  const int rank = logits.rank;
  if (rank < 2 || rank > 5) {
    return "`logits` must have rank 2 to 5 ([B, *spatial, C] or [B, C, *spatial] with 0 to 3 "
           "spatial dims), got shape " + ShapeString(logits.dims, rank);
  }
  const int class_axis = channels_last ? rank - 1 : 1;
  bool same = labels.rank == rank;
  for (int d = 0; same && d < rank; ++d) same = labels.dims[d] == logits.dims[d];
  // Sparse: the logits' dims without the class axis.
  bool sparse = softmax && labels.rank == rank - 1;
  for (int d = 0, l = 0; sparse && d < rank; ++d) {
    if (d != class_axis) sparse = labels.dims[l++] == logits.dims[d];
  }
  if (!same && !sparse) {
    return "`labels` shape " + ShapeString(labels.dims, labels.rank) +
           " must equal the `logits` shape " + ShapeString(logits.dims, rank) +
           (softmax ? " (dense) or be that shape without the class axis (sparse class ids)" : "");
  }
  const bool id_dtype = p->labels_dtype == DType::kInt32 || p->labels_dtype == DType::kInt64 ||
                        (sparse && p->labels_dtype == DType::kUInt8);
  if (sparse != id_dtype) {
    if (sparse) {
      return std::string("sparse `labels` (class ids) must be uint8, int32 or int64, got ") +
             DTypeName(p->labels_dtype);
    }
    if (!softmax) {
      return std::string("`labels` must be a float type, uint8 or bool, got ") +
             DTypeName(p->labels_dtype) + " (class ids need activation='softmax')";
    }
    return std::string("`labels` of dtype ") + DTypeName(p->labels_dtype) +
           " are class ids: their shape must be the logits' without the class axis (dense "
           "labels: a float type, uint8 or bool)";
  }
  // The options softmax mode excludes are ValidateProblem's (the last step here).
  p->activation = options.activation;
  p->sparse_labels = sparse;
  p->has_ignore_index = options.has_ignore_index;
  p->ignore_index = options.ignore_index;
  p->focal = options.focal;
  const bool squared = options.squared;
  p->shape.channels_last = channels_last;
  p->shape.batch = logits.dims[0];
  p->shape.classes = logits.dims[class_axis];
  p->shape.positions = 1;
  for (int d = 1; d < rank; ++d) {
    if (d != class_axis) p->shape.positions *= logits.dims[d];
  }
  p->logits = logits.data;
  p->labels = labels.data;

  if (weights.rank == 1 && weights.dims[0] == 0) {
    p->weights = nullptr;  // absent
  } else if (weights.rank == 3) {
    // May be null for a zero-size view; ValidateProblem still checks its dims.
    p->weights = static_cast<const float*>(weights.data);
    p->weights_batch = weights.dims[0];
    p->weights_positions = weights.dims[channels_last ? 1 : 2];
    p->weights_classes = weights.dims[channels_last ? 2 : 1];
  } else {
    return "`weights` must be the rank-3 canonical view [Bw, Nw, Cw] or an empty vector, got "
           "shape " + ShapeString(weights.dims, weights.rank);
  }

  if (pos_weight.rank == 0) {
    p->pos_weight = nullptr;  // absent
  } else if (pos_weight.rank == 1 && pos_weight.dims[0] == p->shape.classes) {
    p->pos_weight = static_cast<const float*>(pos_weight.data);
  } else {
    return "`pos_weight` must have shape [C] = [" + std::to_string(p->shape.classes) +
           "], got " + ShapeString(pos_weight.dims, pos_weight.rank);
  }
  p->squared = squared;
  return ValidateProblem(*p);
}

std::string CheckGradStatsShape(const SeglossProblem& p, const int64_t* dims, int rank) {
  const int64_t expected[3] = {p.shape.batch, p.shape.classes, kNumStats};
  if (rank != 3 || dims[0] != expected[0] || dims[1] != expected[1] || dims[2] != expected[2]) {
    return "`grad_stats` must have shape " + ShapeString(expected, 3) + ", got " +
           ShapeString(dims, rank);
  }
  return "";
}

}  // namespace fused_segloss
