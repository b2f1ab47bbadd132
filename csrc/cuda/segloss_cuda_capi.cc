// A C ABI over the CUDA launchers and the CPU core, for the TF-free standalone library
// libfused_segloss_cuda.so (tests/gpu/check_gpu.py loads it with ctypes and passes
// CuPy / PyTorch device pointers and stream handles). Not part of the TF op library.
//
// dtype codes are fused_segloss::DType values (dtypes.h): 0 float32, 1 float64, 2 float16,
// 3 bfloat16, 4 uint8, 5 bool, 6 int32, 7 int64. weights: null or the canonical rank-3
// view whose dims are (weights_batch, weights_positions, weights_classes), each 1 or full.
// The *_softmax_* functions take activation = softmax and its options after the problem:
// sparse (labels are [B, N] class ids), has_ignore_index, ignore_index, focal_gamma.
// Every function returns 0 on success; the *_error_message functions give the text.
#include <cstdint>
#include <string>

#include "segloss_cpu.h"
#include "segloss_cuda.h"

namespace {

thread_local std::string cpu_error;

fused_segloss::SeglossProblem MakeProblem(const void* logits, int logits_dtype,
                                          const void* labels, int labels_dtype,
                                          const float* weights, int64_t weights_batch,
                                          int64_t weights_positions, int64_t weights_classes,
                                          const float* pos_weight, int64_t batch,
                                          int64_t positions, int64_t classes,
                                          int channels_last, int squared) {
  fused_segloss::SeglossProblem p;
  p.shape.batch = batch;
  p.shape.positions = positions;
  p.shape.classes = classes;
  p.shape.channels_last = channels_last != 0;
  p.logits_dtype = static_cast<fused_segloss::DType>(logits_dtype);
  p.labels_dtype = static_cast<fused_segloss::DType>(labels_dtype);
  p.logits = logits;
  p.labels = labels;
  p.weights = weights;
  p.weights_batch = weights_batch;
  p.weights_positions = weights_positions;
  p.weights_classes = weights_classes;
  p.pos_weight = pos_weight;
  p.squared = squared != 0;
  return p;
}

#define FSL_CAPI_PROBLEM_ARGS                                                            \
  const void *logits, int logits_dtype, const void *labels, int labels_dtype,            \
      const float *weights, int64_t weights_batch, int64_t weights_positions,            \
      int64_t weights_classes, const float *pos_weight, int64_t batch, int64_t positions, \
      int64_t classes, int channels_last, int squared
#define FSL_CAPI_PROBLEM                                                                  \
  MakeProblem(logits, logits_dtype, labels, labels_dtype, weights, weights_batch,         \
              weights_positions, weights_classes, pos_weight, batch, positions, classes, \
              channels_last, squared)

#define FSL_CAPI_SOFTMAX_ARGS \
  FSL_CAPI_PROBLEM_ARGS, int sparse, int has_ignore_index, int64_t ignore_index, float focal_gamma
#define FSL_CAPI_SOFTMAX_PROBLEM \
  Softmax(FSL_CAPI_PROBLEM, sparse, has_ignore_index, ignore_index, focal_gamma)

fused_segloss::SeglossProblem Softmax(fused_segloss::SeglossProblem p, int sparse,
                                      int has_ignore_index, int64_t ignore_index,
                                      float focal_gamma) {
  p.activation = fused_segloss::Activation::kSoftmax;
  p.sparse_labels = sparse != 0;
  p.has_ignore_index = has_ignore_index != 0;
  p.ignore_index = ignore_index;
  p.focal.gamma = focal_gamma;
  return p;
}

}  // namespace

extern "C" {

// Device pointers; stream is a cudaStream_t (0 = the legacy default stream).
int fsl_cuda_stats(FSL_CAPI_PROBLEM_ARGS, float* stats_out, void* stream, int check_values) {
  fused_segloss::cuda::StatsOptions options;
  options.check_values = check_values != 0;
  return fused_segloss::cuda::LaunchStats(FSL_CAPI_PROBLEM, stats_out, stream, options);
}

int fsl_cuda_logit_grad(FSL_CAPI_PROBLEM_ARGS, const float* grad_stats, void* grad_out,
                        void* stream) {
  return fused_segloss::cuda::LaunchLogitGrad(FSL_CAPI_PROBLEM, grad_stats, grad_out, stream);
}

const char* fsl_cuda_error_message(int code) { return fused_segloss::cuda::ErrorMessage(code); }

// Host pointers: the CPU core kernels, single-threaded.
int fsl_cpu_stats(FSL_CAPI_PROBLEM_ARGS, float* stats_out) {
  cpu_error = fused_segloss::ComputeStatsCpu(FSL_CAPI_PROBLEM, fused_segloss::SerialFor, stats_out);
  return cpu_error.empty() ? 0 : 1;
}

int fsl_cpu_logit_grad(FSL_CAPI_PROBLEM_ARGS, const float* grad_stats, void* grad_out) {
  cpu_error = fused_segloss::ComputeLogitGradCpu(FSL_CAPI_PROBLEM, grad_stats,
                                                 fused_segloss::SerialFor, grad_out);
  return cpu_error.empty() ? 0 : 1;
}

const char* fsl_cpu_error_message() { return cpu_error.c_str(); }

// Softmax mode: the same four entry points.
int fsl_cuda_softmax_stats(FSL_CAPI_SOFTMAX_ARGS, float* stats_out, void* stream,
                           int check_values) {
  fused_segloss::cuda::StatsOptions options;
  options.check_values = check_values != 0;
  return fused_segloss::cuda::LaunchStats(FSL_CAPI_SOFTMAX_PROBLEM, stats_out, stream, options);
}

int fsl_cuda_softmax_logit_grad(FSL_CAPI_SOFTMAX_ARGS, const float* grad_stats, void* grad_out,
                                void* stream) {
  return fused_segloss::cuda::LaunchLogitGrad(FSL_CAPI_SOFTMAX_PROBLEM, grad_stats, grad_out,
                                              stream);
}

int fsl_cpu_softmax_stats(FSL_CAPI_SOFTMAX_ARGS, float* stats_out) {
  cpu_error = fused_segloss::ComputeStatsCpu(FSL_CAPI_SOFTMAX_PROBLEM, fused_segloss::SerialFor,
                                             stats_out);
  return cpu_error.empty() ? 0 : 1;
}

int fsl_cpu_softmax_logit_grad(FSL_CAPI_SOFTMAX_ARGS, const float* grad_stats, void* grad_out) {
  cpu_error = fused_segloss::ComputeLogitGradCpu(FSL_CAPI_SOFTMAX_PROBLEM, grad_stats,
                                                 fused_segloss::SerialFor, grad_out);
  return cpu_error.empty() ? 0 : 1;
}

}  // extern "C"
