// Depthwise convolution on channels-last maps in one CPU op (uniform_vit/layers/cpu_kernels.py builds it with
// reuse_core.cpp; uniform_vit/layers/conv.py, DepthwiseConv2d, calls it).
//
//   out = conv2d(x, w, b, stride, padding = k // 2, groups = C)    x: (B, C, H, W) float32 (read in place when its
//   channels are innermost: channels-last memory, or a channel slice of it such as attention's queries cut from one
//   conv's output; anything else is copied to channels-last first); w: (C, 1, k, k), k odd; out: channels-last.
//
// Why: UniForm's depthwise convs (the sandwich's 3x3s with the residual folded in, attention's 7x7 query and value
// convs on 7x7 windows, patch merging's stride-2 3x3) are tiny, 2-20 MFLOP over maps of a few hundred KB, and
// oneDNN ran them at 3-8 GB/s and 8-20 GFLOP/s on an AVX2 Zen 3 (benchmarks/RESULTS.md, section 1, session 17).
//
// Each output pixel is a sum over the window's taps that fall inside the map (so the zero padding costs nothing and
// a kernel larger than the map reads only what it reaches), vectorised over channels, 8 per 256-bit vector (AVX2
// and FMA; the AVX-512 build runs the same code): blocks of 64 / 32 / 16 / 8 channels, then a masked vector for
// the last 1-7. Narrow blocks keep S partial sums per vector, one per kernel row in turn, so that at least 8
// independent FMA chains are in flight; the partial sums are added at the end. Weights are read as (k*k, C).
//
// radius (optional, one int per channel): the channel's nonzero taps lie within that distance of the centre. The
// deploy form merges Reuse Attention's value convs (kernels 1, 3, 5, 7, one per head) into one 7x7 conv whose
// smaller kernels are zero-padded; a block of channels then walks only the window of its widest channel, which
// skips the padding's zero taps (over half of them for four heads; session 18).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "channels_innermost.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

struct Window {
  const float* x;  // the image's (H, W, C) map, shifted to channel c0; pixels sx floats apart, rows sy
  const float* w;  // (k*k, C) weights, shifted to channel c0
  int64_t C, sx, sy, k, iy0, ix0, ky0, ky1, kx0, kx1;
};

// NV vectors of channels; S partial sums per vector (kernel rows take turns); MASKED: the last vector is partial
template <int NV, int S, bool MASKED>
inline void pixel(const Window& a, const float* bias, float* out, __m256i mask) {
  __m256 acc[S][NV];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < NV; ++r) acc[s][r] = _mm256_setzero_ps();
  auto load = [&](const float* p, int r) {
    return (MASKED && r == NV - 1) ? _mm256_maskload_ps(p + 8 * r, mask) : _mm256_loadu_ps(p + 8 * r);
  };
  auto row = [&](int64_t ky, __m256* acc_s) {
    const float* xr = a.x + (a.iy0 + ky) * a.sy;  // input column ix0 + kx is xr + (ix0 + kx) sx
    const float* wr = a.w + ky * a.k * a.C;
    for (int64_t kx = a.kx0; kx < a.kx1; ++kx)
      for (int r = 0; r < NV; ++r)
        acc_s[r] = _mm256_fmadd_ps(load(xr + (a.ix0 + kx) * a.sx, r), load(wr + kx * a.C, r), acc_s[r]);
  };
  int64_t ky = a.ky0;
  for (; ky + S <= a.ky1; ky += S) {
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) row(ky + s, acc[s]);  // unrolled: acc stays in registers
  }
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)  // the last rows, fewer than S
    if (ky < a.ky1) row(ky++, acc[s]);
  for (int r = 0; r < NV; ++r) {
    __m256 y = load(bias, r);
    for (int s = 0; s < S; ++s) y = _mm256_add_ps(y, acc[s][r]);
    if (MASKED && r == NV - 1)
      _mm256_maskstore_ps(out + 8 * r, mask, y);
    else
      _mm256_storeu_ps(out + 8 * r, y);
  }
}

// The channel blocks of pixel_all_channels, in order: (first channel, NV, S, masked)
struct Block {
  int64_t c;
  int kind;  // 0: 64 channels, 1: 32, 2: 16, 3: 8, 4: the masked last 1-7
};

std::vector<Block> channel_blocks(int64_t C) {
  std::vector<Block> blocks;
  int64_t c = 0;
  for (; c + 64 <= C; c += 64) blocks.push_back({c, 0});
  for (; c + 32 <= C; c += 32) blocks.push_back({c, 1});
  for (; c + 16 <= C; c += 16) blocks.push_back({c, 2});
  for (; c + 8 <= C; c += 8) blocks.push_back({c, 3});
  if (c < C) blocks.push_back({c, 4});
  return blocks;
}

