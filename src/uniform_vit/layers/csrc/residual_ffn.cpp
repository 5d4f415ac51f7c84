// The deploy form's residual FFN in one CPU op (uniform_vit/layers/cpu_kernels.py builds it with reuse_core.cpp;
// uniform_vit/layers/conv.py, ResidualFFN, calls it).
//
//   out = x + relu(x w1t + b1) w2t + b2     x: (M, C) token rows (a flattened channels-last map), w1t: (C, H) and
//   w2t: (H, C) the two 1x1 convs' weights transposed (packed: both in pack_panels' order), b1: (H), b2: (C);
//   float32.
//
// The hidden activations of a tile of TR tokens stay in cache (TR x H floats) instead of going out to memory as an
// (M, H) matrix and back, and the ReLU and the residual add happen in the products' epilogues (the register-blocked
// product is tile_gemm.h's). On an AVX2 Zen 3 this ran 1.01-1.14x oneDNN's two matmuls at UniForm's batch-16 shapes
// and made the fused, traced uniform_m and uniform_l about 1.02x faster (benchmarks/RESULTS.md, section 1,
// session 17).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "channels_innermost.h"
#include "tile_gemm.h"

namespace {

using uniform_vit_tile::Epi;
using uniform_vit_tile::gemm_rows;
constexpr int64_t TR = 8 * uniform_vit_tile::R;  // tokens per tile: their hidden activations (TR x H) stay in cache

at::Tensor residual_ffn(const at::Tensor& x_, const at::Tensor& w1t_, const at::Tensor& b1_, const at::Tensor& w2t_,
                        const at::Tensor& b2_, bool packed) {
  TORCH_CHECK((x_.dim() == 2 || x_.dim() == 4) && w1t_.dim() == 2 && w2t_.dim() == 2 && b1_.dim() == 1 &&
                  b2_.dim() == 1,
              "residual_ffn: expected x (M, C) or (B, C, H, W), w1t (C, H), b1 (H), w2t (H, C), b2 (C)");
  for (const at::Tensor* t : {&x_, &w1t_, &b1_, &w2t_, &b2_})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "residual_ffn: float32 tensors only");
  const int64_t C = x_.size(1), H = w1t_.size(1), M = C ? x_.numel() / C : 0;
  TORCH_CHECK(w1t_.size(0) == C && b1_.size(0) == H && w2t_.sizes() == at::IntArrayRef({H, C}) && b2_.size(0) == C,
              "residual_ffn: shapes do not match: x ", x_.sizes(), ", w1t ", w1t_.sizes(), ", b1 ", b1_.sizes(),
              ", w2t ", w2t_.sizes(), ", b2 ", b2_.sizes());
  const at::Tensor x = token_rows(x_), w1t = w1t_.contiguous(), b1 = b1_.contiguous(), w2t = w2t_.contiguous(),
                   b2 = b2_.contiguous();
  auto out = token_rows_like(x, C);
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
      gemm_rows<Epi::kRelu>(X + r0 * C, C, m, C, W1, H, B1, nullptr, 0, hid.data(), H, packed);
      gemm_rows<Epi::kAdd>(hid.data(), H, m, H, W2, C, B2, X + r0 * C, C, O + r0 * C, C, packed);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(uniform_vit, m) {
  m.def("residual_ffn(Tensor x, Tensor w1t, Tensor b1, Tensor w2t, Tensor b2, bool packed=False) -> Tensor");
}
TORCH_LIBRARY_IMPL(uniform_vit, CPU, m) { m.impl("residual_ffn", &residual_ffn); }
