// CPU OpKernels: thin adapters from tensors to the framework-free core kernels,
// running the core's fixed work items on TF's intra-op thread pool.
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

// A logits-sized buffer for an output: an idle one of an earlier call (see
// gradient_buffer_cache.h), else a new one, advised to use huge pages.
absl::Status ReusedOrNewBuffer(OpKernelContext* ctx, GradientBufferCache* cache,
                               tensorflow::DataType dtype,
                               const tensorflow::TensorShape& shape, Tensor* out) {
  if (cache->TakeIdle(dtype, shape, out)) return absl::OkStatus();
  TF_RETURN_IF_ERROR(ctx->allocate_temp(dtype, shape, out));
  fused_segloss::AdviseHugePages(out->data(), out->TotalBytes());
  cache->Remember(*out);
  return absl::OkStatus();
}

// FusedSeglossStats, and with kLabelBytes FusedSeglossStatsWithLabelBytes: the same pass,
// which then also writes the labels as bytes for the gradient (LabelBytes in
// segloss_cpu.h), output 1: the bytes where every label was 0 or 1 (and the inputs are
// large enough to gain from them), else an empty [0].
// Label bytes are written only where the inputs (logits + labels) have at least the
// attribute min_input_bytes, by default 32 MiB, more than a last-level cache: below that
// the gradient pass finds the float labels still cached, and the extra write made the two
// ops 5-9% slower at 8x256x256x5 (21 MB of inputs), while at 8x512x512x5 they were up to
// 10% faster and at 8x1024x1024x5 5-11% (Zen 4, eager ops; README "Label bytes").
template <bool kLabelBytes>
class StatsCpuOp : public SeglossKernelBase {
 public:
  explicit StatsCpuOp(OpKernelConstruction* c) : SeglossKernelBase(c) {
    if (kLabelBytes) OP_REQUIRES_OK(c, c->GetAttr("min_input_bytes", &min_input_bytes_));
  }
  void Compute(OpKernelContext* ctx) override {
    const char* name = kLabelBytes ? "FusedSeglossStatsWithLabelBytes: " : "FusedSeglossStats: ";
    fused_segloss::SeglossProblem problem;
    OP_REQUIRES_OK(ctx, ProblemFromInputs(ctx, channels_last_, squared_, &problem));
    Tensor* stats = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, {problem.shape.batch, problem.shape.classes, 8}, &stats));
    Tensor bytes;
    fused_segloss::LabelBytes label_bytes;
    const bool write_bytes =
        kLabelBytes && static_cast<int64_t>(ctx->input(0).TotalBytes() +
                                            ctx->input(1).TotalBytes()) >= min_input_bytes_;
    if (write_bytes) {
      OP_REQUIRES_OK(ctx, ReusedOrNewBuffer(ctx, &buffers_, tensorflow::DT_UINT8,
                                            ctx->input(1).shape(), &bytes));
      label_bytes.data = bytes.flat<uint8_t>().data();
    }
    const std::string error = fused_segloss::ComputeStatsCpu(
        problem, TfParallelFor(ctx), stats->flat<float>().data(),
        write_bytes ? &label_bytes : nullptr);
    OP_REQUIRES(ctx, error.empty(), tensorflow::errors::InvalidArgument(name, error));
    if (kLabelBytes) {
      if (label_bytes.all_binary) {
        ctx->set_output(1, bytes);
      } else {
        Tensor* empty = nullptr;
        OP_REQUIRES_OK(ctx, ctx->allocate_output(1, {0}, &empty));
      }
    }
  }

 private:
  int64_t min_input_bytes_ = 0;
  GradientBufferCache buffers_;  // of the label bytes
};

// FusedSeglossStatsGrad, and with kLabelBytes FusedSeglossStatsGradWithLabelBytes, whose
// input 2 is the forward's label bytes: read as uint8 labels when they have the labels'
// size (the same gradient bit for bit, fewer bytes read), the labels themselves when empty.
template <bool kLabelBytes>
class StatsGradCpuOp : public SeglossKernelBase {
 public:
  using SeglossKernelBase::SeglossKernelBase;
  void Compute(OpKernelContext* ctx) override {
    const char* name =
        kLabelBytes ? "FusedSeglossStatsGradWithLabelBytes: " : "FusedSeglossStatsGrad: ";
    const OperandIndices at = kLabelBytes ? OperandIndices{0, 1, 3, 4} : OperandIndices{};
    fused_segloss::SeglossProblem problem;
    OP_REQUIRES_OK(ctx, ProblemFromInputs(ctx, channels_last_, squared_, &problem, at));
    if (kLabelBytes) {
      const Tensor& labels = ctx->input(1);
      const Tensor& bytes = ctx->input(2);
      if (bytes.NumElements() > 0) {
        OP_REQUIRES(ctx, bytes.shape() == labels.shape(),
                    tensorflow::errors::InvalidArgument(
                        name, "`label_bytes` must have the labels' shape ",
                        labels.shape().DebugString(), " or be empty, got ",
                        bytes.shape().DebugString()));
        problem.labels = bytes.data();
        problem.labels_dtype = fused_segloss::DType::kUInt8;
      }
    }
    const Tensor& grad_stats = ctx->input(kLabelBytes ? 5 : 4);
    const TensorDims grad_dims(grad_stats);
    const std::string shape_error =
        fused_segloss::CheckGradStatsShape(problem, grad_dims.dims, grad_dims.rank);
    OP_REQUIRES(ctx, shape_error.empty(), tensorflow::errors::InvalidArgument(name, shape_error));
    // The gradient may overwrite the logits when TF holds the only reference to them (a
    // graph whose forward no longer needs them): each vector of logits is read before the
    // same positions are written. Else an idle buffer of an earlier call, else a new one.
    const Tensor& logits = ctx->input(0);
    Tensor* grad = nullptr;
    if (!ctx->forward_input_to_output_with_shape(0, 0, logits.shape(), &grad)) {
      Tensor buffer;
      OP_REQUIRES_OK(ctx, ReusedOrNewBuffer(ctx, &buffers_, logits.dtype(), logits.shape(),
                                            &buffer));
      ctx->set_output(0, std::move(buffer));
      grad = ctx->mutable_output(0);
    }
    const std::string error = fused_segloss::ComputeLogitGradCpu(
        problem, grad_stats.flat<float>().data(), TfParallelFor(ctx), grad->data());
    OP_REQUIRES(ctx, error.empty(), tensorflow::errors::InvalidArgument(name, error));
  }

 private:
  GradientBufferCache buffers_;
};

REGISTER_KERNEL_BUILDER(Name("FusedSeglossStats").Device(tensorflow::DEVICE_CPU),
                        StatsCpuOp<false>);
REGISTER_KERNEL_BUILDER(Name("FusedSeglossStatsWithLabelBytes").Device(tensorflow::DEVICE_CPU),
                        StatsCpuOp<true>);
REGISTER_KERNEL_BUILDER(Name("FusedSeglossStatsGrad").Device(tensorflow::DEVICE_CPU),
                        StatsGradCpuOp<false>);
REGISTER_KERNEL_BUILDER(
    Name("FusedSeglossStatsGradWithLabelBytes").Device(tensorflow::DEVICE_CPU),
    StatsGradCpuOp<true>);

}  // namespace
}  // namespace fused_segloss_tf