// radius[i]: the taps of block i lie within radius[i] of the kernel's centre (the rest of its weights are zero)
void pixel_all_channels(Window a, const float* bias, float* out, const std::vector<Block>& blocks,
                        const std::vector<int64_t>& radius, __m256i tail_mask) {
  const float *x = a.x, *w = a.w;
  const int64_t p = a.k / 2, ky0 = a.ky0, ky1 = a.ky1, kx0 = a.kx0, kx1 = a.kx1;
  const __m256i full = _mm256_set1_epi32(-1);
  for (size_t i = 0; i < blocks.size(); ++i) {
    const int64_t c = blocks[i].c, r = radius[i];
    a.x = x + c;
    a.w = w + c;
    a.ky0 = std::max(ky0, p - r), a.ky1 = std::min(ky1, p + r + 1);
    a.kx0 = std::max(kx0, p - r), a.kx1 = std::min(kx1, p + r + 1);
    switch (blocks[i].kind) {
      case 0: pixel<8, 1, false>(a, bias + c, out + c, full); break;
      case 1: pixel<4, 2, false>(a, bias + c, out + c, full); break;
      case 2: pixel<2, 4, false>(a, bias + c, out + c, full); break;
      case 3: pixel<1, 4, false>(a, bias + c, out + c, full); break;
      default: pixel<1, 4, true>(a, bias + c, out + c, tail_mask);
    }
  }
}

at::Tensor depthwise_conv(const at::Tensor& x_, const at::Tensor& w, const std::optional<at::Tensor>& b_opt,
                          int64_t stride, const std::optional<at::Tensor>& radius_opt) {
  TORCH_CHECK(x_.dim() == 4 && w.dim() == 4, "depthwise_conv: expected x (B, C, H, W) and w (C, 1, k, k)");
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "depthwise_conv: float32 tensors only");
  const int64_t B = x_.size(0), C = x_.size(1), H = x_.size(2), W = x_.size(3), k = w.size(2);
  TORCH_CHECK(w.size(0) == C && w.size(1) == 1 && w.size(3) == k && k % 2 == 1,
              "depthwise_conv: weight ", w.sizes(), " is not (C, 1, k, k) with odd k for ", C, " channels");
  TORCH_CHECK(stride >= 1, "depthwise_conv: stride must be positive, got ", stride);
  at::Tensor bias = b_opt.has_value() && b_opt->defined() ? b_opt->contiguous() : at::zeros({C}, x_.options());
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.size(0) == C,
              "depthwise_conv: bias must be float32 (C)");
  const int64_t p = k / 2, OH = (H - 1) / stride + 1, OW = (W - 1) / stride + 1;  // 'same' padding k // 2
  const at::Tensor x = channels_innermost_map(x_);  // channels-last or a channel slice of it: read in place
  const int64_t sx = x.stride(3), sy = x.stride(2), sb = x.stride(0);
  const at::Tensor wt = w.reshape({C, k * k}).t().contiguous();  // (k*k, C): one row of C per tap
  at::Tensor out = at::empty({B, C, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // per channel block, the largest tap radius of its channels (all k // 2 without a radius)
  const std::vector<Block> blocks = channel_blocks(C);
  std::vector<int64_t> block_radius(blocks.size(), k / 2);
  if (radius_opt.has_value() && radius_opt->defined()) {
    const at::Tensor rad = radius_opt->to(at::kLong).contiguous();
    TORCH_CHECK(rad.dim() == 1 && rad.size(0) == C, "depthwise_conv: radius must be (C) = (", C, ")");
    const int64_t* rp = rad.data_ptr<int64_t>();
    for (size_t i = 0; i < blocks.size(); ++i) {
      const int64_t c1 = i + 1 < blocks.size() ? blocks[i + 1].c : C;
      int64_t r = 0;
      for (int64_t c = blocks[i].c; c < c1; ++c) {
        TORCH_CHECK(rp[c] >= 0 && rp[c] <= k / 2, "depthwise_conv: radius must lie in 0 .. ", k / 2);
        r = std::max(r, rp[c]);
      }
      block_radius[i] = r;
    }
  }
  alignas(32) int32_t m[8];
  for (int i = 0; i < 8; ++i) m[i] = (C / 8) * 8 + i < C ? -1 : 0;
  const __m256i tail_mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
  at::parallel_for(0, B * OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t img = t / OH, oy = t % OH, iy0 = oy * stride - p;
      Window a{xp + img * sb, wp, C, sx, sy, k, iy0, 0, std::max<int64_t>(0, -iy0), std::min(k, H - iy0), 0, 0};
      for (int64_t ox = 0; ox < OW; ++ox) {
        a.ix0 = ox * stride - p;
        a.kx0 = std::max<int64_t>(0, -a.ix0);
        a.kx1 = std::min(k, W - a.ix0);
        pixel_all_channels(a, bp, op + (t * OW + ox) * C, blocks, block_radius, tail_mask);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(uniform_vit, m) {
  m.def("depthwise_conv(Tensor x, Tensor w, Tensor? b, int stride, Tensor? radius=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(uniform_vit, CPU, m) { m.impl("depthwise_conv", &depthwise_conv); }
