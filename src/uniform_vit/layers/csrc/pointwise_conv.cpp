// 1x1 convs of the deploy form as one CPU op (uniform_vit/layers/cpu_kernels.py builds it with reuse_core.cpp;
// uniform_vit/layers/conv.py, PointwiseConv2d, calls it).
//
//   out = act(x wt + b) (+ res)    x: (M, K) token rows, or a (B, K, H, W) channels-last map (its rows; the result
//   is then a map too), wt: (K, N) the conv's weight transposed (packed: in pack_panels' order, which the products
//   read 1.1-1.2x faster), b: (N) or None, act: ReLU or nothing; res: None, or a residual shaped like the output,
//   added as the output is stored (attention's projection and its block's residual, session 31); float32.
//
// Why not oneDNN's matmul, which ran these before: on an AVX2 Zen 3 it has a fixed cost of tens of microseconds per
// call, which UniForm's small late-stage products feel most. This op ran 15 of UniForm's 18 1x1 shapes 1.02-1.39x
// as fast (78-85 GFLOP/s against 60-80; the widest, 128 -> 512 channels, 0.88-0.92x) and the fused, traced models
// 1-2 % faster (benchmarks/RESULTS.md, section 1, session 18). Tiles of TR token rows go through tile_gemm.h's
// register blocks, a ReLU in the epilogue when asked for.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "channels_innermost.h"
#include "tile_gemm.h"

namespace {

using uniform_vit_tile::Epi;
using uniform_vit_tile::gemm_rows;
constexpr int64_t TR = 8 * uniform_vit_tile::R;  // token rows per task

at::Tensor pointwise_conv(const at::Tensor& x_, const at::Tensor& wt_, const std::optional<at::Tensor>& b_,
                          bool relu, bool packed, const std::optional<at::Tensor>& res_) {
  TORCH_CHECK((x_.dim() == 2 || x_.dim() == 4) && wt_.dim() == 2,
              "pointwise_conv: expected x (M, K) or (B, K, H, W) and wt (K, N), got x ", x_.sizes(), ", wt ",
              wt_.sizes());
  TORCH_CHECK(x_.scalar_type() == at::kFloat && wt_.scalar_type() == at::kFloat &&
                  (!b_ || b_->scalar_type() == at::kFloat),
              "pointwise_conv: float32 tensors only");
  const int64_t K = x_.size(1), N = wt_.size(1), M = K ? x_.numel() / K : 0;
  TORCH_CHECK(wt_.size(0) == K, "pointwise_conv: x has ", K, " channels, wt ", wt_.size(0), " rows");
  TORCH_CHECK(!b_ || (b_->dim() == 1 && b_->size(0) == N), "pointwise_conv: bias must be (", N, ")");
  const at::Tensor x = token_rows(x_), wt = wt_.contiguous();
  const at::Tensor b = b_ ? b_->contiguous() : at::zeros({N}, x.options());
  auto out = token_rows_like(x, N);
  // res: a residual added in the product's store (x + attention's projection), shaped like the output
  at::Tensor res;
  if (res_.has_value() && res_->defined()) {
    TORCH_CHECK(!relu, "pointwise_conv: a residual and a ReLU together are not supported");
    TORCH_CHECK(res_->scalar_type() == at::kFloat && res_->sizes() == out.sizes(),
                "pointwise_conv: the residual must be float32 and shaped like the output ", out.sizes(), ", got ",
                res_->sizes());
    res = token_rows(*res_);
  }
  if (M == 0 || N == 0) return out;
  const float* RS = res.defined() ? res.data_ptr<float>() : nullptr;
  const float* X = x.data_ptr<float>();
  const float* W = wt.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, (M + TR - 1) / TR, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * TR, m = std::min(TR, M - r0);
      if (relu) gemm_rows<Epi::kRelu>(X + r0 * K, K, m, K, W, N, B, nullptr, 0, O + r0 * N, N, packed);
      else if (RS) gemm_rows<Epi::kAdd>(X + r0 * K, K, m, K, W, N, B, RS + r0 * N, N, O + r0 * N, N, packed);
      else gemm_rows<Epi::kNone>(X + r0 * K, K, m, K, W, N, B, nullptr, 0, O + r0 * N, N, packed);
    }
  });
  return out;
}

// wt (K, N) in the packed layout that the products read fastest (tile_gemm.h, pack_b): same shape, other order
at::Tensor pack_panels(const at::Tensor& wt_) {
  TORCH_CHECK(wt_.dim() == 2 && wt_.scalar_type() == at::kFloat, "pack_panels: expected a float32 (K, N) matrix");
  const at::Tensor wt = wt_.contiguous();
  auto out = at::empty_like(wt, at::MemoryFormat::Contiguous);
  if (wt.numel() > 0) uniform_vit_tile::pack_b(wt.data_ptr<float>(), wt.size(0), wt.size(1), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(uniform_vit, m) {
  m.def("pointwise_conv(Tensor x, Tensor wt, Tensor? b, bool relu, bool packed=False, Tensor? res=None) -> Tensor");
  m.def("pack_panels(Tensor wt) -> Tensor");
}

TORCH_LIBRARY_IMPL(uniform_vit, CPU, m) {
  m.impl("pointwise_conv", &pointwise_conv);
  m.impl("pack_panels", &pack_panels);
}
