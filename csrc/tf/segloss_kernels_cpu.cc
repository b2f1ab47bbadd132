// CPU OpKernels of FusedSeglossStats and FusedSeglossStatsGrad (segloss_ops.cc): thin
// adapters from tensors to the framework-free core (ComputeStatsCpu, ComputeLogitGradCpu
// in csrc/core/segloss_cpu.h), running the core's fixed work items on TF's intra-op
// thread pool. Operands, shape checks (segloss_problem.h) and per-element math
// (csrc/core/segloss_math.h) are the core's; this file adds only the output buffers.
#include <functional>
#include <utility>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "chunked_parallel_for.h"
#include "gradient_buffer_cache.h"
#include "memory_advice.h"
#include "segloss_problem.h"

namespace fused_segloss_tf {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

// The core's work items on TF's intra-op pool (see chunked_parallel_for.h).
fused_segloss::ParallelFor TfParallelFor(OpKernelContext* ctx) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [pool](int64_t n, int64_t cost, const fused_segloss::RangeFn& fn) {
    auto schedule = [pool](std::function<void()> task) { pool->Schedule(std::move(task)); };
    fused_segloss::ChunkedParallelFor(n, cost, pool->NumThreads(), schedule, fn);
  };
}

class StatsCpuOp : public SeglossKernelBase {
 public:
  using SeglossKernelBase::SeglossKernelBase;
  void Compute(OpKernelContext* ctx) override {
    fused_segloss::SeglossProblem problem;
    OP_REQUIRES_OK(ctx, ProblemFromInputs(ctx, options_, &problem));
    Tensor* stats = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, {problem.shape.batch, problem.shape.classes, 8}, &stats));
    const std::string error = fused_segloss::ComputeStatsCpu(problem, TfParallelFor(ctx),
                                                             stats->flat<float>().data());
    OP_REQUIRES(ctx, error.empty(), InvalidArgument("FusedSeglossStats: ", error));
  }
};

class StatsGradCpuOp : public SeglossKernelBase {
 public:
  using SeglossKernelBase::SeglossKernelBase;
  void Compute(OpKernelContext* ctx) override {
    constexpr const char* kName = "FusedSeglossStatsGrad: ";
    fused_segloss::SeglossProblem problem;
    OP_REQUIRES_OK(ctx, ProblemFromInputs(ctx, options_, &problem));
    const Tensor& grad_stats = ctx->input(4);
    const TensorDims grad_dims(grad_stats);
    const std::string shape_error =
        fused_segloss::CheckGradStatsShape(problem, grad_dims.dims, grad_dims.rank);
    OP_REQUIRES(ctx, shape_error.empty(), InvalidArgument(kName, shape_error));
    // The gradient may overwrite the logits when TF holds the only reference to them (a
    // graph whose forward no longer needs them): each vector of logits is read before the
    // same positions are written. Else an idle buffer of an earlier call
    // (gradient_buffer_cache.h), else a new one, advised to use huge pages.
    const Tensor& logits = ctx->input(0);
    Tensor* grad = nullptr;
    if (!ctx->forward_input_to_output_with_shape(0, 0, logits.shape(), &grad)) {
      Tensor buffer;
      if (!buffers_.TakeIdle(logits.dtype(), logits.shape(), &buffer)) {
        OP_REQUIRES_OK(ctx, ctx->allocate_temp(logits.dtype(), logits.shape(), &buffer));
        fused_segloss::AdviseHugePages(buffer.data(), buffer.TotalBytes());
        buffers_.Remember(buffer);
      }
      ctx->set_output(0, std::move(buffer));
      grad = ctx->mutable_output(0);
    }
    const std::string error = fused_segloss::ComputeLogitGradCpu(
        problem, grad_stats.flat<float>().data(), TfParallelFor(ctx), grad->data());
    OP_REQUIRES(ctx, error.empty(), InvalidArgument(kName, error));
  }

 private:
  GradientBufferCache buffers_;
};

REGISTER_KERNEL_BUILDER(Name("FusedSeglossStats").Device(tensorflow::DEVICE_CPU), StatsCpuOp);
REGISTER_KERNEL_BUILDER(Name("FusedSeglossStatsGrad").Device(tensorflow::DEVICE_CPU),
                        StatsGradCpuOp);

}  // namespace
}  // namespace fused_segloss_tf
