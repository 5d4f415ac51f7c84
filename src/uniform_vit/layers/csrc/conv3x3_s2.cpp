// The stem's 3x3 stride-2 convs after the first as one CPU op (uniform_vit/layers/cpu_kernels.py builds it with
// reuse_core.cpp; uniform_vit/models/uniform.py, DeployStem, calls it).
//
//   out = act(conv2d(x, w, b, stride 2, padding 1))    x: (B, Cin, H, W) float32 in channels-last memory; wt: the
//   weight as (3, 3, Cin, Cout); b: (Cout) or None; act: ReLU or nothing; out: (B, Cout, ceil(H/2), ceil(W/2)),
//   channels-last.
//
// An implicit-GEMM conv on tile_gemm.h's register blocks: in channels-last memory the three taps of one kernel row
// are 3 Cin floats in a row, and the windows of neighbouring output pixels start 2 Cin floats apart, so a kernel
// row of a run of output pixels is a matrix with row stride 2 Cin that the product reads in place (no im2col copy),
// and the three kernel rows are three segments summed in the same registers. The first pixel of each row (its window
// crosses the left border) goes with the first pixels of the image's other rows as one product over its in-range
// columns (session 31); the other border pixels (the last when W is odd, the top and bottom rows' first) go one at
// a time over their in-range taps only; rows at the top and bottom drop their out-of-range kernel rows. On an AVX2 Zen 3 this ran uniform_t's second stem conv (8 -> 16
// channels) 1.27x as fast as oneDNN and the fused, traced uniform_t about 1 % faster, but the wider convs of
// uniform_s/m/l 0.78-0.99x, so the deploy stem uses it for 16 outputs or fewer there (benchmarks/RESULTS.md,
// section 1, session 18). A row's interior pixels go in register blocks of equal size (gemm_tile_even): on a Zen 5
// (AVX-512) that ran these convs 1.12-1.43x faster than blocks of 12 with a short rest, and the deploy stem uses the
// op for every later conv there (session 30).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "tile_gemm.h"

