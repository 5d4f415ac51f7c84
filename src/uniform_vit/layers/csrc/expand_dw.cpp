// Patch merging's front half in one CPU op (uniform_vit/layers/cpu_kernels.py builds it with reuse_core.cpp;
// uniform_vit/models/uniform.py, DeployPatchMerging, calls it).
//
//   out = relu(dwconv3x3_s2(relu(x w1t + b1), wdw) + bdw)    x: (B, C, H, W) float32 in channels-last memory;
//   w1t: (C, X) the 1x1 expansion's weight transposed (packed: in pack_panels' order); b1: (X); wdw: (3, 3, X) the
//   depthwise weights; bdw: (X);
//   out: (B, X, ceil(H/2), ceil(W/2)), channels-last.
//
// Why: the expansion writes the widest map of the network (X = 4C channels at full resolution: 3.2 MB for uniform_t
// at batch 16, 6.4 MB for uniform_m), which the stride-2 depthwise conv reads back once. Here the expansion's rows are
// made a few at a time as the depthwise conv needs them (tile_gemm.h's product over about 48 tokens, ReLU in its
// epilogue) into a buffer that stays in L2, and only the quarter-size output goes to memory. On an AVX2 Zen 3 this
// ran 1.00-1.15x the two ops apart, and the fused, traced uniform_t about 1 % faster (benchmarks/RESULTS.md,
// section 1, session 18).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tile_gemm.h"

namespace {

using uniform_vit_tile::Epi;
using uniform_vit_tile::gemm_rows;
using uniform_vit_tile::V;
using Vec = uniform_vit_tile::Vec;

// one output pixel, channels c .. c + NB V - 1: bias + the in-range taps of the three expansion rows, then ReLU
template <int NB>
inline void dw_pixel(const float* const rows[3], int ky0, int ky1, int64_t ix0, int64_t W, int64_t X,
                     const float* wdw, const float* bdw, int64_t c, float* out) {
  Vec acc[NB];
  for (int v = 0; v < NB; ++v) acc[v] = Vec::loadu(bdw + c + v * V);
  for (int ky = ky0; ky < ky1; ++ky)
    for (int kx = 0; kx < 3; ++kx) {
      const int64_t ix = ix0 + kx;
      if (ix < 0 || ix >= W) continue;
      const float* src = rows[ky] + ix * X + c;
      const float* wk = wdw + (ky * 3 + kx) * X + c;
      for (int v = 0; v < NB; ++v) acc[v] = at::vec::fmadd(Vec::loadu(src + v * V), Vec::loadu(wk + v * V), acc[v]);
    }
  for (int v = 0; v < NB; ++v) at::vec::clamp_min(acc[v], Vec(0.f)).store(out + c + v * V);
}

at::Tensor expand_dw(const at::Tensor& x_, const at::Tensor& w1t_, const at::Tensor& b1_, const at::Tensor& wdw_,
                     const at::Tensor& bdw_, bool packed) {
  TORCH_CHECK(x_.dim() == 4 && w1t_.dim() == 2 && b1_.dim() == 1 && wdw_.dim() == 3 && bdw_.dim() == 1,
              "expand_dw: expected x (B, C, H, W), w1t (C, X), b1 (X), wdw (3, 3, X), bdw (X)");
  for (const at::Tensor* t : {&x_, &w1t_, &b1_, &wdw_, &bdw_})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "expand_dw: float32 tensors only");
  const int64_t Bn = x_.size(0), C = x_.size(1), H = x_.size(2), W = x_.size(3), X = w1t_.size(1);
  TORCH_CHECK(w1t_.size(0) == C && b1_.size(0) == X && wdw_.sizes() == at::IntArrayRef({3, 3, X}) &&
                  bdw_.size(0) == X,
              "expand_dw: shapes do not match: x ", x_.sizes(), ", w1t ", w1t_.sizes(), ", b1 ", b1_.sizes(),
              ", wdw ", wdw_.sizes(), ", bdw ", bdw_.sizes());
  const at::Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast), w1t = w1t_.contiguous(),
                   b1 = b1_.contiguous(), wdw = wdw_.contiguous(), bdw = bdw_.contiguous();
  const int64_t Ho = (H + 1) / 2, Wo = (W + 1) / 2;
  auto out = at::empty({Bn, X, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const float* Xp = x.data_ptr<float>();
  const float* W1 = w1t.data_ptr<float>();
  const float* B1 = b1.data_ptr<float>();
  const float* Wd = wdw.data_ptr<float>();
  const float* Bd = bdw.data_ptr<float>();
  float* O = out.data_ptr<float>();
  // output rows per chunk: their 2 k input rows (about TR tokens) go through one product, and the chunk's buffer
  // holds them after the previous chunk's last row (the top tap row of the chunk's first output row)
  const int64_t k = std::max<int64_t>(1, (uniform_vit_tile::R * 8 + 2 * W - 1) / (2 * W));
  at::parallel_for(0, Bn, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf((2 * k + 1) * W * X);  // slot s holds input row 2 oy0 - 1 + s
    for (int64_t n = begin; n < end; ++n) {
      const float* xn = Xp + n * H * W * C;
      for (int64_t oy0 = 0; oy0 < Ho; oy0 += k) {
        if (oy0 > 0)  // the previous chunk's last input row, 2 oy0 - 1, to slot 0
          std::copy(buf.begin() + 2 * k * W * X, buf.begin() + (2 * k + 1) * W * X, buf.begin());
        const int64_t iy0 = 2 * oy0, iy1 = std::min(H, 2 * (oy0 + k));  // input rows made for this chunk
        gemm_rows<Epi::kRelu>(xn + iy0 * W * C, C, (iy1 - iy0) * W, C, W1, X, B1, nullptr, 0, buf.data() + W * X, X,
                              packed);
        for (int64_t oy = oy0; oy < std::min(Ho, oy0 + k); ++oy) {
          const float* rows[3];
          for (int ky = 0; ky < 3; ++ky) rows[ky] = buf.data() + (2 * (oy - oy0) + ky) * W * X;
          const int ky0 = 2 * oy - 1 < 0 ? 1 : 0, ky1 = 2 * oy + 1 >= H ? 2 : 3;
          float* orow = O + (n * Ho + oy) * Wo * X;
          for (int64_t ox = 0; ox < Wo; ++ox) {
            float* o = orow + ox * X;
            int64_t c = 0;
            for (; c + 4 * V <= X; c += 4 * V) dw_pixel<4>(rows, ky0, ky1, 2 * ox - 1, W, X, Wd, Bd, c, o);
            for (; c + V <= X; c += V) dw_pixel<1>(rows, ky0, ky1, 2 * ox - 1, W, X, Wd, Bd, c, o);
            for (; c < X; ++c) {
              float acc = Bd[c];
              for (int ky = ky0; ky < ky1; ++ky)
                for (int kx = 0; kx < 3; ++kx) {
                  const int64_t ix = 2 * ox - 1 + kx;
                  if (ix >= 0 && ix < W) acc += rows[ky][ix * X + c] * Wd[(ky * 3 + kx) * X + c];
                }
              o[c] = std::max(acc, 0.f);
            }
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(uniform_vit, m) {
  m.def("expand_dw(Tensor x, Tensor w1t, Tensor b1, Tensor wdw, Tensor bdw, bool packed=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(uniform_vit, CPU, m) { m.impl("expand_dw", &expand_dw); }
