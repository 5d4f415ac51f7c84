// A measurement, not part of the package (benchmarks/scripts/ffn_kernel.py builds and times it): the deploy form's
// residual FFN, y = x + relu(x W1^T + b1) W2^T + b2 on a (M, C) token matrix, as one op that keeps the hidden
// activations of a tile of tokens in cache instead of writing the (M, 2C) matrix out and reading it back.
// w1t (C, H) and w2t (H, C) are the transposed weights. Register blocks: R token rows x 2 vectors of output
// columns (6 x 16 with AVX2, 12 x 32 with AVX-512), the column panel outer so that it stays in L1 across row blocks.
// Session 17 (AVX2 Zen 3): 1.04-1.12x oneDNN's two matmuls in isolation, 1.00-1.02x in the whole traced model, so
// it was not adopted (benchmarks/RESULTS.md, section 1, session 17).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <algorithm>
#include <vector>

namespace {
using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
constexpr int R = 12;
#else
constexpr int R = 6;
#endif
constexpr int NV = 2;
constexpr int64_t TR = 8 * R;

// c[r, j0:j0+NVV*V] = epi(bias + sum_k a[r, k] b[k, j0..]) for r < RR
template <int RR, int NVV, bool RELU>
inline void mk(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* bias,
               const float* res, int64_t ldr, float* c, int64_t ldc) {
  Vec acc[RR][NVV];
  for (int m = 0; m < NVV; ++m) {
    const Vec bv = Vec::loadu(bias + m * V);
    for (int r = 0; r < RR; ++r) acc[r][m] = bv;
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec bk[NVV];
    for (int m = 0; m < NVV; ++m) bk[m] = Vec::loadu(b + k * ldb + m * V);
    for (int r = 0; r < RR; ++r) {
      const Vec ab(a[r * lda + k]);
      for (int m = 0; m < NVV; ++m) acc[r][m] = at::vec::fmadd(ab, bk[m], acc[r][m]);
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < NVV; ++m) {
      Vec y = acc[r][m];
      if (RELU) y = at::vec::clamp_min(y, Vec(0.f));
      else y = y + Vec::loadu(res + r * ldr + m * V);
      y.store(c + r * ldc + m * V);
    }
}

template <int RR, bool RELU>
inline void rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, int64_t N, const float* bias,
                 const float* res, int64_t ldr, float* c, int64_t ldc, int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + NV * V <= j1; j += NV * V) mk<RR, NV, RELU>(a, lda, b + j, ldb, K, bias + j, res + j, ldr, c + j, ldc);
  for (; j + V <= j1; j += V) mk<RR, 1, RELU>(a, lda, b + j, ldb, K, bias + j, res + j, ldr, c + j, ldc);
  for (; j < j1; ++j)
    for (int r = 0; r < RR; ++r) {
      float s = bias[j];
      for (int64_t k = 0; k < K; ++k) s += a[r * lda + k] * b[k * ldb + j];
      c[r * ldc + j] = RELU ? std::max(s, 0.f) : s + res[r * ldr + j];
    }
}

template <bool RELU>
void gemm_tile(const float* a, int64_t lda, int64_t M, const float* b, int64_t K, int64_t N, const float* bias,
               const float* res, int64_t ldr, float* c, int64_t ldc) {
  // column panels outer (the B panel stays in L1 across row blocks), row blocks inner
  for (int64_t j0 = 0; j0 < N; j0 += NV * V) {
    const int64_t j1 = std::min(N, j0 + NV * V);
    for (int64_t r = 0; r < M;) {
      const int64_t left = M - r; int64_t rr = std::min<int64_t>(R, left);
      const float* ar = a + r * lda; const float* rs = res ? res + r * ldr : nullptr; float* cr = c + r * ldc;
      switch (rr) {
#if defined(CPU_CAPABILITY_AVX512)
        case 12: rows<12, RELU>(ar, lda, b, N, K, N, bias, rs, ldr, cr, ldc, j0, j1); break;
        case 11: case 10: case 9: case 8: rows<8, RELU>(ar, lda, b, N, K, N, bias, rs, ldr, cr, ldc, j0, j1); rr = 8; break;
        case 7:
#endif
        case 6: rows<6, RELU>(ar, lda, b, N, K, N, bias, rs, ldr, cr, ldc, j0, j1); rr = 6; break;
        case 5: case 4: rows<4, RELU>(ar, lda, b, N, K, N, bias, rs, ldr, cr, ldc, j0, j1); rr = 4; break;
        case 3: case 2: rows<2, RELU>(ar, lda, b, N, K, N, bias, rs, ldr, cr, ldc, j0, j1); rr = 2; break;
        default: rows<1, RELU>(ar, lda, b, N, K, N, bias, rs, ldr, cr, ldc, j0, j1); rr = 1;
      }
      r += rr;
    }
  }
}

at::Tensor ffn(const at::Tensor& x, const at::Tensor& w1t, const at::Tensor& b1, const at::Tensor& w2t,
               const at::Tensor& b2) {
  const int64_t M = x.size(0), C = x.size(1), H = w1t.size(1);
  auto out = at::empty({M, C}, x.options());
  const float* X = x.data_ptr<float>(); const float* W1 = w1t.data_ptr<float>(); const float* W2 = w2t.data_ptr<float>();
  const float* B1 = b1.data_ptr<float>(); const float* B2 = b2.data_ptr<float>(); float* O = out.data_ptr<float>();
  const int64_t tiles = (M + TR - 1) / TR;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hid(TR * H);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * TR, m = std::min(TR, M - r0);
      gemm_tile<true>(X + r0 * C, C, m, W1, C, H, B1, nullptr, 0, hid.data(), H);
      gemm_tile<false>(hid.data(), H, m, W2, H, C, B2, X + r0 * C, C, O + r0 * C, C);
    }
  });
  return out;
}
}  // namespace

TORCH_LIBRARY(uniform_vit_ffn_bench, m) { m.def("ffn(Tensor x, Tensor w1t, Tensor b1, Tensor w2t, Tensor b2) -> Tensor"); }
TORCH_LIBRARY_IMPL(uniform_vit_ffn_bench, CPU, m) { m.impl("ffn", &ffn); }
