// The CPU kernels alone: one thread, inputs in cache, no framework.
//
// Why: the Python bench times whole steps, in which the two passes share the time with
// TensorFlow, the thread pool and the memory system; the cost of the arithmetic itself
// (what vectorisation, polynomial degree or register pressure change) is hidden there.
// This tool times ComputeStatsCpu and ComputeLogitGradCpu on the calling thread, many
// times over buffers small enough to stay in L2, and reports ns per element. It also
// measures the core's multiply-add throughput at the kernels' hardware vector width
// (independent chains, nothing else), so that a pass's time per vector of elements can be
// read as the number of vector multiply-adds the core could have issued meanwhile: set
// against the vector instructions of the pass's loop, it says how close the pass runs to
// the arithmetic bound, on hosts whose clocks and vector units differ.
//
// Build (the CMake target, or any C++17 compiler with the core's flags):
//   cmake --build build --target fsl_kernel_bench && build/fsl_kernel_bench
//   g++ -std=c++17 -O3 -march=native -fno-trapping-math -Icsrc/core
//       benchmarks/native/kernel_bench.cc csrc/core/*.cc -o kernel_bench   (one line)
// Usage: kernel_bench [positions per image (8192)] [timed calls per case (400)]
// Each case's forward result is checked against float64 sums of the same per-element
// formula (segloss_math.h), so a broken build fails here instead of timing garbage.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "dtypes.h"
#include "segloss_cpu.h"
#include "simd.h"

namespace fsl = fused_segloss;

namespace {

// A reproducible input stream (a 64-bit LCG): no dependence on the standard library's
// distributions, whose output differs between implementations.
struct Lcg {
  uint64_t state;
  double Uniform() {  // [0, 1)
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>(state >> 11) * (1.0 / 9007199254740992.0);
  }
};

struct Case {
  const char* name;
  bool channels_last;
  fsl::DType logits_dtype, labels_dtype;
};

// Storage of one case's inputs (every dtype kept; only the case's are used).
struct Inputs {
  std::vector<float> logits_f32, labels_f32;
  std::vector<fsl::BFloat16> logits_bf16;
  std::vector<uint8_t> labels_u8;
};

Inputs MakeInputs(int64_t elements) {
  Inputs in;
  Lcg rng{12345};
  for (int64_t i = 0; i < elements; ++i) {
    // Logits spread over [-6, 6] (both branches of every select), labels 30% positive.
    const float x = static_cast<float>(12.0 * rng.Uniform() - 6.0);
    const bool positive = rng.Uniform() < 0.3;
    // Round the logit to bfloat16 so that every logits dtype holds the same values.
    const fsl::BFloat16 x16 = fsl::FromCompute<fsl::BFloat16>::Convert(x);
    in.logits_bf16.push_back(x16);
    in.logits_f32.push_back(fsl::ToCompute(x16));
    in.labels_f32.push_back(positive ? 1.0f : 0.0f);
    in.labels_u8.push_back(positive ? 1 : 0);
  }
  return in;
}

// float64 sums of ForwardTerms (the per-element formula, evaluated in double) for every
// class of the one image, laid out as the kernel's [1, C, 8] result it is checked against.
void ReferenceStats(const Inputs& in, const fsl::ProblemShape& shape, double* out) {
  std::fill(out, out + shape.classes * fsl::kNumStats, 0.0);
  for (int64_t n = 0; n < shape.positions; ++n) {
    for (int64_t c = 0; c < shape.classes; ++c) {
      const int64_t e = fsl::ElementIndex(shape, 0, n, c);
      double terms[fsl::kNumStats];
      fsl::ForwardTerms<double, false>(in.logits_f32[e], in.labels_f32[e], 1.0, 1.0, terms);
      for (int k = 0; k < fsl::kNumStats; ++k) out[c * fsl::kNumStats + k] += terms[k];
    }
  }
}

template <typename Fn>
double MedianSeconds(int calls, Fn&& fn) {
  std::vector<double> times;
  for (int i = 0; i < calls; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
                        .count());
  }
  std::nth_element(times.begin(), times.begin() + calls / 2, times.end());
  return times[calls / 2];
}

// `iterations` rounds of kChains independent multiply-add chains at the kernels' hardware width
// (more chains than latency x ports on current cores), each a·m + c with m < 1 so the
// values stay finite. The chains live only inside this function, so they stay in registers
// (kept across a clock call they were spilled to the stack, which measured a fifth of the
// rate); the empty asm makes each chain's value opaque, so none is merged or removed.
constexpr int64_t kChains = 10;  // a0..a9 below
__attribute__((noinline)) float MultiplyAddChains(int64_t iterations) {
  const fsl::HwF m = fsl::HwF{} + 0.999999f, c = fsl::HwF{} + 1e-7f;
  fsl::HwF a0 = m + 0.0f, a1 = m + 0.1f, a2 = m + 0.2f, a3 = m + 0.3f, a4 = m + 0.4f;
  fsl::HwF a5 = m + 0.5f, a6 = m + 0.6f, a7 = m + 0.7f, a8 = m + 0.8f, a9 = m + 0.9f;
  for (int64_t it = 0; it < iterations; ++it) {
    a0 = fsl::MulAddHw(a0, m, c), a1 = fsl::MulAddHw(a1, m, c), a2 = fsl::MulAddHw(a2, m, c);
    a3 = fsl::MulAddHw(a3, m, c), a4 = fsl::MulAddHw(a4, m, c), a5 = fsl::MulAddHw(a5, m, c);
    a6 = fsl::MulAddHw(a6, m, c), a7 = fsl::MulAddHw(a7, m, c), a8 = fsl::MulAddHw(a8, m, c);
    a9 = fsl::MulAddHw(a9, m, c);
    asm volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4));
    asm volatile("" : "+x"(a5), "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9));
  }
  return (a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9)[0];
}

