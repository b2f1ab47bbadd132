// Host simulation of the CUDA kernels, added to fused_segloss._core: the statistics and
// the gradient a CUDA launch would compute, with the same operands as the CPU kernels
// (NumPy arrays bound by bind_problem.h) and the same per-element math (segloss_math.h).
//
// Runs the kernels' own __host__ __device__ code (csrc/cuda/segloss_cuda_thread.h, and
// segloss_cuda_softmax.h for activation="softmax", dense or sparse labels) for
// every (block, thread) of the launch that the CUDA launcher would make, on NumPy
// arrays, with the host compiler (no CUDA needed). The only things not executed as on
// the device are the barriers of the intra-block reduction: the host runs each tree
// step for all threads in turn, which is equivalent because a step's writes never
// overlap its reads. Then the second stage (CombineStat) runs for every output.
//
//   simulate_cuda_stats(logits, labels, weights=None, pos_weight=None, channels_last=True,
//                       squared=False, vector_loads=True, focal_gamma=0, focal_alpha=-1,
//                       activation="sigmoid", ignore_index=None)
//                                                                     -> [B, C, 8] float32
//   simulate_cuda_grad(logits, labels, weights=None, pos_weight=None, grad_stats=...,
//                      channels_last=True, squared=False, vector_loads=True, focal_gamma=0,
//                      focal_alpha=-1, activation="sigmoid", ignore_index=None)
//                                                                     -> like logits
// (focal_alpha < 0: no alpha; the focal options as the TF op's attributes)
//   cuda_launch_plan(batch, positions, classes, channels_last=True, logits_dtype="float32",
//                    activation="sigmoid")
//
// vector_loads=False forces the masked scalar path everywhere (the launcher chooses
// vector loads when the pointers are aligned; the simulation follows the same rule
// and this flag can only turn it off). Partial records start as NaN so a record that
// no block writes shows up in the result; the gradient output starts as NaN for the
// same reason.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_problem.h"
#include "dtypes.h"
#include "segloss_cpu.h"
#include "segloss_cuda_plan.h"
#include "segloss_cuda_problem.h"
#include "segloss_cuda_softmax.h"
#include "segloss_cuda_thread.h"

namespace py = pybind11;

namespace {

using fused_segloss::DType;
using fused_segloss::SeglossProblem;
namespace fc = fused_segloss::cuda;

// The shared NumPy binding, plus the CUDA launcher's own shape check.
fused_segloss_py::BoundProblem Bind(const py::object& logits, const py::object& labels,
                                    const py::object& weights, const py::object& pos_weight,
                                    const fused_segloss::ProblemOptions& options) {
  auto b = fused_segloss_py::BindProblem(logits, labels, weights, pos_weight, options);
  const std::string error = fc::CheckLaunchProblem(b.problem);
  if (!error.empty()) throw py::value_error(error);
  return b;
}

fc::KernelProblem KernelProblemFor(const SeglossProblem& p, const void* grad_out,
                                   bool vector_loads) {
  fc::KernelProblem k = fc::MakeKernelProblem(p, grad_out);
  k.vector_loads = k.vector_loads && vector_loads;
  return k;
}

// The launcher's second stage: every (image, class, column) from the block records.
void CombineAll(const fc::LaunchPlan& plan, const fused_segloss::ProblemShape& s,
                const std::vector<double>& partials, float* stats) {
  constexpr int kStats = fused_segloss::kNumStats;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t c = 0; c < s.classes; ++c) {
      for (int k = 0; k < kStats; ++k) {
        stats[(b * s.classes + c) * kStats + k] =
            fc::CombineStat(plan, s, partials.data(), b, c, k);
      }
    }
  }
}

