// The TF-free launchers of segloss_cuda.h: argument checks, the launch plan, scratch
// memory, dispatch to the typed kernels (on the activation and the dtypes: DispatchDTypes,
// or DispatchClassIdDTypes for sparse softmax labels, dtypes.h), the second stage of the
// forward reduction (CombineKernel), and the value check of the forward pass.
//
// Operands: a SeglossProblem of device pointers (segloss_cuda.h); the forward writes
// stats [B, C, 8] after summing the blocks' float64 partial records in a fixed order, the
// gradient writes dL/dlogits in the logits' dtype. The per-element math is
// segloss_math.h's; the per-thread work is segloss_cuda_thread.h's.
#include <cuda_runtime.h>

#include <string>

#include "segloss_cuda.h"
#include "segloss_cuda_launch.h"
#include "segloss_cuda_problem.h"
#include "segloss_cuda_thread.h"

namespace fused_segloss {
namespace cuda {
namespace {

thread_local int last_code = kOk;
thread_local std::string last_message;

int Fail(int code, std::string message) {
  last_code = code;
  last_message = std::move(message);
  return code;
}

int CudaFail(const char* what, cudaError_t error) {
  std::string message = std::string("fused_segloss CUDA: ") + what + " failed: " +
                        cudaGetErrorName(error) + " (" + cudaGetErrorString(error) + ")";
  if (error == cudaErrorInsufficientDriver || error == cudaErrorNoKernelImageForDevice ||
      error == cudaErrorUnsupportedPtxVersion || error == cudaErrorNoDevice) {
    int driver = 0;
    cudaDriverGetVersion(&driver);
    message += ". The kernels were built with CUDA " + std::to_string(CUDART_VERSION / 1000) +
               "." + std::to_string(CUDART_VERSION % 1000 / 10) +
               " for sm_75 and newer and need an NVIDIA driver that supports it (>= 580 for "
               "CUDA 13); this driver supports CUDA " + std::to_string(driver / 1000) + "." +
               std::to_string(driver % 1000 / 10) + ". Update the driver, run the op on the "
               "CPU, or rebuild with FUSED_SEGLOSS_CUDA=OFF (docs/gpu.md)";
  }
  return Fail(kCudaError, message);
}

// Makes the stream's device current for the runtime calls of one launcher call, so that
// a stream of GPU 1 works when the runtime's current device is GPU 0 (multi-GPU TF).
class ScopedStreamDevice {
 public:
  explicit ScopedStreamDevice(cudaStream_t stream) {
    int device = -1;
    if (stream == nullptr || cudaStreamGetDevice(stream, &device) != cudaSuccess) {
      cudaGetLastError();  // the legacy/default stream: keep the current device
      return;
    }
    if (cudaGetDevice(&previous_) == cudaSuccess && previous_ != device &&
        cudaSetDevice(device) == cudaSuccess) {
      restore_ = true;
    }
  }
  ~ScopedStreamDevice() {
    if (restore_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
  bool restore_ = false;
};

// Workspace: four uint64 counters (invalid labels or class ids, invalid weights, the
// smallest and the largest invalid id as EncodeIdMin/Max), then the partials.
constexpr int kCounters = 4;
constexpr size_t kCountersBytes = kCounters * sizeof(unsigned long long);

// Calls fn(LogitT{}, LabelT{}, std::bool_constant<kSparse>{}) for the problem's dtypes
// (class-id types when its labels are sparse); -1 for an unsupported pair.
template <typename Fn>
int DispatchProblem(const SeglossProblem& p, Fn&& fn) {
  return DispatchLabelDTypes<int>(p.sparse_labels, p.logits_dtype, p.labels_dtype, -1, fn);
}

// The message for the counters of a forward pass ("" when every value was valid).
std::string CountersMessage(const SeglossProblem& p, const unsigned long long counts[kCounters]) {
  if (p.sparse_labels && counts[0] != 0) {
    return InvalidClassIdsMessage(p, static_cast<int64_t>(counts[0]), DecodeIdMin(counts[2]),
                                  DecodeIdMax(counts[3]));
  }
  return InvalidValuesMessage(static_cast<int64_t>(counts[0]), static_cast<int64_t>(counts[1]));
}

// The second stage of the forward reduction: one thread per (b, c, column) of the
// [B, C, 8] output, summing the row's chunk records in chunk order.
__global__ void CombineKernel(LaunchPlan plan, ProblemShape s, const double* partials,
                              float* stats) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= s.batch * s.classes * kNumStats) return;
  const int column = static_cast<int>(index % kNumStats);
  const int64_t bc = index / kNumStats;
  stats[index] = CombineStat(plan, s, partials, bc / s.classes, bc % s.classes, column);
}

}  // namespace

int LaunchCombineKernel(const LaunchPlan& plan, const ProblemShape& s, const double* partials,
                        float* stats, cudaStream_t stream) {
  const int64_t outputs = s.batch * s.classes * kNumStats;
  if (outputs == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  CombineKernel<<<static_cast<unsigned>(CeilDiv(outputs, kThreads)), kThreads, 0, stream>>>(
      plan, s, partials, stats);
  return cudaGetLastError();
}

const char* ErrorMessage(int code) {
  if (code == last_code && !last_message.empty()) return last_message.c_str();
  switch (code) {
    case kOk: return "success";
    case kInvalidArgument: return "fused_segloss CUDA: invalid argument";
    case kInvalidValues: return "fused_segloss CUDA: invalid label or weight values";
    case kCudaError: return "fused_segloss CUDA: CUDA runtime error";
  }
  return "fused_segloss CUDA: unknown status code";
}

size_t StatsWorkspaceBytes(const SeglossProblem& problem) {
  const LaunchPlan plan = PlanForProblem(problem);
  return kCountersBytes + static_cast<size_t>(plan.partial_records) * kNumStats * sizeof(double);
}

int LaunchStats(const SeglossProblem& problem, float* stats_out, void* stream_ptr,
                const StatsOptions& options) {
  last_code = kOk;
  last_message.clear();
  std::string error = CheckLaunchProblem(problem);
  if (!error.empty()) return Fail(kInvalidArgument, "fused_segloss CUDA: " + error);
  const ProblemShape& s = problem.shape;
  if (s.batch * s.classes == 0) return kOk;  // empty [B, C, 8] output
  if (stats_out == nullptr) return Fail(kInvalidArgument, "fused_segloss CUDA: null `stats` output");
  const size_t needed = StatsWorkspaceBytes(problem);
  if (options.workspace != nullptr &&
      (options.workspace_bytes < needed || reinterpret_cast<uintptr_t>(options.workspace) % 16)) {
    return Fail(kInvalidArgument, "fused_segloss CUDA: workspace must be 16-byte aligned and at least " +
                                      std::to_string(needed) + " bytes, got " +
                                      std::to_string(options.workspace_bytes));
  }
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  ScopedStreamDevice device(stream);
  const LaunchPlan plan = PlanForProblem(problem);
  const KernelProblem kp = MakeKernelProblem(problem, nullptr);
  const bool softmax = problem.activation == Activation::kSoftmax;

  void* workspace = options.workspace;
  cudaError_t status = cudaSuccess;
  if (workspace == nullptr) {
    status = cudaMallocAsync(&workspace, needed, stream);
    if (status != cudaSuccess) return CudaFail("cudaMallocAsync of the workspace", status);
  }
  auto* counters = static_cast<unsigned long long*>(workspace);
  auto* partials = reinterpret_cast<double*>(static_cast<char*>(workspace) + kCountersBytes);
  status = cudaMemsetAsync(counters, 0, kCountersBytes, stream);
  int launch = status;
  if (status == cudaSuccess) {
    launch = DispatchProblem(problem, [&](auto logit_tag, auto label_tag, auto sparse) {
      using LogitT = decltype(logit_tag);
      using LabelT = decltype(label_tag);
      if constexpr (decltype(sparse)::value) {  // only softmax has sparse labels
        return LaunchSoftmaxStatsKernel<LogitT, LabelT, true>(plan, kp, partials, counters,
                                                              stream);
      } else {
        return softmax ? LaunchSoftmaxStatsKernel<LogitT, LabelT, false>(plan, kp, partials,
                                                                         counters, stream)
                       : LaunchStatsKernel<LogitT, LabelT>(plan, kp, problem.squared, partials,
                                                           counters, stream);
      }
    });
  }
  if (launch == cudaSuccess) launch = LaunchCombineKernel(plan, s, partials, stats_out, stream);
  unsigned long long host_counts[kCounters] = {0, 0, 0, 0};
  if (launch == cudaSuccess && options.check_values) {
    launch = cudaMemcpyAsync(host_counts, counters, sizeof(host_counts), cudaMemcpyDeviceToHost,
                             stream);
  }
  if (options.workspace == nullptr) cudaFreeAsync(workspace, stream);
  if (launch == cudaSuccess && options.check_values) launch = cudaStreamSynchronize(stream);
  if (launch == -1) {
    return Fail(kInvalidArgument, "fused_segloss CUDA: unsupported logits/labels dtype pair");
  }
  if (launch != cudaSuccess) return CudaFail("the statistics kernels", static_cast<cudaError_t>(launch));
  error = CountersMessage(problem, host_counts);
  if (!error.empty()) return Fail(kInvalidValues, error);
  return kOk;
}

int LaunchLogitGrad(const SeglossProblem& problem, const float* grad_stats,
                    void* grad_logits_out, void* stream_ptr) {
  last_code = kOk;
  last_message.clear();
  const std::string error = CheckLaunchProblem(problem);
  if (!error.empty()) return Fail(kInvalidArgument, "fused_segloss CUDA: " + error);
  const ProblemShape& s = problem.shape;
  if (s.batch * s.positions * s.classes == 0) return kOk;
  if (grad_stats == nullptr || grad_logits_out == nullptr) {
    return Fail(kInvalidArgument, "fused_segloss CUDA: null `grad_stats` or gradient output");
  }
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  ScopedStreamDevice device(stream);
  const LaunchPlan plan = PlanForProblem(problem);
  const KernelProblem kp = MakeKernelProblem(problem, grad_logits_out);
  const bool softmax = problem.activation == Activation::kSoftmax;
  const int launch = DispatchProblem(problem, [&](auto logit_tag, auto label_tag, auto sparse) {
    using LogitT = decltype(logit_tag);
    using LabelT = decltype(label_tag);
    if constexpr (decltype(sparse)::value) {
      return LaunchSoftmaxGradKernel<LogitT, LabelT, true>(plan, kp, grad_stats,
                                                           grad_logits_out, stream);
    } else {
      return softmax ? LaunchSoftmaxGradKernel<LogitT, LabelT, false>(plan, kp, grad_stats,
                                                                      grad_logits_out, stream)
                     : LaunchGradKernel<LogitT, LabelT>(plan, kp, problem.squared, grad_stats,
                                                        grad_logits_out, stream);
    }
  });
  if (launch == -1) {
    return Fail(kInvalidArgument, "fused_segloss CUDA: unsupported logits/labels dtype pair");
  }
  if (launch != cudaSuccess) return CudaFail("the gradient kernel", static_cast<cudaError_t>(launch));
  return kOk;
}

}  // namespace cuda
}  // namespace fused_segloss