namespace {

using uniform_vit_tile::Epi;
using uniform_vit_tile::gemm_tile;
using uniform_vit_tile::gemm_tile_even;
using uniform_vit_tile::Segments;

// left: whether this row's first pixel is left to left_column (below)
template <Epi E>
void conv_row(const float* X, int64_t H, int64_t W, int64_t cin, const float* wt, int64_t cout, const float* bias,
              int64_t oy, int64_t Wo, float* out, bool left) {
  // kernel rows ky whose input row 2 oy - 1 + ky is inside the map
  int ky0 = 0, ky1 = 3;
  if (2 * oy - 1 < 0) ky0 = 1;
  if (2 * oy + 1 >= H) ky1 = 2;
  // interior pixels ox in [1, ox1): all three columns 2 ox - 1 .. 2 ox + 1 inside the map
  const int64_t ox1 = std::max<int64_t>(1, std::min(Wo, (W - 2) / 2 + 1));
  if (ox1 > 1) {
    Segments sg;
    sg.n = 0;
    for (int ky = ky0; ky < ky1; ++ky) {
      sg.aoff[sg.n] = (2 * oy - 1 + ky) * W * cin;
      sg.boff[sg.n] = ky * 3 * cin * cout;
      ++sg.n;
    }
    gemm_tile_even<E>(X + (2 * 1 - 1) * cin, 2 * cin, ox1 - 1, sg, 3 * cin, wt, cout, cout, bias, out + 1 * cout,
                      cout);
  }
  // border pixels: column 0, and those from ox1 on (the last one when W is odd)
  for (int64_t ox = left ? ox1 : 0; ox < Wo; ox = (ox == 0 ? std::max<int64_t>(ox1, 1) : ox + 1)) {
    Segments sg;
    sg.n = 0;
    for (int ky = ky0; ky < ky1; ++ky)
      for (int kx = 0; kx < 3; ++kx) {
        const int64_t ix = 2 * ox - 1 + kx;
        if (ix < 0 || ix >= W) continue;
        sg.aoff[sg.n] = ((2 * oy - 1 + ky) * W + ix) * cin;
        sg.boff[sg.n] = (ky * 3 + kx) * cin * cout;
        ++sg.n;
      }
    gemm_tile<E>(X, 0, 1, sg, cin, wt, cout, cout, bias, nullptr, 0, out + ox * cout, cout);
  }
}

// The output rows whose first pixel left_column computes: all three kernel rows inside the map, and a second column
// (W >= 2). rows [1, H / 2).
inline int64_t left_rows_end(int64_t H, int64_t W) { return W >= 2 ? H / 2 : 0; }

// The first pixel of output rows 1 .. H / 2 - 1 of one image as one product: its window's columns 0 and 1 (kernel
// columns 1 and 2), three kernel rows, each row's window 2 W Cin floats after the previous row's. Done one pixel at
// a time (a single register row: one chain of dependent FMAs) it was ~10 % of the op (session 31).
template <Epi E>
void left_column(const float* X, int64_t H, int64_t W, int64_t cin, const float* wt, int64_t cout, const float* bias,
                 int64_t Wo, float* out) {
  const int64_t m = left_rows_end(H, W) - 1;
  if (m <= 0) return;
  Segments sg;
  sg.n = 3;
  for (int ky = 0; ky < 3; ++ky) {
    sg.aoff[ky] = ky * W * cin;
    sg.boff[ky] = (ky * 3 + 1) * cin * cout;
  }
  gemm_tile_even<E>(X + W * cin, 2 * W * cin, m, sg, 2 * cin, wt, cout, cout, bias, out + Wo * cout, Wo * cout);
}

at::Tensor conv3x3_s2(const at::Tensor& x_, const at::Tensor& wt_, const std::optional<at::Tensor>& b_, bool relu) {
  TORCH_CHECK(x_.dim() == 4 && wt_.dim() == 4 && wt_.size(0) == 3 && wt_.size(1) == 3,
              "conv3x3_s2: expected x (B, Cin, H, W) and wt (3, 3, Cin, Cout), got x ", x_.sizes(), ", wt ",
              wt_.sizes());
  TORCH_CHECK(x_.scalar_type() == at::kFloat && wt_.scalar_type() == at::kFloat &&
                  (!b_ || b_->scalar_type() == at::kFloat),
              "conv3x3_s2: float32 tensors only");
  const int64_t Bn = x_.size(0), cin = x_.size(1), H = x_.size(2), W = x_.size(3), cout = wt_.size(3);
  TORCH_CHECK(wt_.size(2) == cin, "conv3x3_s2: x has ", cin, " channels, wt ", wt_.size(2));
  TORCH_CHECK(!b_ || (b_->dim() == 1 && b_->size(0) == cout), "conv3x3_s2: bias must be (", cout, ")");
  const at::Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast), wt = wt_.contiguous();
  const at::Tensor b = b_ ? b_->contiguous() : at::zeros({cout}, x.options());
  const int64_t Ho = (H + 1) / 2, Wo = (W + 1) / 2;
  auto out = at::empty({Bn, cout, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const float* X = x.data_ptr<float>();
  const float* Wt = wt.data_ptr<float>();
  const float* Bias = b.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t left_end = left_rows_end(H, W);
  at::parallel_for(0, Bn * Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / Ho, oy = t % Ho;
      const float* xn = X + n * H * W * cin;
      float* o = O + (n * Ho + oy) * Wo * cout;
      const bool left = oy >= 1 && oy < left_end;
      if (relu) conv_row<Epi::kRelu>(xn, H, W, cin, Wt, cout, Bias, oy, Wo, o, left);
      else conv_row<Epi::kNone>(xn, H, W, cin, Wt, cout, Bias, oy, Wo, o, left);
    }
  });
  at::parallel_for(0, Bn, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* xn = X + n * H * W * cin;
      float* o = O + n * Ho * Wo * cout;
      if (relu) left_column<Epi::kRelu>(xn, H, W, cin, Wt, cout, Bias, Wo, o);
      else left_column<Epi::kNone>(xn, H, W, cin, Wt, cout, Bias, Wo, o);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(uniform_vit, m) { m.def("conv3x3_s2(Tensor x, Tensor wt, Tensor? b, bool relu) -> Tensor"); }

TORCH_LIBRARY_IMPL(uniform_vit, CPU, m) { m.impl("conv3x3_s2", &conv3x3_s2); }
