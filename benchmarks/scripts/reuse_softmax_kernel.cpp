// Row softmax for the query-tiled Reuse Attention core (uniform_vit/layers/attention.py, _reuse_tiled): an experiment,
// built and timed by reuse_softmax_kernel.py next to this file (benchmarks/RESULTS.md, session 14; not shipped).
//
// ATen's CPU softmax evaluates exp with Sleef's 1-ULP exp and then rescales every element of the (T, N) tile; at
// C = 64 that was a third of the core's time at N = 3136. Here each row is done while it sits in L1:
// max, then exp(x - max) with ATen's vectorised exp_u20 (the same fast exp PyTorch's own CPU flash attention uses
// for its scores, about 20 ULP) and the running sum; the row is left unnormalised and the sums are returned, so the
// caller scales the (T, C) output of the value product instead of the (T, N) map (C / N of the work).
// Rows whose maximum is not finite go through std::exp so that inf / NaN propagate as in ATen's softmax.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace {

using Vec = at::vec::Vectorized<float>;

float exp_row(float* x, int64_t n) {
  // four independent accumulators per pass: one would serialise on the max / add latency
  constexpr int64_t V = Vec::size();
  const Vec ninf(-std::numeric_limits<float>::infinity());
  Vec m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    m0 = at::vec::maximum(m0, Vec::loadu(x + i));
    m1 = at::vec::maximum(m1, Vec::loadu(x + i + V));
    m2 = at::vec::maximum(m2, Vec::loadu(x + i + 2 * V));
    m3 = at::vec::maximum(m3, Vec::loadu(x + i + 3 * V));
  }
  for (; i + V <= n; i += V) m0 = at::vec::maximum(m0, Vec::loadu(x + i));
  const Vec mv = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, mv);
  for (; i < n; ++i) m = std::max(m, x[i]);
  float s = 0.f;
  if (!std::isfinite(m)) {
    for (i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - m));
    return s;
  }
  const Vec vm(m);
  Vec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    Vec e0 = (Vec::loadu(x + i) - vm).exp_u20();
    Vec e1 = (Vec::loadu(x + i + V) - vm).exp_u20();
    Vec e2 = (Vec::loadu(x + i + 2 * V) - vm).exp_u20();
    Vec e3 = (Vec::loadu(x + i + 3 * V) - vm).exp_u20();
    e0.store(x + i);
    e1.store(x + i + V);
    e2.store(x + i + 2 * V);
    e3.store(x + i + 3 * V);
    s0 = s0 + e0;
    s1 = s1 + e1;
    s2 = s2 + e2;
    s3 = s3 + e3;
  }
  for (; i + V <= n; i += V) {
    Vec e = (Vec::loadu(x + i) - vm).exp_u20();
    e.store(x + i);
    s0 = s0 + e;
  }
  s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, (s0 + s1) + (s2 + s3));
  for (; i < n; ++i) s += (x[i] = std::exp(x[i] - m));
  return s;
}

// x: (T, N) float32 with contiguous rows; in place x <- exp(x - rowmax). Returns the (T,) row sums.
at::Tensor exp_rows_(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "exp_rows_: expected a 2-D float32 tensor with contiguous rows, got ", x.sizes(), " ", x.scalar_type());
  const int64_t T = x.size(0), n = x.size(1), ld = x.stride(0);
  at::Tensor sums = at::empty({T}, x.options());
  float* base = x.data_ptr<float>();
  float* out = sums.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) out[r] = exp_row(base + r * ld, n);
  });
  return sums;
}

}  // namespace

TORCH_LIBRARY(uniform_vit_exp, m) { m.def("exp_rows_(Tensor(a!) x) -> Tensor"); }

TORCH_LIBRARY_IMPL(uniform_vit_exp, CPU, m) { m.impl("exp_rows_", &exp_rows_); }
