// Builds the framework-free SeglossProblem from the op's input tensors (logits, labels,
// weights, pos_weight at inputs 0-3: the operands of csrc/core/segloss_operands.h), maps
// TF's dtypes to the core's DType, and reads the attributes every kernel shares. Shared by
// the CPU and GPU OpKernels; the shape rules themselves live in the core.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "segloss_operands.h"

namespace fused_segloss_tf {

// Statuses with their message pieces concatenated (absl::StrCat).
template <typename... Pieces>
absl::Status InvalidArgument(const Pieces&... pieces) {
  return absl::InvalidArgumentError(absl::StrCat(pieces...));
}
template <typename... Pieces>
absl::Status Internal(const Pieces&... pieces) {
  return absl::InternalError(absl::StrCat(pieces...));
}

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
    case tensorflow::DT_INT32: *out = DType::kInt32; return absl::OkStatus();
    case tensorflow::DT_INT64: *out = DType::kInt64; return absl::OkStatus();
    default: break;
  }
  return InvalidArgument("FusedSegloss: unsupported dtype for `", arg, "`: ",
                         tensorflow::DataTypeString(dtype));
}

// The dims of a tensor as int64 (TF's dim_size), for OperandView.
struct TensorDims {
  explicit TensorDims(const tensorflow::Tensor& t) : rank(t.dims()) {
    for (int d = 0; d < rank && d < 8; ++d) dims[d] = t.dim_size(d);
  }
  int64_t dims[8] = {0};
  int rank;
};

inline absl::Status ProblemFromInputs(tensorflow::OpKernelContext* ctx,
                                      const fused_segloss::ProblemOptions& options,
                                      fused_segloss::SeglossProblem* p) {
  const tensorflow::Tensor* inputs[4] = {&ctx->input(0), &ctx->input(1), &ctx->input(2),
                                         &ctx->input(3)};
  const char* names[4] = {"logits", "labels", "weights", "pos_weight"};
  TensorDims dims[4] = {TensorDims(*inputs[0]), TensorDims(*inputs[1]), TensorDims(*inputs[2]),
                        TensorDims(*inputs[3])};
  fused_segloss::OperandView views[4];
  for (int i = 0; i < 4; ++i) {
    if (inputs[i]->dims() > 8) {
      return InvalidArgument("FusedSegloss: `", names[i], "` has too many dimensions");
    }
    views[i] = {inputs[i]->data(), dims[i].dims, dims[i].rank};
  }
  TF_RETURN_IF_ERROR(ToCoreDType(inputs[0]->dtype(), "logits", &p->logits_dtype));
  TF_RETURN_IF_ERROR(ToCoreDType(inputs[1]->dtype(), "labels", &p->labels_dtype));
  const std::string error = fused_segloss::ProblemFromOperands(
      views[0], views[1], views[2], views[3], options, p);
  if (!error.empty()) return InvalidArgument("FusedSegloss: ", error);
  return absl::OkStatus();
}

// Reads the attributes shared by every FusedSegloss kernel (CPU and GPU).
class SeglossKernelBase : public tensorflow::OpKernel {
 public:
  explicit SeglossKernelBase(tensorflow::OpKernelConstruction* c) : tensorflow::OpKernel(c) {
    std::string data_format, activation;
    OP_REQUIRES_OK(c, c->GetAttr("data_format", &data_format));
    OP_REQUIRES_OK(c, c->GetAttr("squared", &options_.squared));
    OP_REQUIRES_OK(c, c->GetAttr("focal_gamma", &options_.focal.gamma));
    OP_REQUIRES_OK(c, c->GetAttr("focal_alpha", &options_.focal.alpha));
    OP_REQUIRES_OK(c, c->GetAttr("activation", &activation));
    OP_REQUIRES_OK(c, c->GetAttr("has_ignore_index", &options_.has_ignore_index));
    OP_REQUIRES_OK(c, c->GetAttr("ignore_index", &options_.ignore_index));
    options_.channels_last = data_format == "channels_last";
    options_.activation = activation == "softmax" ? fused_segloss::Activation::kSoftmax
                                                  : fused_segloss::Activation::kSigmoid;
  }

 protected:
  fused_segloss::ProblemOptions options_;
};

}  // namespace fused_segloss_tf
