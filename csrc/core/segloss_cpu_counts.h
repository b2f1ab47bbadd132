// Internal to the CPU forward passes (segloss_cpu_forward.cc, sigmoid, and
// segloss_cpu_softmax_forward.cc, softmax): what they count while they run and the one error
// they report after the pass. Invalid values never stop a pass early: every work item counts
// its own, and the totals decide the message, so the message does not depend on the thread
// count. Host only; not for the framework adapters.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "dtypes.h"
#include "segloss_cpu.h"

namespace fused_segloss {
namespace cpu {

struct ForwardCounts {
  int64_t invalid_labels = 0;    // dense labels outside [0, 1] or NaN
  int64_t invalid_weights = 0;   // negative, infinite or NaN weights
  int64_t nonfinite_logits = 0;  // counted only with check_numerics
  // Class ids outside [0, C) that are not ignore_index (sparse labels): how many, the
  // smallest, the largest.
  int64_t bad_ids = 0;
  int64_t bad_id_min = std::numeric_limits<int64_t>::max();
  int64_t bad_id_max = std::numeric_limits<int64_t>::min();

  void AddBadId(int64_t id) {
    ++bad_ids;
    bad_id_min = std::min(bad_id_min, id);
    bad_id_max = std::max(bad_id_max, id);
  }
  void Add(const ForwardCounts& o) {
    invalid_labels += o.invalid_labels;
    invalid_weights += o.invalid_weights;
    nonfinite_logits += o.nonfinite_logits;
    bad_ids += o.bad_ids;
    bad_id_min = std::min(bad_id_min, o.bad_id_min);
    bad_id_max = std::max(bad_id_max, o.bad_id_max);
  }
};

// NaN and ±Inf among count values of any storage or compute type.
template <typename T>
int64_t CountNonFinite(const T* x, int64_t count) {
  int64_t nonfinite = 0;
  for (int64_t i = 0; i < count; ++i) {
    const auto v = ToCompute(x[i]);
    nonfinite += Abs(v) <= std::numeric_limits<decltype(v)>::max() ? 0 : 1;  // NaN too
  }
  return nonfinite;
}

// "" when the pass found nothing invalid; else non-finite logits (check_numerics) first,
// then class ids, then labels and weights (the messages shared with the CUDA launcher).
inline std::string ForwardCountsMessage(const SeglossProblem& p, const ForwardCounts& c) {
  if (c.nonfinite_logits > 0) {
    return "`logits` contain " + std::to_string(c.nonfinite_logits) +
           " NaN or Inf value(s) (check_numerics=True)";
  }
  std::string error = InvalidClassIdsMessage(p, c.bad_ids, c.bad_id_min, c.bad_id_max);
  if (error.empty()) error = InvalidValuesMessage(c.invalid_labels, c.invalid_weights);
  return error;
}

}  // namespace cpu
}  // namespace fused_segloss
