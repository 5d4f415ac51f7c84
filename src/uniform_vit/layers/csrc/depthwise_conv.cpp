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
#include <cmath>
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
  int kind;     // 0: 64 channels, 1: 32, 2: 16, 3: 8, 4: a masked vector of the last 1-7
  int64_t r;    // the largest tap radius among its channels
  __m256i mask; // kind 4: its channels
};

// channels c .. c + n - 1, all of tap radius r
struct Run {
  int64_t c, n, r;
};

// channels 0 .. C - 1 as blocks of 64, 32, 16, 8 and a masked rest; their tap radii are set by the caller
std::vector<Block> channel_blocks(int64_t C) {
  const __m256i full = _mm256_set1_epi32(-1);
  std::vector<Block> blocks;
  int64_t c = 0;
  for (; c + 64 <= C; c += 64) blocks.push_back({c, 0, 0, full});
  for (; c + 32 <= C; c += 32) blocks.push_back({c, 1, 0, full});
  for (; c + 16 <= C; c += 16) blocks.push_back({c, 2, 0, full});
  for (; c + 8 <= C; c += 8) blocks.push_back({c, 3, 0, full});
  if (c < C)
    blocks.push_back({c, 4, 0, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(C - c)),
                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))});
  return blocks;
}

// the taps of block i lie within blocks[i].r of the kernel's centre (the rest of its weights are zero)
void pixel_all_channels(Window a, const float* bias, float* out, const std::vector<Block>& blocks) {
  const float *x = a.x, *w = a.w;
  const int64_t p = a.k / 2, ky0 = a.ky0, ky1 = a.ky1, kx0 = a.kx0, kx1 = a.kx1;
  const __m256i full = _mm256_set1_epi32(-1);
  for (size_t i = 0; i < blocks.size(); ++i) {
    const int64_t c = blocks[i].c, r = blocks[i].r;
    a.x = x + c;
    a.w = w + c;
    a.ky0 = std::max(ky0, p - r), a.ky1 = std::min(ky1, p + r + 1);
    a.kx0 = std::max(kx0, p - r), a.kx1 = std::min(kx1, p + r + 1);
    switch (blocks[i].kind) {
      case 0: pixel<8, 1, false>(a, bias + c, out + c, full); break;
      case 1: pixel<4, 2, false>(a, bias + c, out + c, full); break;
      case 2: pixel<2, 4, false>(a, bias + c, out + c, full); break;
      case 3: pixel<1, 4, false>(a, bias + c, out + c, full); break;
      default: pixel<1, 4, true>(a, bias + c, out + c, blocks[i].mask);
    }
  }
}

#if defined(__AVX512F__) && !defined(DEPTHWISE_PIXELS)
// The AVX-512 build's stride-1 path (session 31). Each image is first copied into a zero-bordered buffer (p = k // 2
// rows and columns of zeros around it, channels innermost; the border is written once per call), so every tap of
// every pixel is a plain load: no bounds, no branches. A register block is P neighbouring output pixels of one row
// x NV vectors of 16 channels: per tap, NV weight vectors are loaded once and reused by the P pixels (the code above
// loads a weight per FMA), and the P pixels' inputs are the row's next P columns. The border's zeros cost FMAs where
// a kernel overhangs the map (uniform_t's 7 x 7 value conv on 7 x 7 windows: 2401 taps a channel where 1369 reach the
// map), which the branch-free blocks repay: that conv ran 2.3-2.6x faster this way on a Zen 5.

// P pixels x NV channel vectors; taps within r of the centre. xb: the buffer at the block's first pixel's top-left tap
// (row ky = p - r, column kx = p - r), rows rs floats apart, pixels C; w: (k*k, C) weights at the block's channels.
template <int P, int NV, bool MASKED>
inline void dw_block(const float* xb, int64_t rs, int64_t C, const float* w, int64_t k, int64_t p, int64_t r,
                     const float* bias, float* out, int64_t os, __mmask16 mask) {
  auto ld = [&](const float* q, int m) {
    return MASKED && m == NV - 1 ? _mm512_maskz_loadu_ps(mask, q + 16 * m) : _mm512_loadu_ps(q + 16 * m);
  };
  __m512 acc[P][NV];
  for (int m = 0; m < NV; ++m) {
    const __m512 bv = ld(bias, m);
    for (int q = 0; q < P; ++q) acc[q][m] = bv;
  }
  const int64_t n = 2 * r + 1;
  for (int64_t ky = 0; ky < n; ++ky) {
    const float* xr = xb + ky * rs;
    const float* wr = w + ((p - r + ky) * k + p - r) * C;
    for (int64_t kx = 0; kx < n; ++kx) {
      __m512 wv[NV];
      for (int m = 0; m < NV; ++m) wv[m] = ld(wr + kx * C, m);
      const float* xk = xr + kx * C;
      for (int q = 0; q < P; ++q)
        for (int m = 0; m < NV; ++m) acc[q][m] = _mm512_fmadd_ps(ld(xk + q * C, m), wv[m], acc[q][m]);
    }
  }
  for (int q = 0; q < P; ++q)
    for (int m = 0; m < NV; ++m) {
      if (MASKED && m == NV - 1)
        _mm512_mask_storeu_ps(out + q * os + 16 * m, mask, acc[q][m]);
      else
        _mm512_storeu_ps(out + q * os + 16 * m, acc[q][m]);
    }
}