// The forward launch, block by block and thread by thread. Returns the error message
// ("" if the values are valid), the statistics in `stats`.
template <typename LogitT, typename LabelT, bool kSquared>
std::string SimulateStats(const SeglossProblem& p, bool vector_loads, float* stats) {
  using Compute = typename fused_segloss::ComputeTypeOf<LogitT>::type;
  constexpr int kStats = fused_segloss::kNumStats;
  const fc::LaunchPlan plan = fc::MakeLaunchPlan(p.shape, fc::MaxThreadsFor(p.logits_dtype));
  const fc::KernelProblem kp = KernelProblemFor(p, nullptr, vector_loads);
  std::vector<double> partials(plan.partial_records * kStats,
                               std::numeric_limits<double>::quiet_NaN());
  std::vector<Compute> smem(static_cast<size_t>(fc::kSlots) * kStats * plan.threads);
  fc::ValueCounts total;
  Compute acc[fc::kSlots][kStats];
  for (int64_t block = 0; block < plan.num_blocks; ++block) {
    for (int t = 0; t < plan.threads; ++t) {
      fc::ValueCounts counts;
      if (plan.mode == fc::kSpanMode) {
        fc::SpanStatsThread<LogitT, LabelT, kSquared>(plan, kp, block, t, acc, counts);
        fc::StoreLanes(acc, plan.threads, t, smem.data());
      } else {
        fc::ColumnStatsThread<LogitT, LabelT, kSquared>(plan, kp, block, t, acc, counts);
        fc::WriteColumnPartial(plan, p.shape, block, t, acc, partials.data());
      }
      total.labels += counts.labels;
      total.weights += counts.weights;
    }
    if (plan.mode != fc::kSpanMode) continue;
    for (int stride = plan.threads / 2; stride >= plan.thread_period; stride /= 2) {
      for (int t = 0; t < plan.threads; ++t) fc::TreeStep(plan.threads, stride, t, smem.data());
    }
    const int64_t records = fc::SpanRecordsPerBlock(p.shape);
    for (int64_t t0 = 0; t0 < plan.threads; ++t0) {  // the device's thread loop
      for (int64_t index = t0; index < records; index += plan.threads) {
        fc::WriteSpanPartial(plan, p.shape, block, smem.data(), plan.threads, index,
                             partials.data());
      }
    }
  }
  const std::string error = fused_segloss::InvalidValuesMessage(total.labels, total.weights);
  if (!error.empty()) return error;
  CombineAll(plan, p.shape, partials, stats);
  return "";
}

// The softmax forward launch (SoftmaxStatsKernel in segloss_cuda_kernels.cuh): every
// thread's pixels, then per class round every thread's sums, the tree, the records.
template <typename LogitT, typename LabelT, bool kSparse>
std::string SimulateSoftmaxStats(const SeglossProblem& p, float* stats) {
  using Compute = typename fused_segloss::ComputeTypeOf<LogitT>::type;
  constexpr int kStats = fused_segloss::kNumStats;
  const fc::LaunchPlan plan = fc::PlanForProblem(p);
  const fc::KernelProblem kp = fc::MakeKernelProblem(p, nullptr);
  std::vector<double> partials(plan.partial_records * kStats,
                               std::numeric_limits<double>::quiet_NaN());
  std::vector<Compute> smem(static_cast<size_t>(fc::kSlots) * kStats * plan.threads);
  std::vector<fc::SoftmaxThreadPixels<Compute>> pixels(plan.threads);
  std::vector<fc::ValueCounts> counts(plan.threads);
  fc::ClassIdCounts ids_total;
  Compute acc[fc::kSlots][kStats];
  for (int64_t block = 0; block < plan.num_blocks; ++block) {
    for (int t = 0; t < plan.threads; ++t) {
      fc::ClassIdCounts ids;
      fc::SoftmaxPixelsThread<LogitT, LabelT, kSparse>(plan, kp, block, t, pixels[t], ids);
      if (ids.count == 0) continue;  // the device's AddClassIdCounts
      ids_total.min = ids_total.count == 0 || ids.min < ids_total.min ? ids.min : ids_total.min;
      ids_total.max = ids_total.count == 0 || ids.max > ids_total.max ? ids.max : ids_total.max;
      ids_total.count += ids.count;
    }
    for (int64_t tile = 0; tile < plan.class_tiles; ++tile) {
      for (int t = 0; t < plan.threads; ++t) {
        fc::SoftmaxTileThread<LogitT, LabelT, kSparse>(plan, kp, pixels[t], tile, acc,
                                                       counts[t]);
        fc::StoreLanes(acc, plan.threads, t, smem.data());
      }
      for (int stride = plan.threads / 2; stride >= 1; stride /= 2) {
        for (int t = 0; t < plan.threads; ++t) fc::TreeStep(plan.threads, stride, t, smem.data());
      }
      for (int t = 0; t < plan.threads; ++t) {
        for (int index = t; index < fc::kSoftmaxRecordValues; index += plan.threads) {
          fc::WriteSoftmaxPartial(plan, p.shape, block, tile, smem.data(), plan.threads, index,
                                  partials.data());
        }
      }
    }
  }
  fc::ValueCounts total;
  for (const fc::ValueCounts& c : counts) {
    total.labels += c.labels;
    total.weights += c.weights;
  }
  std::string error = fused_segloss::InvalidClassIdsMessage(p, ids_total.count, ids_total.min,
                                                            ids_total.max);
  if (error.empty()) error = fused_segloss::InvalidValuesMessage(total.labels, total.weights);
  if (!error.empty()) return error;
  CombineAll(plan, p.shape, partials, stats);
  return "";
}

