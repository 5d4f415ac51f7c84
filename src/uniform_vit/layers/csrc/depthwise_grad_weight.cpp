// The weight gradient of a stride-1 depthwise convolution in one CPU op (uniform_vit/layers/cpu_kernels.py builds
// it; uniform_vit/layers/conv.py, _SmallMapDepthwise, calls it in training).
//
//   grad_w[c, 0, i, j] = sum over b, y, x of g[b, c, y, x] * x[b, c, y + i - ph, x + j - pw]     (zero outside the map)
//   x, g: (B, C, H, W) float32, any layout (read in place when channels are innermost, else copied channels-last);
//   returns (C, 1, kh, kw).
//
// Why: on maps smaller than the kernel (UniForm's 3x3 convs over 2x2 maps, its 5x5 / 7x7 value convs over 4x4 maps,
// when 28 px images are upsampled to 96-112 px) oneDNN's weight gradient took 3-12 ms per conv at batch 128 on an
// AVX2 Zen 3, 10-60x its forward (benchmarks/RESULTS.md, section 3, session 19).
//
// Each thread takes blocks of 8 / 16 channels (one or two vectors; the last block masked) and walks every output
// pixel once: the pixel's gradient vector times each input vector its taps reach, summed into one (kh*kw) row of
// accumulators per tap, which stays in L1. Taps that fall in the padding are skipped, so the work is the taps that
// touch the map, not kh*kw per pixel.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "channels_innermost.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();

// channels [c0, c0 + n) (n <= NV V) of the gradient, into acc ((kh*kw, NV V) floats, zeroed here)
template <int NV>
void channel_block(const float* x, const float* g, int64_t c0, int64_t n, int64_t B, int64_t H, int64_t W,
                   int64_t xs[3], int64_t gs[3], int64_t kh, int64_t kw, int64_t ph, int64_t pw, float* acc) {
  std::fill(acc, acc + kh * kw * NV * V, 0.f);
  auto load = [&](const float* p, int r) {
    const int64_t left = n - r * V;
    return left >= V ? Vec::loadu(p + r * V) : Vec::loadu(p + r * V, std::max<int64_t>(left, 0));
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t y = 0; y < H; ++y) {
      const int64_t i0 = std::max<int64_t>(0, ph - y), i1 = std::min(kh, H + ph - y);  // taps inside the rows
      for (int64_t xx = 0; xx < W; ++xx) {
        const float* gp = g + b * gs[0] + y * gs[1] + xx * gs[2] + c0;
        Vec gv[NV];
        for (int r = 0; r < NV; ++r) gv[r] = load(gp, r);
        const int64_t j0 = std::max<int64_t>(0, pw - xx), j1 = std::min(kw, W + pw - xx);
        for (int64_t i = i0; i < i1; ++i) {
          const float* xr = x + b * xs[0] + (y + i - ph) * xs[1] + c0;
          float* ar = acc + i * kw * NV * V;
          for (int64_t j = j0; j < j1; ++j)
            for (int r = 0; r < NV; ++r) {
              float* a = ar + (j * NV + r) * V;
              at::vec::fmadd(gv[r], load(xr + (xx + j - pw) * xs[2], r), Vec::loadu(a)).store(a);
            }
        }
      }
    }
}

at::Tensor depthwise_grad_weight(const at::Tensor& x_, const at::Tensor& g_, int64_t kh, int64_t kw, int64_t ph,
                                 int64_t pw) {
  TORCH_CHECK(x_.dim() == 4 && g_.dim() == 4, "depthwise_grad_weight: expected x and g (B, C, H, W)");
  TORCH_CHECK(x_.scalar_type() == at::kFloat && g_.scalar_type() == at::kFloat,
              "depthwise_grad_weight: float32 tensors only");
  TORCH_CHECK(x_.sizes() == g_.sizes(), "depthwise_grad_weight: x ", x_.sizes(), " and g ", g_.sizes(),
              " differ (stride 1, 'same' output size)");
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh == 2 * ph + 1 && kw == 2 * pw + 1,
              "depthwise_grad_weight: kernel ", kh, "x", kw, " with padding ", ph, ", ", pw,
              " does not keep the map's size");
  const int64_t B = x_.size(0), C = x_.size(1), H = x_.size(2), W = x_.size(3);
  const at::Tensor x = channels_innermost_map(x_), g = channels_innermost_map(g_);
  at::Tensor out = at::zeros({C, 1, kh, kw}, x_.options());
  if (x.numel() == 0) return out;
  int64_t xs[3] = {x.stride(0), x.stride(2), x.stride(3)}, gs[3] = {g.stride(0), g.stride(2), g.stride(3)};
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t width = C >= 4 * V ? 2 * V : V, blocks = (C + width - 1) / width;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kh * kw * width);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * width, n = std::min(width, C - c0);
      if (width == 2 * V)
        channel_block<2>(xp, gp, c0, n, B, H, W, xs, gs, kh, kw, ph, pw, acc.data());
      else
        channel_block<1>(xp, gp, c0, n, B, H, W, xs, gs, kh, kw, ph, pw, acc.data());
      for (int64_t t = 0; t < kh * kw; ++t)  // acc (kh*kw, width) -> out (C, kh*kw)
        for (int64_t c = 0; c < n; ++c) op[(c0 + c) * kh * kw + t] = acc[t * width + c];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(uniform_vit, m) {
  m.def("depthwise_grad_weight(Tensor x, Tensor g, int kh, int kw, int ph, int pw) -> Tensor");
}

TORCH_LIBRARY_IMPL(uniform_vit, CPU, m) { m.impl("depthwise_grad_weight", &depthwise_grad_weight); }
