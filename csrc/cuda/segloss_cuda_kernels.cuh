// The CUDA kernels: __global__ wrappers around the per-thread work of
// segloss_cuda_thread.h (sigmoid) and segloss_cuda_softmax.h (softmax): forward
// statistics into per-block partial records, gradient elements; the typed launchers; and
// the one device-only piece, the intra-block reduction (a shared-memory tree). The
// per-element math is segloss_math.h's. Included by the per-dtype instantiation files
// segloss_cuda_<dtype>.cu; no TF headers.
#pragma once

#include <cuda_runtime.h>

#include "segloss_cuda_launch.h"
#include "segloss_cuda_softmax.h"
#include "segloss_cuda_thread.h"

namespace fused_segloss {
namespace cuda {

template <typename Compute>
struct MaxThreadsOf {
  static constexpr int value = kMaxThreadsFloat;
};
template <>
struct MaxThreadsOf<double> {
  static constexpr int value = kMaxThreadsDouble;
};

// Sums the accumulators of threads t ≡ r (mod q) for every r < q, leaving lane sums in
// smem[(slot·8 + column)·threads + r]. threads = q·2^p, so every tree stride from
// threads/2 down to q is a multiple of q and pairs threads holding the same classes.
// The order of additions is fixed by the block shape: deterministic. The steps are
// __host__ __device__ (segloss_cuda_thread.h); only the barriers are device-only.
template <typename Compute>
__device__ void BlockReduceLanes(const Compute acc[kSlots][kNumStats], int threads, int q,
                                 Compute* smem) {
  StoreLanes(acc, threads, threadIdx.x, smem);
  for (int stride = threads / 2; stride >= q; stride /= 2) {
    __syncthreads();
    TreeStep(threads, stride, threadIdx.x, smem);
  }
  __syncthreads();
}

__device__ inline void AddCounts(const ValueCounts& counts, unsigned long long* counters) {
  if (counts.labels != 0) atomicAdd(&counters[0], static_cast<unsigned long long>(counts.labels));
  if (counts.weights != 0) atomicAdd(&counters[1], static_cast<unsigned long long>(counts.weights));
}

// Invalid class ids: the count joins the labels counter; the extremes (EncodeIdMin/Max)
// go to counters 2 and 3 (integer atomics: the result does not depend on their order).
__device__ inline void AddClassIdCounts(const ClassIdCounts& ids, unsigned long long* counters) {
  if (ids.count == 0) return;
  atomicAdd(&counters[0], static_cast<unsigned long long>(ids.count));
  atomicMax(&counters[2], EncodeIdMin(ids.min));
  atomicMax(&counters[3], EncodeIdMax(ids.max));
}

// Minimum resident blocks per SM requested from ptxas for the forward kernel (1: let it
// use the registers it wants; ~94 for 256 threads on sm_90). A build-time knob so that
// tests/gpu/check_gpu.py can time alternatives (-D FSL_CUDA_STATS_MIN_BLOCKS=3).
#ifndef FSL_CUDA_STATS_MIN_BLOCKS
#define FSL_CUDA_STATS_MIN_BLOCKS 1
#endif

template <typename LogitT, typename LabelT, bool kSquared>
__global__ void __launch_bounds__(kMaxThreadsFloat, FSL_CUDA_STATS_MIN_BLOCKS)
    StatsKernel(LaunchPlan plan, KernelProblem p, double* partials, unsigned long long* counters) {
  using Compute = typename ComputeTypeOf<LogitT>::type;
  __shared__ Compute smem[kSlots * kNumStats * MaxThreadsOf<Compute>::value];
  const int64_t block = blockIdx.x;
  const int thread = threadIdx.x;
  Compute acc[kSlots][kNumStats];
  ValueCounts counts;
  if (plan.mode == kSpanMode) {
    SpanStatsThread<LogitT, LabelT, kSquared>(plan, p, block, thread, acc, counts);
    BlockReduceLanes(acc, plan.threads, plan.thread_period, smem);
    for (int64_t index = thread; index < SpanRecordsPerBlock(p.shape); index += plan.threads) {
      WriteSpanPartial(plan, p.shape, block, smem, plan.threads, index, partials);
    }
  } else {
    ColumnStatsThread<LogitT, LabelT, kSquared>(plan, p, block, thread, acc, counts);
    WriteColumnPartial(plan, p.shape, block, thread, acc, partials);
  }
  AddCounts(counts, counters);
}

template <typename LogitT, typename LabelT, bool kSquared>
__global__ void __launch_bounds__(kMaxThreadsFloat)
    GradKernel(LaunchPlan plan, KernelProblem p, const float* grad_stats, LogitT* out) {
  const int64_t block = blockIdx.x;
  if (plan.mode == kSpanMode) {
    SpanGradThread<LogitT, LabelT, kSquared>(plan, p, grad_stats, block, threadIdx.x, out);
  } else {
    ColumnGradThread<LogitT, LabelT, kSquared>(plan, p, grad_stats, block, threadIdx.x, out);
  }
}

// Softmax forward (segloss_cuda_softmax.h): the thread's pixels, then one block
// reduction per round of kSlots classes. The barrier after each round's record writes
// keeps the next round's StoreLanes from overwriting sums still being read.
template <typename LogitT, typename LabelT, bool kSparse>
__global__ void __launch_bounds__(kMaxThreadsFloat)
    SoftmaxStatsKernel(LaunchPlan plan, KernelProblem p, double* partials,
                       unsigned long long* counters) {
  using Compute = typename ComputeTypeOf<LogitT>::type;
  __shared__ Compute smem[kSlots * kNumStats * MaxThreadsOf<Compute>::value];
  const int64_t block = blockIdx.x;
  const int thread = threadIdx.x;
  SoftmaxThreadPixels<Compute> pixels;
  {
    ClassIdCounts ids;
    SoftmaxPixelsThread<LogitT, LabelT, kSparse>(plan, p, block, thread, pixels, ids);
    AddClassIdCounts(ids, counters);
  }
  Compute acc[kSlots][kNumStats];
  for (int64_t tile = 0; tile < plan.class_tiles; ++tile) {
    ValueCounts counts;  // flushed every round: nothing but acc and pixels stays live
    SoftmaxTileThread<LogitT, LabelT, kSparse>(plan, p, pixels, tile, acc, counts);
    AddCounts(counts, counters);  // (atomics only where a value was invalid)
    BlockReduceLanes(acc, plan.threads, 1, smem);
    for (int index = thread; index < kSoftmaxRecordValues; index += plan.threads) {
      WriteSoftmaxPartial(plan, p.shape, block, tile, smem, plan.threads, index, partials);
    }
    __syncthreads();
  }
}

template <typename LogitT, typename LabelT, bool kSparse>
__global__ void __launch_bounds__(kMaxThreadsFloat)
    SoftmaxGradKernel(LaunchPlan plan, KernelProblem p, const float* grad_stats, LogitT* out) {
  SoftmaxGradThread<LogitT, LabelT, kSparse>(plan, p, grad_stats, blockIdx.x, threadIdx.x, out);
}

template <typename LogitT, typename LabelT, bool kSparse>
int LaunchSoftmaxStatsKernel(const LaunchPlan& plan, const KernelProblem& p, double* partials,
                             unsigned long long* counters, cudaStream_t stream) {
  if (plan.num_blocks == 0) return cudaSuccess;
  SoftmaxStatsKernel<LogitT, LabelT, kSparse>
      <<<static_cast<unsigned>(plan.num_blocks), plan.threads, 0, stream>>>(plan, p, partials,
                                                                            counters);
  return cudaGetLastError();
}

template <typename LogitT, typename LabelT, bool kSparse>
int LaunchSoftmaxGradKernel(const LaunchPlan& plan, const KernelProblem& p,
                            const float* grad_stats, void* out, cudaStream_t stream) {
  if (plan.num_blocks == 0) return cudaSuccess;
  SoftmaxGradKernel<LogitT, LabelT, kSparse>
      <<<static_cast<unsigned>(plan.num_blocks), plan.threads, 0, stream>>>(
          plan, p, grad_stats, static_cast<LogitT*>(out));
  return cudaGetLastError();
}

// Launches the forward kernel for one (logits, labels) dtype pair; returns a cudaError_t.
template <typename LogitT, typename LabelT>
int LaunchStatsKernel(const LaunchPlan& plan, const KernelProblem& p, bool squared,
                      double* partials, unsigned long long* counters, cudaStream_t stream) {
  if (plan.num_blocks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(plan.num_blocks)), block(plan.threads);
  if (squared) {
    StatsKernel<LogitT, LabelT, true><<<grid, block, 0, stream>>>(plan, p, partials, counters);
  } else {
    StatsKernel<LogitT, LabelT, false><<<grid, block, 0, stream>>>(plan, p, partials, counters);
  }
  return cudaGetLastError();
}

template <typename LogitT, typename LabelT>
int LaunchGradKernel(const LaunchPlan& plan, const KernelProblem& p, bool squared,
                     const float* grad_stats, void* out, cudaStream_t stream) {
  if (plan.num_blocks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(plan.num_blocks)), block(plan.threads);
  auto* typed_out = static_cast<LogitT*>(out);
  if (squared) {
    GradKernel<LogitT, LabelT, true><<<grid, block, 0, stream>>>(plan, p, grad_stats, typed_out);
  } else {
    GradKernel<LogitT, LabelT, false><<<grid, block, 0, stream>>>(plan, p, grad_stats, typed_out);
  }
  return cudaGetLastError();
}

// Explicit instantiation of both launchers for one logits type and every labels type.
#define FSL_CUDA_INSTANTIATE_PAIR(LabelT, LogitT)                                          \
  template int LaunchStatsKernel<LogitT, LabelT>(const LaunchPlan&, const KernelProblem&,  \
                                                 bool, double*, unsigned long long*,       \
                                                 cudaStream_t);                            \
  template int LaunchGradKernel<LogitT, LabelT>(const LaunchPlan&, const KernelProblem&,   \
                                                bool, const float*, void*, cudaStream_t);
// Softmax: dense labels (kSparse false, every labels type) and class ids (kSparse true).
#define FSL_CUDA_INSTANTIATE_SOFTMAX(LabelT, LogitT, kSparse)                              \
  template int LaunchSoftmaxStatsKernel<LogitT, LabelT, kSparse>(                          \
      const LaunchPlan&, const KernelProblem&, double*, unsigned long long*, cudaStream_t); \
  template int LaunchSoftmaxGradKernel<LogitT, LabelT, kSparse>(                           \
      const LaunchPlan&, const KernelProblem&, const float*, void*, cudaStream_t);
#define FSL_CUDA_INSTANTIATE_SOFTMAX_DENSE(LabelT, LogitT) \
  FSL_CUDA_INSTANTIATE_SOFTMAX(LabelT, LogitT, false)
#define FSL_CUDA_INSTANTIATE_SOFTMAX_SPARSE(IdT, LogitT) \
  FSL_CUDA_INSTANTIATE_SOFTMAX(IdT, LogitT, true)
#define FSL_CUDA_INSTANTIATE_FOR_LOGITS(LogitT)                         \
  FSL_FOR_EACH_LABEL_TYPE(FSL_CUDA_INSTANTIATE_PAIR, LogitT)            \
  FSL_FOR_EACH_LABEL_TYPE(FSL_CUDA_INSTANTIATE_SOFTMAX_DENSE, LogitT)   \
  FSL_FOR_EACH_CLASS_ID_TYPE(FSL_CUDA_INSTANTIATE_SOFTMAX_SPARSE, LogitT)

}  // namespace cuda
}  // namespace fused_segloss
