// XLA typed-FFI handlers: the statistics kernel and its gradient inside XLA programs
// (tf.function(jit_compile=True), Keras model.fit with XLA). Python reaches them through
// XlaCallModule with a StableHLO custom_call (fused_segloss/_xla.py). They are thin
// adapters from XLA buffers to the same framework-free core as the TF OpKernels (CPU:
// csrc/core/segloss_cpu.h; CUDA: csrc/cuda/segloss_cuda.h), so the statistics, the
// gradient and their per-element math (csrc/core/segloss_math.h) are the ops' own.
//
// Operands, as the TF op takes them (the Python layer canonicalises them):
//   logits     [B, *S, C] or [B, C, *S]; float32, float64, float16 or bfloat16
//   labels     same shape; any of those, uint8 or pred (bool: one byte, 0 or 1); with
//              softmax also the shape without the class axis: class ids, u8, s32 or s64
//   weights    float32 canonical view [Bw, Nw, Cw] / [Bw, Cw, Nw], or rank-1 empty
//   pos_weight float32 [C], or rank-0 (absent)
//   grad_stats float32 [B, C, 8]            (gradient handler only)
// Attributes: channels_last (bool), squared (bool), check_numerics (bool, stats only),
//   focal_gamma (f32, >= 0) and focal_alpha (f32, in [0, 1]; negative means none): the
//   focal modulation of ce_sum (csrc/core/segloss_focal_math.h; 0 and -1 give plain ce);
//   softmax (bool: one class per pixel, csrc/core/segloss_softmax_math.h; else sigmoid),
//   has_ignore_index (bool) and ignore_index (i64): the class id whose pixels get weight 0.
#include <cstdint>
#include <functional>
#include <string>
#include <utility>

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"
#include "chunked_parallel_for.h"
#include "memory_advice.h"
#include "segloss_operands.h"

#if FSL_WITH_CUDA
#include "segloss_cuda.h"
#endif