template <int NV, bool MASKED>
inline void dw_run(int P, const float* xb, int64_t rs, int64_t C, const float* w, int64_t k, int64_t p, int64_t r,
                   const float* bias, float* out, int64_t os, __mmask16 mask) {
  switch (P) {  // a row's pixels in runs of as equal a size as can be, at most 8
    case 8: dw_block<8, NV, MASKED>(xb, rs, C, w, k, p, r, bias, out, os, mask); break;
    case 7: dw_block<7, NV, MASKED>(xb, rs, C, w, k, p, r, bias, out, os, mask); break;
    case 6: dw_block<6, NV, MASKED>(xb, rs, C, w, k, p, r, bias, out, os, mask); break;
    case 5: dw_block<5, NV, MASKED>(xb, rs, C, w, k, p, r, bias, out, os, mask); break;
    case 4: dw_block<4, NV, MASKED>(xb, rs, C, w, k, p, r, bias, out, os, mask); break;
    case 3: dw_block<3, NV, MASKED>(xb, rs, C, w, k, p, r, bias, out, os, mask); break;
    case 2: dw_block<2, NV, MASKED>(xb, rs, C, w, k, p, r, bias, out, os, mask); break;
    default: dw_block<1, NV, MASKED>(xb, rs, C, w, k, p, r, bias, out, os, mask);
  }
}

// out (B, H, W, C) = depthwise conv of x (pixels sx floats apart, rows sy, images sb), stride 1, 'same' padding;
// runs: channels of one tap radius, each walked as blocks of 32 channels (NV = 2), then 16, then one masked vector.
void depthwise_padded(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sx, int64_t sy, int64_t sb,
                      const float* wt, int64_t k, const float* bias, const std::vector<Run>& runs, float* out) {
  const int64_t p = k / 2, PW = W + 2 * p, PH = H + 2 * p, rs = PW * C;
  const int64_t segs = (W + 7) / 8, base = W / segs, more = W % segs;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    // the border stays zero; 64-byte aligned (ATen's allocator), so a pixel of 16 channels is one cache line (a
    // std::vector's 16-byte alignment made some calls 1.5x slower, by where malloc put it)
    at::Tensor buf_t = at::zeros({PH * PW * C}, at::kFloat);
    float* buf = buf_t.data_ptr<float>();
    for (int64_t img = begin; img < end; ++img) {
      const float* xi = x + img * sb;
      for (int64_t y = 0; y < H; ++y) {
        float* dst = buf + ((y + p) * PW + p) * C;
        if (sx == C) {  // channels-last: the image row is one run
          std::copy(xi + y * sy, xi + y * sy + W * C, dst);
        } else {  // a channel slice: C floats per pixel
          for (int64_t xx = 0; xx < W; ++xx) std::copy(xi + y * sy + xx * sx, xi + y * sy + xx * sx + C, dst + xx * C);
        }
      }
      float* oi = out + img * H * W * C;
      for (int64_t oy = 0; oy < H; ++oy)
        for (const Run& ru : runs) {
          const float* xrow = buf + (oy + p - ru.r) * rs + (p - ru.r) * C;
          for (int64_t c = ru.c; c < ru.c + ru.n;) {
            const int64_t left = ru.c + ru.n - c;
            const int nv = left >= 32 ? 2 : 1;
            const bool masked = left < 16;
            const __mmask16 mask = masked ? static_cast<__mmask16>((1u << left) - 1) : 0xFFFF;
            for (int64_t sgi = 0, ox = 0; sgi < segs; ++sgi) {
              const int P = static_cast<int>(base + (sgi < more));
              const float* xb = xrow + ox * C + c;
              float* o = oi + (oy * W + ox) * C + c;
              if (nv == 2) dw_run<2, false>(P, xb, rs, C, wt + c, k, p, ru.r, bias + c, o, C, mask);
              else if (!masked) dw_run<1, false>(P, xb, rs, C, wt + c, k, p, ru.r, bias + c, o, C, mask);
              else dw_run<1, true>(P, xb, rs, C, wt + c, k, p, ru.r, bias + c, o, C, mask);
              ox += P;
            }
            c += masked ? left : 16 * nv;
          }
        }
    }
  });
}
#endif

