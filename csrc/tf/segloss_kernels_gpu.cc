// GPU OpKernels of FusedSeglossStats and FusedSeglossStatsGrad (segloss_ops.cc): thin
// adapters from tensors to the TF-free CUDA launchers of csrc/cuda/segloss_cuda.h, on TF's
// compute stream, with the CPU kernels' operands, shape checks (segloss_problem.h) and
// per-element math (csrc/core/segloss_math.h). Compiled only when the CMake build
// has CUDA (GOOGLE_CUDA=1); CPU-only builds compile this file to nothing.
//
// Memory: all inputs (including weights, pos_weight and grad_stats) stay in device
// memory; the forward pass's scratch (per-block partial sums and two counters) is a TF
// temporary, so it comes from TF's allocator rather than a second pool.
// Synchronisation: the forward kernel counts invalid labels / weights on the device and
// the launcher waits for the stream once to read the two counters, so that invalid
// input is an InvalidArgumentError as on the CPU. The gradient launch is asynchronous.
#if GOOGLE_CUDA

#include <string>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/stream_executor.h"
#include "segloss_cuda.h"
#include "segloss_problem.h"

namespace fused_segloss_tf {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
namespace fcuda = fused_segloss::cuda;

absl::Status StreamOf(OpKernelContext* ctx, const char* op, void** stream) {
  auto* device_context = ctx->op_device_context();
  if (device_context == nullptr || device_context->stream() == nullptr) {
    return Internal(op, ": no GPU stream for the kernel");
  }
  *stream = device_context->stream()->platform_specific_handle().stream;
  return absl::OkStatus();
}

absl::Status StatusOf(int code, const char* op) {
  if (code == fcuda::kOk) return absl::OkStatus();
  const std::string message = fcuda::ErrorMessage(code);
  if (code == fcuda::kCudaError) return Internal(op, ": ", message);
  return InvalidArgument(op, ": ", message);
}

class StatsGpuOp : public SeglossKernelBase {
 public:
  using SeglossKernelBase::SeglossKernelBase;
  void Compute(OpKernelContext* ctx) override {
    constexpr const char* kOp = "FusedSeglossStats";
    fused_segloss::SeglossProblem problem;
    OP_REQUIRES_OK(ctx, ProblemFromInputs(ctx, options_, &problem));
    Tensor* stats = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, {problem.shape.batch, problem.shape.classes, 8}, &stats));
    if (stats->NumElements() == 0) return;
    void* stream = nullptr;
    OP_REQUIRES_OK(ctx, StreamOf(ctx, kOp, &stream));
    const int64_t workspace_bytes = static_cast<int64_t>(fcuda::StatsWorkspaceBytes(problem));
    Tensor workspace;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT8, {workspace_bytes}, &workspace));
    fcuda::StatsOptions options;
    options.workspace = workspace.data();
    options.workspace_bytes = static_cast<size_t>(workspace_bytes);
    const int code = fcuda::LaunchStats(problem, stats->flat<float>().data(), stream, options);
    OP_REQUIRES_OK(ctx, StatusOf(code, kOp));
  }
};

class StatsGradGpuOp : public SeglossKernelBase {
 public:
  using SeglossKernelBase::SeglossKernelBase;
  void Compute(OpKernelContext* ctx) override {
    constexpr const char* kOp = "FusedSeglossStatsGrad";
    fused_segloss::SeglossProblem problem;
    OP_REQUIRES_OK(ctx, ProblemFromInputs(ctx, options_, &problem));
    const Tensor& grad_stats = ctx->input(4);
    const TensorDims grad_dims(grad_stats);
    const std::string shape_error =
        fused_segloss::CheckGradStatsShape(problem, grad_dims.dims, grad_dims.rank);
    OP_REQUIRES(ctx, shape_error.empty(), InvalidArgument(kOp, ": ", shape_error));
    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &grad));
    if (grad->NumElements() == 0) return;
    void* stream = nullptr;
    OP_REQUIRES_OK(ctx, StreamOf(ctx, kOp, &stream));
    const int code = fcuda::LaunchLogitGrad(problem, grad_stats.flat<float>().data(),
                                            grad->data(), stream);
    OP_REQUIRES_OK(ctx, StatusOf(code, kOp));
  }
};

REGISTER_KERNEL_BUILDER(Name("FusedSeglossStats").Device(tensorflow::DEVICE_GPU), StatsGpuOp);
REGISTER_KERNEL_BUILDER(Name("FusedSeglossStatsGrad").Device(tensorflow::DEVICE_GPU),
                        StatsGradGpuOp);

}  // namespace
}  // namespace fused_segloss_tf

#endif  // GOOGLE_CUDA
