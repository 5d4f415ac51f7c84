// The deploy form's residual FFN in one CPU op (uniform_vit/layers/cpu_kernels.py builds it with reuse_core.cpp;
// uniform_vit/layers/conv.py, ResidualFFN, calls it).
//
//   out = x + relu(x w1t + b1) w2t + b2     x: (M, C) token rows (a flattened channels-last map), w1t: (C, H) and
//   w2t: (H, C) the two 1x1 convs' weights transposed, b1: (H), b2: (C); float32.
//
// The hidden activations of a tile of TR tokens stay in cache (TR x H floats) instead of going out to memory as an
// (M, H) matrix and back, and the ReLU and the residual add happen in the products' epilogues. Register blocks: R
// token rows x 2 vectors of output columns (6 x 16 with AVX2, 12 x 32 with AVX-512), the column panel outer so that
// it stays in L1 across the tile's row blocks; narrower panels and scalar columns for the tails. On an AVX2 Zen 3
// this ran 1.01-1.14x oneDNN's two matmuls at UniForm's batch-16 shapes and made the fused, traced uniform_m and
// uniform_l about 1.02x faster (benchmarks/RESULTS.md, section 1, session 17).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
constexpr int R = 12;  // token rows per register block: 24 accumulators + 2 weight vectors + 1 broadcast of 32
#else
constexpr int R = 6;   // 12 accumulators + 2 weight vectors + 1 broadcast of AVX2's 16 registers
#endif
constexpr int NV = 2;          // output column vectors per register block
constexpr int64_t TR = 8 * R;  // tokens per tile: their hidden activations (TR x H floats) stay in cache

// c[r, 0 : NVV V] = epilogue(bias + sum_k a[r, k] b[k, 0 : NVV V]) for r < RR; the epilogue is a ReLU (first
// product) or the residual add of res (second product)
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

// columns j0 .. j1 of rows 0 .. RR - 1: full panels, then single vectors, then scalars
template <int RR, bool RELU>
inline void rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* bias,
                 const float* res, int64_t ldr, float* c, int64_t ldc, int64_t j0, int64_t j1) {
  int64_t j = j0;
  const auto rj = [&](int64_t jj) { return RELU ? nullptr : res + jj; };
  for (; j + NV * V <= j1; j += NV * V) mk<RR, NV, RELU>(a, lda, b + j, ldb, K, bias + j, rj(j), ldr, c + j, ldc);
  for (; j + V <= j1; j += V) mk<RR, 1, RELU>(a, lda, b + j, ldb, K, bias + j, rj(j), ldr, c + j, ldc);
  for (; j < j1; ++j)
    for (int r = 0; r < RR; ++r) {
      float s = bias[j];
      for (int64_t k = 0; k < K; ++k) s += a[r * lda + k] * b[k * ldb + j];
      c[r * ldc + j] = RELU ? std::max(s, 0.f) : s + res[r * ldr + j];
    }
}

// c (M x N) = epilogue(bias + a (M x K) b (K x N)) for one tile of M <= TR rows
template <bool RELU>
void gemm_tile(const float* a, int64_t lda, int64_t M, const float* b, int64_t K, int64_t N, const float* bias,
               const float* res, int64_t ldr, float* c, int64_t ldc) {
  // column panels outer (the B panel stays in L1 across row blocks), row blocks inner
  for (int64_t j0 = 0; j0 < N; j0 += NV * V) {
    const int64_t j1 = std::min(N, j0 + NV * V);
    for (int64_t r = 0; r < M;) {
      int64_t rr = std::min<int64_t>(R, M - r);  // rows in this block (the last block of a tile may be smaller)
      const float* ar = a + r * lda;
      const float* rs = RELU ? nullptr : res + r * ldr;
      float* cr = c + r * ldc;
      switch (rr) {
#if defined(CPU_CAPABILITY_AVX512)
        case 12: rows<12, RELU>(ar, lda, b, N, K, bias, rs, ldr, cr, ldc, j0, j1); break;
        case 11: case 10: case 9: case 8:
          rows<8, RELU>(ar, lda, b, N, K, bias, rs, ldr, cr, ldc, j0, j1);
          rr = 8;
          break;
        case 7:
#endif
        case 6: rows<6, RELU>(ar, lda, b, N, K, bias, rs, ldr, cr, ldc, j0, j1); rr = 6; break;
        case 5: case 4: rows<4, RELU>(ar, lda, b, N, K, bias, rs, ldr, cr, ldc, j0, j1); rr = 4; break;
        case 3: case 2: rows<2, RELU>(ar, lda, b, N, K, bias, rs, ldr, cr, ldc, j0, j1); rr = 2; break;
        default: rows<1, RELU>(ar, lda, b, N, K, bias, rs, ldr, cr, ldc, j0, j1); rr = 1;
      }
      r += rr;
    }
  }
}

at::Tensor residual_ffn(const at::Tensor& x_, const at::Tensor& w1t_, const at::Tensor& b1_, const at::Tensor& w2t_,
                        const at::Tensor& b2_) {
  TORCH_CHECK(x_.dim() == 2 && w1t_.dim() == 2 && w2t_.dim() == 2 && b1_.dim() == 1 && b2_.dim() == 1,
              "residual_ffn: expected x (M, C), w1t (C, H), b1 (H), w2t (H, C), b2 (C)");
  for (const at::Tensor* t : {&x_, &w1t_, &b1_, &w2t_, &b2_})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "residual_ffn: float32 tensors only");
  const int64_t M = x_.size(0), C = x_.size(1), H = w1t_.size(1);
  TORCH_CHECK(w1t_.size(0) == C && b1_.size(0) == H && w2t_.sizes() == at::IntArrayRef({H, C}) && b2_.size(0) == C,
              "residual_ffn: shapes do not match: x ", x_.sizes(), ", w1t ", w1t_.sizes(), ", b1 ", b1_.sizes(),
              ", w2t ", w2t_.sizes(), ", b2 ", b2_.sizes());
  const at::Tensor x = x_.contiguous(), w1t = w1t_.contiguous(), b1 = b1_.contiguous(), w2t = w2t_.contiguous(),
                   b2 = b2_.contiguous();
  auto out = at::empty({M, C}, x.options());
  if (M == 0 || C == 0) return out;
  const float* X = x.data_ptr<float>();
  const float* W1 = w1t.data_ptr<float>();
  const float* W2 = w2t.data_ptr<float>();
  const float* B1 = b1.data_ptr<float>();
  const float* B2 = b2.data_ptr<float>();
  float* O = out.data_ptr<float>();
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

TORCH_LIBRARY_FRAGMENT(uniform_vit, m) {
  m.def("residual_ffn(Tensor x, Tensor w1t, Tensor b1, Tensor w2t, Tensor b2) -> Tensor");
}
TORCH_LIBRARY_IMPL(uniform_vit, CPU, m) { m.impl("residual_ffn", &residual_ffn); }