template <typename LogitT, typename LabelT, bool kSparse>
void SimulateSoftmaxGrad(const SeglossProblem& p, const float* grad_stats, void* out) {
  const fc::LaunchPlan plan = fc::PlanForProblem(p);
  const fc::KernelProblem kp = fc::MakeKernelProblem(p, out);
  for (int64_t block = 0; block < plan.num_blocks; ++block) {
    for (int t = 0; t < plan.threads; ++t) {
      fc::SoftmaxGradThread<LogitT, LabelT, kSparse>(plan, kp, grad_stats, block, t,
                                                     static_cast<LogitT*>(out));
    }
  }
}

// Runs fn(LogitT{}, LabelT{}, std::bool_constant<kSparse>{}) for the problem's dtypes, as
// the launcher dispatches (class-id types for sparse labels).
template <typename Result, typename Fn>
Result DispatchProblem(const SeglossProblem& p, Result unsupported, Fn&& fn) {
  return fused_segloss::DispatchLabelDTypes<Result>(p.sparse_labels, p.logits_dtype,
                                                    p.labels_dtype, unsupported, fn);
}

template <typename LogitT, typename LabelT, bool kSquared>
void SimulateGrad(const SeglossProblem& p, bool vector_loads, const float* grad_stats,
                  void* out) {
  const fc::LaunchPlan plan = fc::MakeLaunchPlan(p.shape, fc::MaxThreadsFor(p.logits_dtype));
  const fc::KernelProblem kp = KernelProblemFor(p, out, vector_loads);
  auto* typed_out = static_cast<LogitT*>(out);
  for (int64_t block = 0; block < plan.num_blocks; ++block) {
    for (int t = 0; t < plan.threads; ++t) {
      if (plan.mode == fc::kSpanMode) {
        fc::SpanGradThread<LogitT, LabelT, kSquared>(plan, kp, grad_stats, block, t, typed_out);
      } else {
        fc::ColumnGradThread<LogitT, LabelT, kSquared>(plan, kp, grad_stats, block, t, typed_out);
      }
    }
  }
}

// A vector access the device would fault on is a bug in the plan, not in the input.
void CheckAlignment() {
  const int64_t misaligned = fc::HostMisalignedGroupAccesses();
  if (misaligned != 0) {
    throw std::runtime_error("simulated CUDA launch made " + std::to_string(misaligned) +
                             " misaligned vector accesses");
  }
}

py::array_t<float> SimulateStatsPy(const py::object& logits, const py::object& labels,
                                   const py::object& weights, const py::object& pos_weight,
                                   bool channels_last, bool squared, bool vector_loads,
                                   float focal_gamma, float focal_alpha,
                                   const std::string& activation, const py::object& ignore_index) {
  auto b = Bind(logits, labels, weights, pos_weight,
                fused_segloss_py::OptionsFromArgs(channels_last, squared, focal_gamma,
                                                  focal_alpha, activation, ignore_index));
  const SeglossProblem& p = b.problem;
  py::array_t<float> out({p.shape.batch, p.shape.classes, int64_t{8}});
  float* stats = out.mutable_data();
  std::string error;
  fc::HostMisalignedGroupAccesses() = 0;
  {
    py::gil_scoped_release release;
    const bool softmax = p.activation == fused_segloss::Activation::kSoftmax;
    error = DispatchProblem<std::string>(
        p, "unsupported dtypes", [&](auto logit_tag, auto label_tag, auto sparse) {
          using LogitT = decltype(logit_tag);
          using LabelT = decltype(label_tag);
          if constexpr (decltype(sparse)::value) {
            return SimulateSoftmaxStats<LogitT, LabelT, true>(p, stats);
          } else {
            if (softmax) return SimulateSoftmaxStats<LogitT, LabelT, false>(p, stats);
            return p.squared ? SimulateStats<LogitT, LabelT, true>(p, vector_loads, stats)
                             : SimulateStats<LogitT, LabelT, false>(p, vector_loads, stats);
          }
        });
  }
  if (!error.empty()) throw py::value_error(error);
  CheckAlignment();
  return out;
}

