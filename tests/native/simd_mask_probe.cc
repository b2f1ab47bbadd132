// Prints simd.h's mask operations on the values read from stdin, for
// tests/test_simd_isa.py: one build per instruction set (SSE2, AVX2, AVX-512), whose
// outputs must equal each other and NumPy's. Input: n, then n floats a, then n floats b
// (n a multiple of 64), as hexadecimal bit patterns. Output: lines "name i bits".
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "segloss_cpu_lanes.h"

using namespace fused_segloss;
using Vec = VecF<2>;
constexpr int kWidth = Vec::kLanes;

static uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

static void Print(const char* name, int64_t at, Vec v) {
  float lanes[kWidth];
  v.Store(lanes);
  for (int i = 0; i < kWidth; ++i) std::printf("%s %lld %08x\n", name, (long long)(at + i), Bits(lanes[i]));
}

static Vec Flag(VecMask<2> m) { return Select(m, Vec(1.0f), Vec(0.0f)); }

int main() {
  long long n = 0;
  if (std::scanf("%lld", &n) != 1 || n % 64 != 0) return 2;
  std::vector<float> a(n), b(n);
  for (auto* v : {&a, &b}) {
    for (long long i = 0; i < n; ++i) {
      uint32_t u;
      if (std::scanf("%x", &u) != 1) return 2;
      std::memcpy(&(*v)[i], &u, 4);
    }
  }
  for (long long at = 0; at < n; at += kWidth) {
    const Vec x = Vec::Load(&a[at]), y = Vec::Load(&b[at]);
    Print("lt", at, Flag(x < y));
    Print("le", at, Flag(x <= y));
    Print("gt", at, Flag(x > y));
    Print("ge", at, Flag(x >= y));
    Print("not_lt", at, Flag(Not(x < y)));
    Print("and", at, Flag((x > Vec(0.0f)) & (y >= Vec(0.5f))));
    Print("or", at, Flag((x > Vec(0.0f)) | (y >= Vec(0.5f))));
    Print("select_gt", at, Select(x > y, x, y));
    Print("add_where_ge", at, AddWhere(x >= y, x, y));
  }
  std::printf("width %d\n", kWidth);
  for (int count = -1; count <= kWidth + 1; ++count) {
    const auto first = FirstLanes(count, static_cast<Vec*>(nullptr));
    Print("first", (count + 1) * kWidth, Flag(first));
    std::printf("any %d %d\n", count, AnyLane(first) ? 1 : 0);
  }
  return 0;
}
