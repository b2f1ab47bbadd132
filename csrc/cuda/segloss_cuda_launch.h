// Internal: the typed kernel launchers (forward statistics and gradient, in sigmoid and
// softmax mode, and the forward's second-stage combine), defined in
// segloss_cuda_kernels.cuh and instantiated once per logits dtype in
// segloss_cuda_<dtype>.cu, called by the dispatching launcher in segloss_cuda_launch.cu.
// They return a cudaError_t value.
#pragma once

#include <cuda_runtime.h>

#include "segloss_cuda_plan.h"

namespace fused_segloss {
namespace cuda {

template <typename LogitT, typename LabelT>
int LaunchStatsKernel(const LaunchPlan& plan, const KernelProblem& p, bool squared,
                      double* partials, unsigned long long* counters, cudaStream_t stream);

template <typename LogitT, typename LabelT>
int LaunchGradKernel(const LaunchPlan& plan, const KernelProblem& p, bool squared,
                     const float* grad_stats, void* out, cudaStream_t stream);

// Softmax mode (segloss_cuda_softmax.h); kSparse: LabelT is a class-id type.
template <typename LogitT, typename LabelT, bool kSparse>
int LaunchSoftmaxStatsKernel(const LaunchPlan& plan, const KernelProblem& p, double* partials,
                             unsigned long long* counters, cudaStream_t stream);

template <typename LogitT, typename LabelT, bool kSparse>
int LaunchSoftmaxGradKernel(const LaunchPlan& plan, const KernelProblem& p,
                            const float* grad_stats, void* out, cudaStream_t stream);

// The second stage of the forward reduction (not templated).
int LaunchCombineKernel(const LaunchPlan& plan, const ProblemShape& shape,
                        const double* partials, float* stats, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_segloss