py::array SimulateGradPy(const py::object& logits, const py::object& labels,
                         const py::object& weights, const py::object& pos_weight,
                         const py::object& grad_stats_obj, bool channels_last, bool squared,
                         bool vector_loads, float focal_gamma, float focal_alpha,
                         const std::string& activation, const py::object& ignore_index) {
  auto b = Bind(logits, labels, weights, pos_weight,
                fused_segloss_py::OptionsFromArgs(channels_last, squared, focal_gamma,
                                                  focal_alpha, activation, ignore_index));
  const SeglossProblem& p = b.problem;
  py::array_t<float, py::array::c_style | py::array::forcecast> grad_stats(grad_stats_obj);
  if (grad_stats.ndim() != 3 || grad_stats.shape(0) != p.shape.batch ||
      grad_stats.shape(1) != p.shape.classes || grad_stats.shape(2) != 8) {
    throw py::value_error("`grad_stats` must have shape [B, C, 8]");
  }
  auto np = py::module_::import("numpy");
  py::array out = np.attr("full_like")(b.logits, np.attr("nan"));
  void* out_data = out.mutable_data();
  const float* g = grad_stats.data();
  fc::HostMisalignedGroupAccesses() = 0;
  {
    py::gil_scoped_release release;
    const bool softmax = p.activation == fused_segloss::Activation::kSoftmax;
    DispatchProblem<int>(p, 0, [&](auto logit_tag, auto label_tag, auto sparse) {
          using LogitT = decltype(logit_tag);
          using LabelT = decltype(label_tag);
          if constexpr (decltype(sparse)::value) {
            SimulateSoftmaxGrad<LogitT, LabelT, true>(p, g, out_data);
          } else if (softmax) {
            SimulateSoftmaxGrad<LogitT, LabelT, false>(p, g, out_data);
          } else if (p.squared) {
            SimulateGrad<LogitT, LabelT, true>(p, vector_loads, g, out_data);
          } else {
            SimulateGrad<LogitT, LabelT, false>(p, vector_loads, g, out_data);
          }
          return 0;
        });
  }
  CheckAlignment();
  return out;
}

py::dict LaunchPlanPy(int64_t batch, int64_t positions, int64_t classes, bool channels_last,
                      const std::string& logits_dtype, const std::string& activation) {
  SeglossProblem p;
  p.shape = fused_segloss::ProblemShape{batch, positions, classes, channels_last};
  p.logits_dtype = fused_segloss_py::DTypeOfArray(
      py::array(py::module_::import("numpy").attr("empty")(0, logits_dtype)), "logits");
  p.activation = fused_segloss_py::OptionsFromArgs(channels_last, false, 0.0f, -1.0f,
                                                   activation, py::none()).activation;
  const fc::LaunchPlan plan = fc::PlanForProblem(p);
  py::dict d;
  d["mode"] = plan.mode == fc::kSpanMode ? "span" : plan.mode == fc::kColumnMode ? "column"
                                                                                  : "softmax";
  d["threads"] = plan.threads;
  d["thread_period"] = plan.thread_period;
  d["lanes"] = plan.lanes;
  d["rows"] = plan.rows;
  d["row_length"] = plan.row_length;
  d["chunk_length"] = plan.chunk_length;
  d["chunks_per_row"] = plan.chunks_per_row;
  d["class_tiles"] = plan.class_tiles;
  d["num_blocks"] = plan.num_blocks;
  d["partial_records"] = plan.partial_records;
  return d;
}

}  // namespace

// Called by PYBIND11_MODULE(_core) in core_module.cc (a weak symbol there).
void RegisterCudaSimulation(py::module_& m) {
  m.def("simulate_cuda_stats", &SimulateStatsPy, py::arg("logits"), py::arg("labels"),
        py::arg("weights") = py::none(), py::arg("pos_weight") = py::none(),
        py::arg("channels_last") = true, py::arg("squared") = false,
        py::arg("vector_loads") = true, py::arg("focal_gamma") = 0.0f,
        py::arg("focal_alpha") = -1.0f, py::arg("activation") = "sigmoid",
        py::arg("ignore_index") = py::none(),
        "The CUDA forward launch simulated on the host: [B, C, 8] float32.");
  m.def("simulate_cuda_grad", &SimulateGradPy, py::arg("logits"), py::arg("labels"),
        py::arg("weights") = py::none(), py::arg("pos_weight") = py::none(),
        py::arg("grad_stats"), py::arg("channels_last") = true, py::arg("squared") = false,
        py::arg("vector_loads") = true, py::arg("focal_gamma") = 0.0f,
        py::arg("focal_alpha") = -1.0f, py::arg("activation") = "sigmoid",
        py::arg("ignore_index") = py::none(),
        "The CUDA gradient launch simulated on the host: dL/dlogits in the logits' dtype.");
  m.def("cuda_launch_plan", &LaunchPlanPy, py::arg("batch"), py::arg("positions"),
        py::arg("classes"), py::arg("channels_last") = true,
        py::arg("logits_dtype") = "float32", py::arg("activation") = "sigmoid",
        "The CUDA launch geometry for a problem shape.");
}