at::Tensor depthwise_conv(const at::Tensor& x_, const at::Tensor& w, const std::optional<at::Tensor>& b_opt,
                          int64_t stride, const std::optional<at::Tensor>& radius_opt) {
  TORCH_CHECK(x_.dim() == 4 && (w.dim() == 4 || w.dim() == 2),
              "depthwise_conv: expected x (B, C, H, W) and w (C, 1, k, k) or (k*k, C)");
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "depthwise_conv: float32 tensors only");
  const int64_t B = x_.size(0), C = x_.size(1), H = x_.size(2), W = x_.size(3);
  // w: the conv's (C, 1, k, k) weight, or the (k*k, C) taps-major copy the op reads (a caller that keeps it saves
  // the transpose every call)
  const bool taps_major = w.dim() == 2;
  const int64_t k =
      taps_major ? static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(w.size(0))))) : w.size(2);
  if (taps_major) {
    TORCH_CHECK(k * k == w.size(0) && w.size(1) == C && k % 2 == 1,
                "depthwise_conv: weight ", w.sizes(), " is not (k*k, C) with odd k for ", C, " channels");
  } else {
    TORCH_CHECK(w.size(0) == C && w.size(1) == 1 && w.size(3) == k && k % 2 == 1,
                "depthwise_conv: weight ", w.sizes(), " is not (C, 1, k, k) with odd k for ", C, " channels");
  }
  TORCH_CHECK(stride >= 1, "depthwise_conv: stride must be positive, got ", stride);
  at::Tensor bias = b_opt.has_value() && b_opt->defined() ? b_opt->contiguous() : at::zeros({C}, x_.options());
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.size(0) == C,
              "depthwise_conv: bias must be float32 (C)");
  const int64_t p = k / 2, OH = (H - 1) / stride + 1, OW = (W - 1) / stride + 1;  // 'same' padding k // 2
  const at::Tensor x = channels_innermost_map(x_);  // channels-last or a channel slice of it: read in place
  const int64_t sx = x.stride(3), sy = x.stride(2), sb = x.stride(0);
  const at::Tensor wt = taps_major ? w.contiguous() : w.reshape({C, k * k}).t().contiguous();  // one row of C per tap
  at::Tensor out = at::empty({B, C, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // runs of channels of one tap radius (all k // 2 without a radius tensor): the merged value conv's heads
  std::vector<Run> runs;
  if (radius_opt.has_value() && radius_opt->defined()) {
    const at::Tensor rad = radius_opt->to(at::kLong).contiguous();
    TORCH_CHECK(rad.dim() == 1 && rad.size(0) == C, "depthwise_conv: radius must be (C) = (", C, ")");
    const int64_t* rp = rad.data_ptr<int64_t>();
    for (int64_t c = 0; c < C; ++c)
      TORCH_CHECK(rp[c] >= 0 && rp[c] <= k / 2, "depthwise_conv: radius must lie in 0 .. ", k / 2);
    for (int64_t c0 = 0, c1; c0 < C; c0 = c1) {
      for (c1 = c0 + 1; c1 < C && rp[c1] == rp[c0];) ++c1;
      runs.push_back({c0, c1 - c0, rp[c0]});
    }
  } else {
    runs.push_back({0, C, k / 2});
  }
#if defined(__AVX512F__) && !defined(DEPTHWISE_PIXELS)
  // the padded path for UniForm's windows and other maps of 5 x 5 to 8 x 8 that hold the kernel: there, per tap of
  // the value conv, 1.5-2.5x the pixel path below; on uniform_t's 14 x 14 and 4 x 4 maps it ran 0.94x (the copy and
  // a buffer past L1), and on 4 x 4 maps with 7 x 7 kernels most of its taps would be border (session 31)
  if (stride == 1 && H >= k && W >= k && H >= 5 && W >= 5 && H <= 8 && W <= 8) {
    depthwise_padded(xp, B, C, H, W, sx, sy, sb, wp, k, bp, runs, op);
    return out;
  }
#endif
  // the pixel path's channel blocks, cut from all C channels, each walking the window of its widest channel
  std::vector<Block> blocks = channel_blocks(C);
  for (size_t i = 0; i < blocks.size(); ++i) {
    const int64_t c1 = i + 1 < blocks.size() ? blocks[i + 1].c : C;
    for (const Run& ru : runs)
      if (ru.c < c1 && ru.c + ru.n > blocks[i].c) blocks[i].r = std::max(blocks[i].r, ru.r);
  }
  at::parallel_for(0, B * OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t img = t / OH, oy = t % OH, iy0 = oy * stride - p;
      Window a{xp + img * sb, wp, C, sx, sy, k, iy0, 0, std::max<int64_t>(0, -iy0), std::min(k, H - iy0), 0, 0};
      for (int64_t ox = 0; ox < OW; ++ox) {
        a.ix0 = ox * stride - p;
        a.kx0 = std::max<int64_t>(0, -a.ix0);
        a.kx1 = std::min(k, W - a.ix0);
        pixel_all_channels(a, bp, op + (t * OW + ox) * C, blocks);
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
