// Builds the framework-free SeglossProblem from the op's input tensors, with every
// shape check of the TF entry point in one place (shared by the CPU and GPU kernels).
#pragma once

#include <string>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "segloss_operands.h"

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

// The dims of a tensor as int64 (TF's dim_size), for OperandView.
struct TensorDims {
  explicit TensorDims(const tensorflow::Tensor& t) : rank(t.dims()) {
    for (int d = 0; d < rank && d < 8; ++d) dims[d] = t.dim_size(d);
  }
  int64_t dims[8] = {0};
  int rank;
};

// The ctx inputs logits, labels, weights, pos_weight: at indices 0-3 unless `at` says
// otherwise (an op with an input between them).
struct OperandIndices {
  int logits = 0, labels = 1, weights = 2, pos_weight = 3;
};

inline absl::Status ProblemFromInputs(tensorflow::OpKernelContext* ctx, bool channels_last,
                                      bool squared, fused_segloss::SeglossProblem* p,
                                      OperandIndices at = {}) {
  const tensorflow::Tensor* inputs[4] = {&ctx->input(at.logits), &ctx->input(at.labels),
                                         &ctx->input(at.weights), &ctx->input(at.pos_weight)};
  const char* names[4] = {"logits", "labels", "weights", "pos_weight"};
  TensorDims dims[4] = {TensorDims(*inputs[0]), TensorDims(*inputs[1]), TensorDims(*inputs[2]),
                        TensorDims(*inputs[3])};
  fused_segloss::OperandView views[4];
  for (int i = 0; i < 4; ++i) {
    if (inputs[i]->dims() > 8) {
      return tensorflow::errors::InvalidArgument("FusedSegloss: `", names[i],
                                                 "` has too many dimensions");
    }
    views[i] = {inputs[i]->data(), dims[i].dims, dims[i].rank};
  }
  TF_RETURN_IF_ERROR(ToCoreDType(inputs[0]->dtype(), "logits", &p->logits_dtype));
  TF_RETURN_IF_ERROR(ToCoreDType(inputs[1]->dtype(), "labels", &p->labels_dtype));
  const std::string error = fused_segloss::ProblemFromOperands(
      views[0], views[1], views[2], views[3], channels_last, squared, p);
  if (!error.empty()) return tensorflow::errors::InvalidArgument("FusedSegloss: ", error);
  return absl::OkStatus();
}

// Reads the attributes shared by every FusedSegloss kernel (CPU and GPU).
class SeglossKernelBase : public tensorflow::OpKernel {
 public:
  explicit SeglossKernelBase(tensorflow::OpKernelConstruction* c) : tensorflow::OpKernel(c) {
    std::string data_format;
    OP_REQUIRES_OK(c, c->GetAttr("data_format", &data_format));
    OP_REQUIRES_OK(c, c->GetAttr("squared", &squared_));
    channels_last_ = data_format == "channels_last";
  }

 protected:
  bool channels_last_ = true;
  bool squared_ = false;
};

}  // namespace fused_segloss_tf
