// CPU OpKernels: thin adapters from tensors to the framework-free core kernels,
// running the core's fixed work items on TF's intra-op thread pool.
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/util/work_sharder.h"
#include "memory_advice.h"
#include "segloss_problem.h"

namespace fused_segloss_tf {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

fused_segloss::ParallelFor TfParallelFor(OpKernelContext* ctx) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [pool](int64_t n, int64_t cost, const fused_segloss::RangeFn& fn) {
    if (n <= 0) return;
    pool->ParallelFor(n, cost, [&fn](int64_t begin, int64_t end) { fn(begin, end); });
  };
}

class StatsCpuOp : public SeglossKernelBase {
 public:
  using SeglossKernelBase::SeglossKernelBase;
  void Compute(OpKernelContext* ctx) override {
    fused_segloss::SeglossProblem problem;
    OP_REQUIRES_OK(ctx, ProblemFromInputs(ctx, channels_last_, squared_, &problem));
    Tensor* stats = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, {problem.shape.batch, problem.shape.classes, 8}, &stats));
    const std::string error = fused_segloss::ComputeStatsCpu(
        problem, TfParallelFor(ctx), stats->flat<float>().data());
    OP_REQUIRES(ctx, error.empty(),
                tensorflow::errors::InvalidArgument("FusedSeglossStats: ", error));
  }
};

class StatsGradCpuOp : public SeglossKernelBase {
 public:
  using SeglossKernelBase::SeglossKernelBase;
  void Compute(OpKernelContext* ctx) override {
    fused_segloss::SeglossProblem problem;
    OP_REQUIRES_OK(ctx, ProblemFromInputs(ctx, channels_last_, squared_, &problem));
    const Tensor& grad_stats = ctx->input(4);
    const TensorDims grad_dims(grad_stats);
    const std::string shape_error =
        fused_segloss::CheckGradStatsShape(problem, grad_dims.dims, grad_dims.rank);
    OP_REQUIRES(ctx, shape_error.empty(),
                tensorflow::errors::InvalidArgument("FusedSeglossStatsGrad: ", shape_error));
    // The gradient may overwrite the logits when TF holds the only reference to them (a
    // graph whose forward no longer needs them): each vector of logits is read before the
    // same positions are written. Otherwise a new buffer, advised to use huge pages.
    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, ctx->input(0).shape(),
                                                              &grad));
    if (grad->data() != ctx->input(0).data()) {
      fused_segloss::AdviseHugePages(grad->data(), grad->TotalBytes());
    }
    const std::string error = fused_segloss::ComputeLogitGradCpu(
        problem, grad_stats.flat<float>().data(), TfParallelFor(ctx), grad->data());
    OP_REQUIRES(ctx, error.empty(),
                tensorflow::errors::InvalidArgument("FusedSeglossStatsGrad: ", error));
  }
};

REGISTER_KERNEL_BUILDER(Name("FusedSeglossStats").Device(tensorflow::DEVICE_CPU), StatsCpuOp);
REGISTER_KERNEL_BUILDER(Name("FusedSeglossStatsGrad").Device(tensorflow::DEVICE_CPU),
                        StatsGradCpuOp);

}  // namespace
}  // namespace fused_segloss_tf
