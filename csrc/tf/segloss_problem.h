// Builds the framework-free SeglossProblem from the op's input tensors, with every
// shape check of the TF entry point in one place (shared by the CPU and GPU kernels).
#pragma once

#include <string>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "segloss_cpu.h"

namespace fused_segloss_tf {

inline absl::Status ToCoreDType(tensorflow::DataType dtype, const char* arg,
                                fused_segloss::DType* out) {
  using fused_segloss::DType;
  switch (dtype) {
    case tensorflow::DT_FLOAT: *out = DType::kFloat32; return absl::OkStatus();
    case tensorflow::DT_DOUBLE: *out = DType::kFloat64; return absl::OkStatus();
    case tensorflow::DT_HALF: *out = DType::kFloat16; return absl::OkStatus();
    case tensorflow::DT_BFLOAT16: *out = DType::kBFloat16; return absl::OkStatus();
    case tensorflow::DT_UINT8: *out = DType::kUInt8; return absl::OkStatus();
    case tensorflow::DT_BOOL: *out = DType::kBool; return absl::OkStatus();
    default: break;
  }
  return tensorflow::errors::InvalidArgument("FusedSegloss: unsupported dtype for `", arg,
                                             "`: ", tensorflow::DataTypeString(dtype));
}

// ctx inputs: logits, labels, weights, pos_weight (in that order).
inline absl::Status ProblemFromInputs(tensorflow::OpKernelContext* ctx, bool channels_last,
                                      bool squared, fused_segloss::SeglossProblem* p) {
  const tensorflow::Tensor& logits = ctx->input(0);
  const tensorflow::Tensor& labels = ctx->input(1);
  const tensorflow::Tensor& weights = ctx->input(2);
  const tensorflow::Tensor& pos_weight = ctx->input(3);
  const int rank = logits.dims();
  if (rank < 2 || rank > 5) {
    return tensorflow::errors::InvalidArgument(
        "FusedSegloss: `logits` must have rank 2 to 5 ([B, *spatial, C] or [B, C, *spatial] "
        "with 0 to 3 spatial dims), got shape ", logits.shape().DebugString());
  }
  if (labels.shape() != logits.shape()) {
    return tensorflow::errors::InvalidArgument(
        "FusedSegloss: `labels` shape ", labels.shape().DebugString(),
        " must equal the `logits` shape ", logits.shape().DebugString());
  }
  p->shape.channels_last = channels_last;
  p->shape.batch = logits.dim_size(0);
  p->shape.classes = logits.dim_size(channels_last ? rank - 1 : 1);
  p->shape.positions = 1;
  for (int d = 1; d < rank; ++d) {
    if (d != (channels_last ? rank - 1 : 1)) p->shape.positions *= logits.dim_size(d);
  }
  TF_RETURN_IF_ERROR(ToCoreDType(logits.dtype(), "logits", &p->logits_dtype));
  TF_RETURN_IF_ERROR(ToCoreDType(labels.dtype(), "labels", &p->labels_dtype));
  p->logits = logits.data();
  p->labels = labels.data();
  if (weights.NumElements() == 0 && weights.dims() == 1) {
    p->weights = nullptr;
  } else if (weights.dims() == 3) {
    p->weights = weights.flat<float>().data();
    p->weights_batch = weights.dim_size(0);
    p->weights_positions = weights.dim_size(channels_last ? 1 : 2);
    p->weights_classes = weights.dim_size(channels_last ? 2 : 1);
  } else {
    return tensorflow::errors::InvalidArgument(
        "FusedSegloss: `weights` must be a rank-3 canonical view [Bw, Nw, Cw] or an empty "
        "vector, got shape ", weights.shape().DebugString());
  }
  if (pos_weight.NumElements() == 0) {
    p->pos_weight = nullptr;
  } else if (pos_weight.dims() == 1 && pos_weight.dim_size(0) == p->shape.classes) {
    p->pos_weight = pos_weight.flat<float>().data();
  } else {
    return tensorflow::errors::InvalidArgument(
        "FusedSegloss: `pos_weight` must have shape [C] = [", p->shape.classes,
        "], got ", pos_weight.shape().DebugString());
  }
  p->squared = squared;
  const std::string error = fused_segloss::ValidateProblem(*p);
  if (!error.empty()) return tensorflow::errors::InvalidArgument("FusedSegloss: ", error);
  return absl::OkStatus();
}

}  // namespace fused_segloss_tf