namespace fused_segloss_xla {
namespace {

namespace ffi = xla::ffi;
using fused_segloss::DType;
using fused_segloss::SeglossProblem;

// --- buffers -> SeglossProblem ----------------------------------------------------------

bool ToCoreDType(ffi::DataType dtype, DType* out) {
  switch (dtype) {
    case ffi::DataType::F32: *out = DType::kFloat32; return true;
    case ffi::DataType::F64: *out = DType::kFloat64; return true;
    case ffi::DataType::F16: *out = DType::kFloat16; return true;
    case ffi::DataType::BF16: *out = DType::kBFloat16; return true;
    case ffi::DataType::U8: *out = DType::kUInt8; return true;
    // XLA stores PRED as one byte holding 0 or 1, which is the layout of C++ bool.
    case ffi::DataType::PRED: *out = DType::kBool; return true;
    case ffi::DataType::S32: *out = DType::kInt32; return true;
    case ffi::DataType::S64: *out = DType::kInt64; return true;
    default: return false;
  }
}

// The attributes every handler takes, as the core's options.
fused_segloss::ProblemOptions OptionsOf(bool channels_last, bool squared, float focal_gamma,
                                        float focal_alpha, bool softmax, bool has_ignore_index,
                                        int64_t ignore_index) {
  fused_segloss::ProblemOptions options;
  options.channels_last = channels_last;
  options.squared = squared;
  options.focal.gamma = focal_gamma;
  options.focal.alpha = focal_alpha;
  options.activation =
      softmax ? fused_segloss::Activation::kSoftmax : fused_segloss::Activation::kSigmoid;
  options.has_ignore_index = has_ignore_index;
  options.ignore_index = ignore_index;
  return options;
}

// Returns "" or a message naming the argument (shared rules: core/segloss_operands.h).
std::string ProblemFromBuffers(const ffi::AnyBuffer& logits, const ffi::AnyBuffer& labels,
                               const ffi::AnyBuffer& weights, const ffi::AnyBuffer& pos_weight,
                               const fused_segloss::ProblemOptions& options,
                               bool check_numerics, SeglossProblem* p) {
  if (!ToCoreDType(logits.element_type(), &p->logits_dtype) ||
      p->logits_dtype == DType::kUInt8 || p->logits_dtype == DType::kBool ||
      p->logits_dtype == DType::kInt32 || p->logits_dtype == DType::kInt64) {
    return "unsupported dtype for `logits` (float16, bfloat16, float32 or float64 expected)";
  }
  if (!ToCoreDType(labels.element_type(), &p->labels_dtype)) {
    return "unsupported dtype for `labels` (a float type, uint8 or bool expected; class ids: "
           "uint8, int32 or int64)";
  }
  if (weights.element_type() != ffi::DataType::F32) return "`weights` must be float32";
  if (pos_weight.element_type() != ffi::DataType::F32) return "`pos_weight` must be float32";
  auto view = [](const ffi::AnyBuffer& b) {
    const auto dims = b.dimensions();
    return fused_segloss::OperandView{b.untyped_data(), dims.begin(),
                                      static_cast<int>(dims.size())};
  };
  p->check_numerics = check_numerics;
  return fused_segloss::ProblemFromOperands(view(logits), view(labels), view(weights),
                                            view(pos_weight), options, p);
}

std::string CheckGradStats(const SeglossProblem& p, ffi::AnyBuffer::Dimensions g) {
  return fused_segloss::CheckGradStatsShape(p, g.begin(), static_cast<int>(g.size()));
}

// --- CPU: the core's work items on XLA's intra-op thread pool ---------------------------
// See chunked_parallel_for.h.
fused_segloss::ParallelFor PoolParallelFor(ffi::ThreadPool* pool) {
  const int64_t workers = pool->num_threads();
  if (workers <= 0) return fused_segloss::SerialFor;  // no intra-op pool in this context
  return [pool, workers](int64_t n, int64_t cost, const fused_segloss::RangeFn& fn) {
    auto schedule = [pool](std::function<void()> task) { pool->Schedule(std::move(task)); };
    fused_segloss::ChunkedParallelFor(n, cost, workers, schedule, fn);
  };
}

ffi::Error StatsHost(ffi::AnyBuffer logits, ffi::AnyBuffer labels, ffi::AnyBuffer weights,
                     ffi::AnyBuffer pos_weight, bool channels_last, bool squared,
                     bool check_numerics, float focal_gamma, float focal_alpha, bool softmax,
                     bool has_ignore_index, int64_t ignore_index, ffi::ThreadPool pool,
                     ffi::Result<ffi::Buffer<ffi::F32>> stats) {
  SeglossProblem problem;
  std::string error = ProblemFromBuffers(
      logits, labels, weights, pos_weight,
      OptionsOf(channels_last, squared, focal_gamma, focal_alpha, softmax, has_ignore_index,
                ignore_index),
      check_numerics, &problem);
  if (error.empty()) {
    error = fused_segloss::ComputeStatsCpu(problem, PoolParallelFor(&pool),
                                           stats->typed_data());
  }
  if (!error.empty()) return ffi::Error::InvalidArgument("FusedSeglossStats: " + error);
  return ffi::Error::Success();
}

ffi::Error StatsGradHost(ffi::AnyBuffer logits, ffi::AnyBuffer labels, ffi::AnyBuffer weights,
                         ffi::AnyBuffer pos_weight, ffi::Buffer<ffi::F32> grad_stats,
                         bool channels_last, bool squared, float focal_gamma,
                         float focal_alpha, bool softmax, bool has_ignore_index,
                         int64_t ignore_index, ffi::ThreadPool pool,
                         ffi::Result<ffi::AnyBuffer> grad_logits) {
  SeglossProblem problem;
  std::string error = ProblemFromBuffers(
      logits, labels, weights, pos_weight,
      OptionsOf(channels_last, squared, focal_gamma, focal_alpha, softmax, has_ignore_index,
                ignore_index),
      /*check_numerics=*/false, &problem);
  if (error.empty()) error = CheckGradStats(problem, grad_stats.dimensions());
  if (error.empty() && grad_logits->element_type() != logits.element_type()) {
    error = "the gradient must have the logits' dtype";
  }
  if (error.empty()) {
    fused_segloss::AdviseHugePages(grad_logits->untyped_data(), grad_logits->size_bytes());
    error = fused_segloss::ComputeLogitGradCpu(problem, grad_stats.typed_data(),
                                               PoolParallelFor(&pool),
                                               grad_logits->untyped_data());
  }
  if (!error.empty()) return ffi::Error::InvalidArgument("FusedSeglossStatsGrad: " + error);
  return ffi::Error::Success();
}

#if FSL_WITH_CUDA
// --- CUDA: the same problem, device pointers, XLA's stream and scratch memory ----------

ffi::Error FromCudaStatus(int code, const char* op) {
  if (code == fused_segloss::cuda::kOk) return ffi::Error::Success();
  const std::string message = std::string(op) + ": " + fused_segloss::cuda::ErrorMessage(code);
  if (code == fused_segloss::cuda::kCudaError) return ffi::Error::Internal(message);
  return ffi::Error::InvalidArgument(message);
}

ffi::Error StatsCuda(ffi::AnyBuffer logits, ffi::AnyBuffer labels, ffi::AnyBuffer weights,
                     ffi::AnyBuffer pos_weight, bool channels_last, bool squared,
                     bool check_numerics, float focal_gamma, float focal_alpha, bool softmax,
                     bool has_ignore_index, int64_t ignore_index, void* stream,
                     ffi::ScratchAllocator scratch,
                     ffi::Result<ffi::Buffer<ffi::F32>> stats) {
  SeglossProblem problem;
  const std::string error = ProblemFromBuffers(
      logits, labels, weights, pos_weight,
      OptionsOf(channels_last, squared, focal_gamma, focal_alpha, softmax, has_ignore_index,
                ignore_index),
      check_numerics, &problem);
  if (!error.empty()) return ffi::Error::InvalidArgument("FusedSeglossStats: " + error);
  if (check_numerics) {
    return ffi::Error::InvalidArgument(
        "FusedSeglossStats: check_numerics=True is not supported by the CUDA kernels inside "
        "XLA; check the logits with tf.debugging.check_numerics outside the jit function");
  }
  // The partial sums go to XLA's scratch memory where the runtime offers it (XLA may
  // hold most of the GPU's memory); where it offers none (seen with JAX's PJRT client),
  // the launcher allocates them stream-ordered itself (cudaMallocAsync).
  // check_values keeps the CPU kernel's contract (invalid labels are an error); it
  // synchronises the stream, so the scratch is idle when it is released on return.
  fused_segloss::cuda::StatsOptions options;
  options.check_values = true;
  const size_t workspace_bytes = fused_segloss::cuda::StatsWorkspaceBytes(problem);
  if (workspace_bytes > 0) {
    const auto memory = scratch.Allocate(workspace_bytes, 256);
    if (memory.has_value() && *memory != nullptr) {
      options.workspace = *memory;
      options.workspace_bytes = workspace_bytes;
    }
  }
  return FromCudaStatus(
      fused_segloss::cuda::LaunchStats(problem, stats->typed_data(), stream, options),
      "FusedSeglossStats");
}

ffi::Error StatsGradCuda(ffi::AnyBuffer logits, ffi::AnyBuffer labels, ffi::AnyBuffer weights,
                         ffi::AnyBuffer pos_weight, ffi::Buffer<ffi::F32> grad_stats,
                         bool channels_last, bool squared, float focal_gamma,
                         float focal_alpha, bool softmax, bool has_ignore_index,
                         int64_t ignore_index, void* stream,
                         ffi::Result<ffi::AnyBuffer> grad_logits) {
  SeglossProblem problem;
  std::string error = ProblemFromBuffers(
      logits, labels, weights, pos_weight,
      OptionsOf(channels_last, squared, focal_gamma, focal_alpha, softmax, has_ignore_index,
                ignore_index),
      /*check_numerics=*/false, &problem);
  if (error.empty()) error = CheckGradStats(problem, grad_stats.dimensions());
  if (error.empty() && grad_logits->element_type() != logits.element_type()) {
    error = "the gradient must have the logits' dtype";
  }
  if (!error.empty()) return ffi::Error::InvalidArgument("FusedSeglossStatsGrad: " + error);
  return FromCudaStatus(
      fused_segloss::cuda::LaunchLogitGrad(problem, grad_stats.typed_data(),
                                           grad_logits->untyped_data(), stream),
      "FusedSeglossStatsGrad");
}
#endif  // FSL_WITH_CUDA

}  // namespace

// The bindings list operands in the order of the custom_call in _xla.py.
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedSeglossStatsHost, StatsHost,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // logits
                                  .Arg<ffi::AnyBuffer>()  // labels
                                  .Arg<ffi::AnyBuffer>()  // weights
                                  .Arg<ffi::AnyBuffer>()  // pos_weight
                                  .Attr<bool>("channels_last")
                                  .Attr<bool>("squared")
                                  .Attr<bool>("check_numerics")
                                  .Attr<float>("focal_gamma")
                                  .Attr<float>("focal_alpha")
                                  .Attr<bool>("softmax")
                                  .Attr<bool>("has_ignore_index")
                                  .Attr<int64_t>("ignore_index")
                                  .Ctx<ffi::ThreadPool>()
                                  .Ret<ffi::Buffer<ffi::F32>>());  // stats [B, C, 8]

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedSeglossStatsGradHost, StatsGradHost,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()           // logits
                                  .Arg<ffi::AnyBuffer>()           // labels
                                  .Arg<ffi::AnyBuffer>()           // weights
                                  .Arg<ffi::AnyBuffer>()           // pos_weight
                                  .Arg<ffi::Buffer<ffi::F32>>()    // grad_stats
                                  .Attr<bool>("channels_last")
                                  .Attr<bool>("squared")
                                  .Attr<float>("focal_gamma")
                                  .Attr<float>("focal_alpha")
                                  .Attr<bool>("softmax")
                                  .Attr<bool>("has_ignore_index")
                                  .Attr<int64_t>("ignore_index")
                                  .Ctx<ffi::ThreadPool>()
                                  .Ret<ffi::AnyBuffer>());         // grad_logits

XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), "fused_segloss_stats", "Host",
                         FusedSeglossStatsHost);
XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), "fused_segloss_stats_grad", "Host",
                         FusedSeglossStatsGradHost);

#if FSL_WITH_CUDA
// The "CUDA" handlers take the same operands and attributes; XLA hands them its stream
// (a cudaStream_t, passed on as void*) and a scratch allocator.
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedSeglossStatsCuda, StatsCuda,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // logits
                                  .Arg<ffi::AnyBuffer>()  // labels
                                  .Arg<ffi::AnyBuffer>()  // weights
                                  .Arg<ffi::AnyBuffer>()  // pos_weight
                                  .Attr<bool>("channels_last")
                                  .Attr<bool>("squared")
                                  .Attr<bool>("check_numerics")
                                  .Attr<float>("focal_gamma")
                                  .Attr<float>("focal_alpha")
                                  .Attr<bool>("softmax")
                                  .Attr<bool>("has_ignore_index")
                                  .Attr<int64_t>("ignore_index")
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Ret<ffi::Buffer<ffi::F32>>());  // stats [B, C, 8]

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedSeglossStatsGradCuda, StatsGradCuda,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()           // logits
                                  .Arg<ffi::AnyBuffer>()           // labels
                                  .Arg<ffi::AnyBuffer>()           // weights
                                  .Arg<ffi::AnyBuffer>()           // pos_weight
                                  .Arg<ffi::Buffer<ffi::F32>>()    // grad_stats
                                  .Attr<bool>("channels_last")
                                  .Attr<bool>("squared")
                                  .Attr<float>("focal_gamma")
                                  .Attr<float>("focal_alpha")
                                  .Attr<bool>("softmax")
                                  .Attr<bool>("has_ignore_index")
                                  .Attr<int64_t>("ignore_index")
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Ret<ffi::AnyBuffer>());         // grad_logits

XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), "fused_segloss_stats", "CUDA",
                         FusedSeglossStatsCuda);
XLA_FFI_REGISTER_HANDLER(XLA_FFI_GetApi(), "fused_segloss_stats_grad", "CUDA",
                         FusedSeglossStatsGradCuda);
#endif  // FSL_WITH_CUDA

}  // namespace fused_segloss_xla