// Vector multiply-adds per second on one thread: the best of 3 timings of the chains.
double MultiplyAddsPerSecond() {
  constexpr int64_t kIterations = 20000000;
  double best = 0;
  for (int round = 0; round < 3; ++round) {
    const auto start = std::chrono::steady_clock::now();
    const float sum = MultiplyAddChains(kIterations);
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!(sum > 0)) std::printf("(unexpected multiply-add result %g)\n", sum);
    best = std::max(best, kIterations * kChains / s);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t positions = argc > 1 ? std::atoll(argv[1]) : 8192;
  const int calls = argc > 2 ? std::atoi(argv[2]) : 400;
  constexpr int64_t kClasses = 5;
  if (positions < 1 || calls < 1) {
    std::fprintf(stderr, "usage: kernel_bench [positions >= 1] [calls >= 1]\n");
    return 2;
  }
  const int64_t elements = positions * kClasses;
  const Inputs in = MakeInputs(elements);
  std::vector<float> grad_stats(kClasses * fsl::kNumStats);
  Lcg rng{777};
  for (float& g : grad_stats) g = static_cast<float>(rng.Uniform() - 0.5);
  std::vector<float> grad_f32(elements);
  std::vector<fsl::BFloat16> grad_bf16(elements);

  const double fma_per_s = MultiplyAddsPerSecond();
  std::printf("hardware vector: %d float32 lanes; %.2f G vector multiply-adds/s on one thread\n",
              fsl::kHardwareLanes, fma_per_s / 1e9);
  std::printf("1 image x %lld positions x %lld classes, one thread, median of %d calls\n",
              static_cast<long long>(positions), static_cast<long long>(kClasses), calls);
  std::printf("%-28s %12s %12s %12s %12s %8s\n", "case", "fwd ns/elem", "grad ns/elem",
              "fwd slots/v", "grad slots/v", "check");

  const Case cases[] = {
      {"channels_last f32 f32", true, fsl::DType::kFloat32, fsl::DType::kFloat32},
      {"channels_first f32 f32", false, fsl::DType::kFloat32, fsl::DType::kFloat32},
      {"channels_last f32 uint8", true, fsl::DType::kFloat32, fsl::DType::kUInt8},
      {"channels_last bf16 uint8", true, fsl::DType::kBFloat16, fsl::DType::kUInt8},
  };
  bool all_ok = true;
  for (const Case& c : cases) {
    fsl::SeglossProblem p;
    p.shape = {1, positions, kClasses, c.channels_last};
    p.logits_dtype = c.logits_dtype;
    p.labels_dtype = c.labels_dtype;
    const bool bf16 = c.logits_dtype == fsl::DType::kBFloat16;
    p.logits = bf16 ? static_cast<const void*>(in.logits_bf16.data()) : in.logits_f32.data();
    p.labels = c.labels_dtype == fsl::DType::kUInt8 ? static_cast<const void*>(in.labels_u8.data())
                                                     : in.labels_f32.data();
    void* grad_out = bf16 ? static_cast<void*>(grad_bf16.data()) : grad_f32.data();
    const std::string invalid = fsl::ValidateProblem(p);
    if (!invalid.empty()) {
      std::fprintf(stderr, "%s: %s\n", c.name, invalid.c_str());
      return 1;
    }
    std::vector<float> stats(kClasses * fsl::kNumStats);
    std::string error;
    auto forward = [&] { error = fsl::ComputeStatsCpu(p, fsl::SerialFor, stats.data()); };
    auto backward = [&] {
      error = fsl::ComputeLogitGradCpu(p, grad_stats.data(), fsl::SerialFor, grad_out);
    };
    forward();
    backward();  // warm: first touch of the output, code in cache
    if (!error.empty()) {
      std::fprintf(stderr, "%s: %s\n", c.name, error.c_str());
      return 1;
    }
    const double fwd = MedianSeconds(calls, forward) / elements;
    const double grad = MedianSeconds(calls, backward) / elements;

    // Every dtype of a case holds the same values (the logits are bfloat16-representable,
    // the labels 0 or 1), so the float32 copies give the reference; the layout decides
    // which class each element belongs to.
    double reference[kClasses * fsl::kNumStats];
    ReferenceStats(in, p.shape, reference);
    double worst = 0;
    for (int i = 0; i < kClasses * fsl::kNumStats; ++i) {
      const double scale = std::max(1.0, std::fabs(reference[i]));
      worst = std::max(worst, std::fabs(stats[i] - reference[i]) / scale);
    }
    const bool ok = worst < 1e-5;  // float32 terms summed in float64: ~1e-7 expected
    all_ok = all_ok && ok;
    const double per_vector = fsl::kHardwareLanes * fma_per_s;  // slots per (s / element)
    std::printf("%-28s %12.3f %12.3f %12.1f %12.1f %8s\n", c.name, fwd * 1e9, grad * 1e9,
                fwd * per_vector, grad * per_vector, ok ? "ok" : "MISMATCH");
  }
  std::printf("slots/v = the vector multiply-adds this thread could have issued in the time "
              "a pass spends on one hardware vector of elements (compare with the vector "
              "instructions per vector of its loop); check = the stats against float64 sums "
              "of the same per-element formula\n");
  return all_ok ? 0 : 1;
}
