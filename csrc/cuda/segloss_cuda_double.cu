// Kernel instantiations (segloss_cuda_kernels.cuh: forward statistics and gradient, sigmoid
// and softmax) for double logits and every labels dtype of dtypes.h (class-id dtypes
// too, for sparse softmax). One file per logits dtype, so that a parallel build compiles
// them concurrently.
#include "segloss_cuda_kernels.cuh"

namespace fused_segloss {
namespace cuda {
FSL_CUDA_INSTANTIATE_FOR_LOGITS(double)
}  // namespace cuda
}  // namespace fused_segloss
