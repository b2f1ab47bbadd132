// pybind11 module `fused_segloss._core`: the framework-free CPU kernels on NumPy arrays.
// Used by tests (TF-independent oracle checks, sanitizer builds) and by the CUDA
// host-simulation tests. Arrays must be C-contiguous (non-contiguous input is copied).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "segloss_cpu.h"

namespace py = pybind11;
using fused_segloss::DType;

namespace {

DType DTypeOf(const py::array& a, const char* arg) {
  const std::string name = py::str(a.dtype().attr("name"));
  if (name == "float32") return DType::kFloat32;
  if (name == "float64") return DType::kFloat64;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "uint8") return DType::kUInt8;
  if (name == "bool") return DType::kBool;
  const bool labels = std::string(arg) == "labels";
  throw py::value_error(std::string("`") + arg + "` has unsupported dtype " + name +
                        "; expected float16, bfloat16, float32 or float64" +
                        (labels ? ", uint8 or bool" : ""));
}

// C-contiguous and in native byte order (the kernels read raw memory).
py::array Contiguous(const py::object& obj) {
  py::array a = py::module_::import("numpy").attr("ascontiguousarray")(obj);
  if (!a.dtype().attr("isnative").cast<bool>()) {
    a = a.attr("astype")(a.dtype().attr("newbyteorder")("="));
  }
  return a;
}

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

struct BoundProblem {
  fused_segloss::SeglossProblem problem;
  py::array logits, labels, weights, pos_weight;  // keep the buffers alive
};

BoundProblem Bind(const py::object& logits_obj, const py::object& labels_obj,
                  const py::object& weights_obj, const py::object& pos_weight_obj,
                  bool channels_last, bool squared) {
  BoundProblem b;
  b.logits = Contiguous(logits_obj);
  b.labels = Contiguous(labels_obj);
  auto& p = b.problem;
  const int rank = static_cast<int>(b.logits.ndim());
  if (rank < 2 || rank > 5) throw py::value_error("`logits` must have rank 2 to 5");
  if (b.labels.ndim() != rank) throw py::value_error("`labels` must have the logits' shape");
  for (int d = 0; d < rank; ++d) {
    if (b.labels.shape(d) != b.logits.shape(d)) {
      throw py::value_error("`labels` must have the logits' shape");
    }
  }
  p.shape.channels_last = channels_last;
  p.shape.batch = b.logits.shape(0);
  const int class_axis = channels_last ? rank - 1 : 1;
  p.shape.classes = b.logits.shape(class_axis);
  p.shape.positions = 1;
  for (int d = 1; d < rank; ++d) {
    if (d != class_axis) p.shape.positions *= b.logits.shape(d);
  }
  p.logits_dtype = DTypeOf(b.logits, "logits");
  p.labels_dtype = DTypeOf(b.labels, "labels");
  if (p.logits_dtype == DType::kUInt8 || p.logits_dtype == DType::kBool) {
    throw py::value_error("`logits` must be a float array");
  }
  p.logits = b.logits.data();
  p.labels = b.labels.data();
  if (!weights_obj.is_none()) {
    b.weights = py::array_t<float, py::array::c_style | py::array::forcecast>(weights_obj);
    if (b.weights.ndim() != 3) throw py::value_error("`weights` must be a canonical rank-3 view");
    p.weights = static_cast<const float*>(b.weights.data());
    p.weights_batch = b.weights.shape(0);
    p.weights_positions = b.weights.shape(channels_last ? 1 : 2);
    p.weights_classes = b.weights.shape(channels_last ? 2 : 1);
  }
  if (!pos_weight_obj.is_none()) {
    b.pos_weight = py::array_t<float, py::array::c_style | py::array::forcecast>(pos_weight_obj);
    if (b.pos_weight.ndim() != 1 || b.pos_weight.shape(0) != p.shape.classes) {
      throw py::value_error("`pos_weight` must have shape [C]");
    }
    p.pos_weight = static_cast<const float*>(b.pos_weight.data());
  }
  p.squared = squared;
  return b;
}

py::array_t<float> Stats(const py::object& logits, const py::object& labels,
                         const py::object& weights, const py::object& pos_weight,
                         bool channels_last, bool squared, int threads) {
  BoundProblem b = Bind(logits, labels, weights, pos_weight, channels_last, squared);
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
                    int threads) {
  BoundProblem b = Bind(logits, labels, weights, pos_weight, channels_last, squared);
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
        py::arg("squared") = false, py::arg("threads") = 1,
        "[B, C, 8] float32 statistics; weights in the canonical rank-3 view.");
  m.def("logit_grad", &LogitGrad, py::arg("logits"), py::arg("labels"),
        py::arg("weights") = py::none(), py::arg("pos_weight") = py::none(),
        py::arg("grad_stats"), py::arg("channels_last") = true, py::arg("squared") = false,
        py::arg("threads") = 1, "dL/dlogits in the logits' dtype.");
  m.def("work_plan", [](int64_t batch, int64_t positions, int64_t classes, bool channels_last) {
    fused_segloss::ProblemShape s{batch, positions, classes, channels_last};
    auto plan = fused_segloss::MakeStatsWorkPlan(s);
    return py::make_tuple(plan.positions_per_item, plan.items_per_row, plan.num_items,
                          fused_segloss::AccumulatorPeriod(s));
  });
  if (RegisterCudaSimulation) RegisterCudaSimulation(m);
}
