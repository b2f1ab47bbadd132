// pybind11 module `fused_segloss._core`: the framework-free CPU kernels on NumPy arrays
// (stats -> [B, C, 8] float32, logit_grad -> dL/dlogits in the logits' dtype; operands as
// in csrc/core/segloss_cpu.h, math in csrc/core/segloss_math.h) and their work plan.
// Used by tests (TF-independent oracle checks, sanitizer builds) and by the CUDA
// host-simulation tests. Arrays must be C-contiguous (non-contiguous input is copied).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bind_problem.h"
#include "segloss_cpu.h"

namespace py = pybind11;
using fused_segloss_py::BindProblem;
using fused_segloss_py::OptionsFromArgs;
using fused_segloss_py::BoundProblem;

namespace {

// A ParallelFor over `threads` std::threads, each taking a contiguous range.
fused_segloss::ParallelFor ThreadedFor(int threads) {
  return [threads](int64_t n, int64_t, const fused_segloss::RangeFn& fn) {
    if (n <= 0) return;
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, n));
    std::vector<std::thread> pool;
    const int64_t per = (n + workers - 1) / workers;
    for (int64_t w = 0; w < workers; ++w) {
      const int64_t begin = w * per, end = std::min(n, begin + per);
      if (begin < end) pool.emplace_back([&fn, begin, end] { fn(begin, end); });
    }
    for (auto& t : pool) t.join();
  };
}

py::array_t<float> Stats(const py::object& logits, const py::object& labels,
                         const py::object& weights, const py::object& pos_weight,
                         bool channels_last, bool squared, int threads, float focal_gamma,
                         float focal_alpha, const std::string& activation,
                         const py::object& ignore_index) {
  BoundProblem b = BindProblem(logits, labels, weights, pos_weight,
                               OptionsFromArgs(channels_last, squared, focal_gamma, focal_alpha,
                                               activation, ignore_index));
  py::array_t<float> out({b.problem.shape.batch, b.problem.shape.classes, int64_t{8}});
  std::string error;
  {
    py::gil_scoped_release release;
    error = fused_segloss::ComputeStatsCpu(b.problem, ThreadedFor(threads), out.mutable_data());
  }
  if (!error.empty()) throw py::value_error(error);
  return out;
}

py::array LogitGrad(const py::object& logits, const py::object& labels,
                    const py::object& weights, const py::object& pos_weight,
                    const py::object& grad_stats_obj, bool channels_last, bool squared,
                    int threads, float focal_gamma, float focal_alpha,
                    const std::string& activation, const py::object& ignore_index) {
  BoundProblem b = BindProblem(logits, labels, weights, pos_weight,
                               OptionsFromArgs(channels_last, squared, focal_gamma, focal_alpha,
                                               activation, ignore_index));
  py::array_t<float, py::array::c_style | py::array::forcecast> grad_stats(grad_stats_obj);
  if (grad_stats.ndim() != 3 || grad_stats.shape(0) != b.problem.shape.batch ||
      grad_stats.shape(1) != b.problem.shape.classes || grad_stats.shape(2) != 8) {
    throw py::value_error("`grad_stats` must have shape [B, C, 8]");
  }
  py::array out = py::module_::import("numpy").attr("empty_like")(b.logits);
  std::string error;
  {
    py::gil_scoped_release release;
    error = fused_segloss::ComputeLogitGradCpu(b.problem, grad_stats.data(),
                                               ThreadedFor(threads), out.mutable_data());
  }
  if (!error.empty()) throw py::value_error(error);
  return out;
}

}  // namespace

// Other translation units of this module (e.g. the CUDA host simulation) add their
// functions through this hook.
void RegisterCudaSimulation(py::module_& m) __attribute__((weak));

PYBIND11_MODULE(_core, m) {
  m.doc() = "fused_segloss CPU core kernels on NumPy arrays";
  m.def("stats", &Stats, py::arg("logits"), py::arg("labels"), py::arg("weights") = py::none(),
        py::arg("pos_weight") = py::none(), py::arg("channels_last") = true,
        py::arg("squared") = false, py::arg("threads") = 1, py::arg("focal_gamma") = 0.0f,
        py::arg("focal_alpha") = -1.0f, py::arg("activation") = "sigmoid",
        py::arg("ignore_index") = py::none(),
        "[B, C, 8] float32 statistics; weights in the canonical rank-3 view.");
  m.def("logit_grad", &LogitGrad, py::arg("logits"), py::arg("labels"),
        py::arg("weights") = py::none(), py::arg("pos_weight") = py::none(),
        py::arg("grad_stats"), py::arg("channels_last") = true, py::arg("squared") = false,
        py::arg("threads") = 1, py::arg("focal_gamma") = 0.0f, py::arg("focal_alpha") = -1.0f,
        py::arg("activation") = "sigmoid", py::arg("ignore_index") = py::none(),
        "dL/dlogits in the logits' dtype.");
  m.def("work_plan", [](int64_t batch, int64_t positions, int64_t classes, bool channels_last) {
    fused_segloss::ProblemShape s{batch, positions, classes, channels_last};
    auto plan = fused_segloss::MakeStatsWorkPlan(s);
    return py::make_tuple(plan.positions_per_item, plan.items_per_row, plan.num_items,
                          fused_segloss::AccumulatorPeriod(s));
  });
  if (RegisterCudaSimulation) RegisterCudaSimulation(m);
}
