// The stem's first layer in one CPU op (uniform_vit/layers/cpu_kernels.py builds it with reuse_core.cpp;
// uniform_vit/models/uniform.py, DeployStem, calls it).
//
//   out = relu(conv2d(x, w, b, stride 2, padding 1))    x: (B, Cin, H, W) float32, any layout; w: (Cout, Cin, 3, 3),
//   Cout = 8, 16 or 24 (UniForm's E0 / 8); out: (B, Cout, ceil(H/2), ceil(W/2)) in channels-last memory.
//
// Why: the first conv sees 1-3 input channels and writes 8-24, the shape oneDNN's convolutions handle worst. On a
// 2-vCPU Zen 3 (AVX2) it ran at 8-25 GFLOP/s, after a separate copy of the image to channels-last and before a
// separate ReLU pass over the largest map of the network (benchmarks/RESULTS.md, section 1, session 17). Here the
// image is read where it lies (NCHW planes), the output is written once, channels-last, with bias and ReLU applied.
//
// Vectorised over output channels, 8 per 256-bit vector (AVX2 and FMA; the AVX-512 build runs the same 256-bit
// code: a 512-bit version vectorised over 16 output pixels of a row, transposed into channels-last pixels at the end,
// ran 0.6-0.94x this code on an AVX-512 Xeon in session 26, benchmarks/RESULTS.md, section 1), for a run of P output
// pixels of one output row: each input value is broadcast once and multiplied into every pixel it reaches. With
// stride 2 the P pixels of a row read 2P + 1 input columns per kernel row, against 3P when each pixel is done on its
// own (1.3-1.4x faster measured for Cout = 8). Pixels whose window crosses the image border (the first column, the
// last when W is even, and every pixel of the first and last rows' out-of-range kernel rows) skip the padding taps.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>

namespace {

// Registers: P x NV accumulators + 3 NV weight vectors of one kernel row + 1 broadcast. AVX2 has 16 vector
// registers; the AVX-512 build (AVX-512VL) addresses 32 of 256 bits, so its runs are longer: 14 / 10 / 6 pixels
// instead of 10 / 4 / 2. On a Zen 5 EPYC (session 27) the short runs left 24 channels slower than oneDNN.
template <int NV>
constexpr int pixels_per_run() {
#ifdef __AVX512VL__
  return NV == 1 ? 14 : NV == 2 ? 10 : 6;
#else
  return NV == 1 ? 10 : NV == 2 ? 4 : 2;
#endif
}

// out[p, :] for the P pixels ox .. ox + P - 1 of output row oy (EDGE: some taps fall on the zero padding).
// wt: (Cin, 3, 3, Cout) weights, one row of NV vectors per tap.
template <int NV, int P, bool EDGE>
inline void run_pixels(const float* x, int64_t cin, int64_t H, int64_t W, const float* wt, const __m256* bias,
                       int64_t oy, int64_t ox, float* out, bool relu) {
  __m256 acc[P][NV];
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < NV; ++m) acc[p][m] = bias[m];
  const int64_t iy0 = 2 * oy - 1, ix0 = 2 * ox - 1;
  for (int64_t c = 0; c < cin; ++c) {
    for (int ky = 0; ky < 3; ++ky) {
      const int64_t iy = iy0 + ky;
      if (iy < 0 || iy >= H) continue;
      const float* row = x + (c * H + iy) * W;  // input column ix0 + q is row[ix0 + q]
      const float* wk = wt + (c * 3 + ky) * 3 * NV * 8;
      __m256 w0[NV], w1[NV], w2[NV];
      for (int m = 0; m < NV; ++m) {
        w0[m] = _mm256_loadu_ps(wk + m * 8);
        w1[m] = _mm256_loadu_ps(wk + (NV + m) * 8);
        w2[m] = _mm256_loadu_ps(wk + (2 * NV + m) * 8);
      }
      // input column ix0 + q: tap 0 of pixel q/2 and tap 2 of pixel q/2 - 1 (q even), tap 1 of pixel (q-1)/2 (odd)
#pragma GCC unroll 32
      for (int q = 0; q < 2 * P + 1; ++q) {
        if (EDGE && (ix0 + q < 0 || ix0 + q >= W)) continue;
        const __m256 xv = _mm256_broadcast_ss(row + ix0 + q);
        if (q % 2 == 1) {
          for (int m = 0; m < NV; ++m) acc[(q - 1) / 2][m] = _mm256_fmadd_ps(xv, w1[m], acc[(q - 1) / 2][m]);
        } else {
          if (q / 2 < P)
            for (int m = 0; m < NV; ++m) acc[q / 2][m] = _mm256_fmadd_ps(xv, w0[m], acc[q / 2][m]);
          if (q / 2 >= 1)
            for (int m = 0; m < NV; ++m) acc[q / 2 - 1][m] = _mm256_fmadd_ps(xv, w2[m], acc[q / 2 - 1][m]);
        }
      }
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < NV; ++m) _mm256_storeu_ps(out + (p * NV + m) * 8, relu ? _mm256_max_ps(acc[p][m], zero) : acc[p][m]);
}

template <int NV>
void stem_rows(const float* x, int64_t B, int64_t cin, int64_t H, int64_t W, const float* wt, const float* b,
               bool relu, float* out) {
  constexpr int P = pixels_per_run<NV>();
  const int64_t OH = (H + 1) / 2, OW = (W + 1) / 2, cout = NV * 8;
  __m256 bias[NV];
  for (int m = 0; m < NV; ++m) bias[m] = _mm256_loadu_ps(b + m * 8);
  at::parallel_for(0, B * OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t img = t / OH, oy = t % OH;
      const float* xb = x + img * cin * H * W;
      float* orow = out + t * OW * cout;
      // runs of P pixels; a run is interior when its input columns 2 ox - 1 .. 2 (ox + P) - 1 lie inside
      // 0 .. W - 1 (only the first is not, and the last when W is odd). The row's last few pixels go in runs of
      // P / 2, P / 4, ...: one pixel alone is a chain of 9 Cin dependent FMAs, several times the time per pixel of a
      // run (a single-pixel tail of 7 pixels per row cost uniform_t's first layer ~1.3x, session 18).
      int64_t ox = 0;
      for (; ox + P <= OW; ox += P) {
        if (ox >= 1 && 2 * (ox + P) <= W) run_pixels<NV, P, false>(xb, cin, H, W, wt, bias, oy, ox, orow + ox * cout, relu);
        else run_pixels<NV, P, true>(xb, cin, H, W, wt, bias, oy, ox, orow + ox * cout, relu);
      }
      if constexpr (P >= 8)
        for (; ox + 4 <= OW; ox += 4) run_pixels<NV, 4, true>(xb, cin, H, W, wt, bias, oy, ox, orow + ox * cout, relu);
      if constexpr (P >= 4)
        for (; ox + 2 <= OW; ox += 2) run_pixels<NV, 2, true>(xb, cin, H, W, wt, bias, oy, ox, orow + ox * cout, relu);
      for (; ox < OW; ++ox) run_pixels<NV, 1, true>(xb, cin, H, W, wt, bias, oy, ox, orow + ox * cout, relu);
    }
  });
}

at::Tensor stem_conv(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& b, bool relu) {
  TORCH_CHECK(x_.dim() == 4 && w.dim() == 4 && b.dim() == 1, "stem_conv: expected x (B, Cin, H, W), w (Cout, Cin, 3, 3), b (Cout)");
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "stem_conv: float32 tensors only");
  const int64_t B = x_.size(0), cin = x_.size(1), H = x_.size(2), W = x_.size(3), cout = w.size(0);
  TORCH_CHECK(w.size(1) == cin && w.size(2) == 3 && w.size(3) == 3 && b.size(0) == cout,
              "stem_conv: weight ", w.sizes(), " and bias ", b.sizes(), " do not fit an input of ", cin, " channels");
  TORCH_CHECK(cout == 8 || cout == 16 || cout == 24, "stem_conv: 8, 16 or 24 output channels, got ", cout);
  const at::Tensor x = x_.contiguous();
  const at::Tensor wt = w.permute({1, 2, 3, 0}).contiguous();  // (Cin, 3, 3, Cout): a row of Cout per tap
  const at::Tensor bc = b.contiguous();
  at::Tensor out = at::empty({B, cout, (H + 1) / 2, (W + 1) / 2}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  switch (cout) {
    case 8: stem_rows<1>(xp, B, cin, H, W, wp, bp, relu, op); break;
    case 16: stem_rows<2>(xp, B, cin, H, W, wp, bp, relu, op); break;
    default: stem_rows<3>(xp, B, cin, H, W, wp, bp, relu, op);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(uniform_vit, m) { m.def("stem_conv(Tensor x, Tensor w, Tensor b, bool relu) -> Tensor"); }

TORCH_LIBRARY_IMPL(uniform_vit, CPU, m) { m.impl("stem_conv", &stem_conv); }
