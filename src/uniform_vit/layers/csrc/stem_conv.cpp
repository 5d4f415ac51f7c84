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
// Two versions. The AVX2 one (below) is vectorised over output channels, 8 per 256-bit vector, for a run of P output
// pixels of one output row: each input value is broadcast once and multiplied into every pixel it reaches. With
// stride 2 the P pixels of a row read 2P + 1 input columns per kernel row, against 3P when each pixel is done on its
// own (1.3-1.4x faster measured for Cout = 8). Pixels whose window crosses the image border (the first column, the
// last when W is even, and every pixel of the first and last rows' out-of-range kernel rows) skip the padding taps.
// The AVX-512 build runs its own 512-bit version (stem_rows_512, session 27, a Zen 5 EPYC: 1.2-1.5x the 256-bit
// code alone for 3 input channels, 1.02-1.04x the traced uniform_t; benchmarks/RESULTS.md, section 1). An earlier
// 512-bit version, one output channel of 16 pixels per register and an 8 x 16 transpose at the end, ran 0.6-0.94x
// the 256-bit code on an AVX-512 Xeon (session 26) and was not kept; the one here has not been run on that Xeon.
// Building with -DSTEM_CONV_256 keeps the 256-bit code on AVX-512 for such comparisons.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace {

// Registers: P x NV accumulators + 3 NV weight vectors of one kernel row + 1 broadcast. AVX2 has 16 vector
// registers; with AVX-512VL 32 of 256 bits are addressable, so runs are longer there: 14 / 10 / 6 pixels instead of
// 10 / 4 / 2 (on a Zen 5 EPYC the short runs left 24 channels slower than oneDNN, session 27). Shipped AVX-512 builds
// run stem_rows_512 instead; this blocking serves only the -DSTEM_CONV_256 comparison build there.
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

#if defined(__AVX512F__) && !defined(STEM_CONV_256)
// The AVX-512 version (session 27, a Zen 5 EPYC): each 512-bit accumulator holds 4 output channels x 4 neighbouring
// output pixels, lane 4k + p = channel 4m + k of pixel p, so a tap's input is one 128-bit load of 4 consecutive
// values broadcast to the four quads, and its weights one 512-bit vector (each channel's weight four times) read by
// the FMA from memory. For stride 2 those 4 values are every second input column: each input row the output row
// needs is first split into its even and odd columns (E, and O shifted by one for the left padding column), so that
// the three taps of a kernel row read O[j], E[j] and O[j + 1] for output pixel j. A run is R groups of 4 pixels;
// at the end each accumulator is transposed in its register (quad p = pixel p's 4 channels) and stored as four
// 128-bit pieces of the channels-last row. The row's last group may hold fewer than 4 pixels: its input columns
// past the image read the zero padding of E and O, and only its real pixels are stored.

#ifdef STEM_QUADS8
constexpr bool kStemQuads8 = true;  // A/B switch: 8 output channels through the quads code too
#else
constexpr bool kStemQuads8 = false;
#endif

// Split input row `row` (W floats) into E[j] = row[2j] and O[j + 1] = row[2j + 1]; O[0] stays 0 (column -1). Entries
// past the row's end are written as 0 (masked loads) up to 16 * ceil(W / 32) - 1, the rest were zeroed at allocation.
inline void split_columns(const float* row, int64_t W, float* E, float* O) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t c = 0; c < W; c += 32) {
    const int64_t n = W - c;
    const __mmask16 lo = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
    const __mmask16 hi = n >= 32 ? 0xFFFF : n <= 16 ? 0 : static_cast<__mmask16>((1u << (n - 16)) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(lo, row + c), b = _mm512_maskz_loadu_ps(hi, row + c + 16);
    _mm512_storeu_ps(E + c / 2, _mm512_permutex2var_ps(a, even, b));
    _mm512_storeu_ps(O + 1 + c / 2, _mm512_permutex2var_ps(a, odd, b));
  }
}

// One run of R groups of 4 output pixels starting at pixel j0 of the row. taps: the row's valid (Cin, ky) pairs, each
// with its E / O rows and its 3 x G weight vectors; G = Cout / 4 accumulators per group.
template <int G, int R>
inline void run_quads(const float* const* E, const float* const* O, const float* const* wk, int ntaps,
                      const __m512* bias, int64_t j0, int64_t OW, float* orow, bool relu) {
  __m512 acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < G; ++m) acc[r][m] = bias[m];
  for (int t = 0; t < ntaps; ++t) {
#pragma GCC unroll 3
    for (int kx = 0; kx < 3; ++kx) {
      const float* src = (kx == 1 ? E[t] : O[t] + (kx == 2)) + j0;
      const float* w = wk[t] + kx * G * 16;
      __m512 xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm512_broadcast_f32x4(_mm_loadu_ps(src + 4 * r));
      for (int m = 0; m < G; ++m) {
        const __m512 wv = _mm512_loadu_ps(w + m * 16);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(xv[r], wv, acc[r][m]);
      }
    }
  }
  const __m512i quads = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512 zero = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const int64_t j = j0 + 4 * r, np = OW - j < 4 ? OW - j : 4;
    for (int m = 0; m < G; ++m) {
      const __m512 v = _mm512_permutexvar_ps(quads, relu ? _mm512_max_ps(acc[r][m], zero) : acc[r][m]);
      float* o = orow + j * (4 * G) + 4 * m;
      _mm_storeu_ps(o, _mm512_castps512_ps128(v));
      if (np > 1) _mm_storeu_ps(o + 4 * G, _mm512_extractf32x4_ps(v, 1));
      if (np > 2) _mm_storeu_ps(o + 8 * G, _mm512_extractf32x4_ps(v, 2));
      if (np > 3) _mm_storeu_ps(o + 12 * G, _mm512_extractf32x4_ps(v, 3));
    }
  }
}

// 8 output channels (uniform_t), session 31: a register holds 16 neighbouring output pixels of one channel, so a
// tap's input is a plain 512-bit load from the split row (no broadcast of 4 values to quads) and its 8 weights are
// scalar broadcasts, each multiplied into the run's PV pixel vectors; per tap and kernel column PV + 8 loads for 8 PV
// FMAs (3 + 8 for 24) against 10 for 16 in the quads above. At the end the 8 channel vectors of each 16 pixels are
// transposed in registers into 8 vectors of 2 pixels x 8 channels (32 shuffles) and stored as channels-last rows.

// a[c]: channel c of 16 pixels; o[k]: pixels 2k and 2k + 1, channels 0-7 each
inline void transpose_8x16(const __m512* a, __m512* o) {
  const __m512 u0 = _mm512_unpacklo_ps(a[0], a[1]), u1 = _mm512_unpackhi_ps(a[0], a[1]);
  const __m512 u2 = _mm512_unpacklo_ps(a[2], a[3]), u3 = _mm512_unpackhi_ps(a[2], a[3]);
  const __m512 u4 = _mm512_unpacklo_ps(a[4], a[5]), u5 = _mm512_unpackhi_ps(a[4], a[5]);
  const __m512 u6 = _mm512_unpacklo_ps(a[6], a[7]), u7 = _mm512_unpackhi_ps(a[6], a[7]);
  // in each 128-bit lane L: v[q] = pixel 4 L + q, channels 0-3; w[q] = the same pixel, channels 4-7
  constexpr int even = _MM_SHUFFLE(1, 0, 1, 0), odd = _MM_SHUFFLE(3, 2, 3, 2);
  const __m512 v[4] = {_mm512_shuffle_ps(u0, u2, even), _mm512_shuffle_ps(u0, u2, odd),
                       _mm512_shuffle_ps(u1, u3, even), _mm512_shuffle_ps(u1, u3, odd)};
  const __m512 w[4] = {_mm512_shuffle_ps(u4, u6, even), _mm512_shuffle_ps(u4, u6, odd),
                       _mm512_shuffle_ps(u5, u7, even), _mm512_shuffle_ps(u5, u7, odd)};
  __m512 lo[4], hi[4];  // lo[q]: (v[q] lanes 0, 1, w[q] lanes 0, 1); hi[q]: lanes 2, 3 of each
  for (int q = 0; q < 4; ++q) {
    lo[q] = _mm512_shuffle_f32x4(v[q], w[q], _MM_SHUFFLE(1, 0, 1, 0));
    hi[q] = _mm512_shuffle_f32x4(v[q], w[q], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int q = 0; q < 4; q += 2) {  // pixels 4 L + q and 4 L + q + 1: o[2 L + q / 2]
    o[0 + q / 2] = _mm512_shuffle_f32x4(lo[q], lo[q + 1], _MM_SHUFFLE(2, 0, 2, 0));
    o[2 + q / 2] = _mm512_shuffle_f32x4(lo[q], lo[q + 1], _MM_SHUFFLE(3, 1, 3, 1));
    o[4 + q / 2] = _mm512_shuffle_f32x4(hi[q], hi[q + 1], _MM_SHUFFLE(2, 0, 2, 0));
    o[6 + q / 2] = _mm512_shuffle_f32x4(hi[q], hi[q + 1], _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// One run of PV vectors of 16 output pixels from pixel j0. wk[t]: tap t's (3, 8) weights (kernel column, channel).
template <int PV>
inline void run_pixels16(const float* const* E, const float* const* O, const float* const* wk, int ntaps,
                         const float* b8, int64_t j0, int64_t OW, float* orow, bool relu) {
  __m512 acc[8][PV];
  for (int c = 0; c < 8; ++c)
    for (int p = 0; p < PV; ++p) acc[c][p] = _mm512_set1_ps(b8[c]);
  for (int t = 0; t < ntaps; ++t) {
#pragma GCC unroll 3
    for (int kx = 0; kx < 3; ++kx) {
      const float* src = (kx == 1 ? E[t] : O[t] + (kx == 2)) + j0;
      const float* w = wk[t] + kx * 8;
      __m512 xv[PV];
      for (int p = 0; p < PV; ++p) xv[p] = _mm512_loadu_ps(src + 16 * p);
      for (int c = 0; c < 8; ++c) {
        const __m512 wv = _mm512_set1_ps(w[c]);
        for (int p = 0; p < PV; ++p) acc[c][p] = _mm512_fmadd_ps(xv[p], wv, acc[c][p]);
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int p = 0; p < PV; ++p) {
    __m512 a[8], o[8];
    for (int c = 0; c < 8; ++c) a[c] = relu ? _mm512_max_ps(acc[c][p], zero) : acc[c][p];
    transpose_8x16(a, o);
    const int64_t j = j0 + 16 * p;
    for (int k = 0; k < 8; ++k) {
      const int64_t left = OW - (j + 2 * k);  // pixels of this pair inside the row
      if (left >= 2) _mm512_storeu_ps(orow + (j + 2 * k) * 8, o[k]);
      else if (left == 1) _mm512_mask_storeu_ps(orow + (j + 2 * k) * 8, 0x00FF, o[k]);
    }
  }
}

template <int PV>
inline void run_pixels16_n(int n, const float* const* E, const float* const* O, const float* const* wk, int ntaps,
                           const float* b8, int64_t j0, int64_t OW, float* orow, bool relu) {
  if constexpr (PV > 1)
    if (n < PV) return run_pixels16_n<PV - 1>(n, E, O, wk, ntaps, b8, j0, OW, orow, relu);
  run_pixels16<PV>(E, O, wk, ntaps, b8, j0, OW, orow, relu);
}

// Registers: R x G accumulators + R broadcast inputs + 1 weight vector (of 32).
template <int G>
constexpr int groups_per_run() {
  return G == 2 ? 8 : G == 4 ? 5 : 4;
}

// G: accumulators per 4-pixel group in the quads code; PIX: the 16-pixel vectors above instead (G = 2 only; w16 and
// b16 are then the (Cin, 3, 3, 8) weights and 8 biases, not repeated)
template <int G, bool PIX = false>
void stem_rows_512(const float* x, int64_t B, int64_t cin, int64_t H, int64_t W, const float* w16, const float* b16,
                   bool relu, float* out) {
  static_assert(!PIX || G == 2, "the 16-pixel code is for 8 output channels");
  constexpr int R = groups_per_run<G>();
  const int64_t OH = (H + 1) / 2, OW = (W + 1) / 2, NG = (OW + 3) / 4;
  const int64_t L = 16 * ((W + 31) / 32) + 32;  // per split row: written part, the last group's reach, O's shift
  __m512 bias[G];
  if constexpr (!PIX)
    for (int m = 0; m < G; ++m) bias[m] = _mm512_loadu_ps(b16 + m * 16);
  at::parallel_for(0, B * OH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(cin * 3 * 2 * L), 0.f);
    std::vector<const float*> E(cin * 3), O(cin * 3), wk(cin * 3);
    std::vector<float*> slot(cin * 3);  // slot[3 c + ky]: the split of channel c's input row 2 oy - 1 + ky
    for (int64_t i = 0; i < cin * 3; ++i) slot[i] = buf.data() + i * 2 * L;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t img = t / OH, oy = t % OH;
      // kernel row 2 of the previous output row is this row's kernel row 0: its split is reused, not redone
      const bool follows = t > begin && oy > 0;
      if (follows)
        for (int64_t c = 0; c < cin; ++c) std::swap(slot[c * 3], slot[c * 3 + 2]);
      // the two input rows the next output row adds, fetched into L1 while this row computes: the image comes
      // from memory once per call, and without this the op waited on it (a cold batch ran 1.65-1.9x slower)
      if (oy + 1 < OH)
        for (int64_t c = 0; c < cin; ++c)
          for (int64_t iy = 2 * oy + 2; iy <= 2 * oy + 3 && iy < H; ++iy) {
            const char* r = reinterpret_cast<const char*>(x + ((img * cin + c) * H + iy) * W);
            for (int64_t q = 0; q < W * 4; q += 64) _mm_prefetch(r + q, _MM_HINT_T0);
          }
      int ntaps = 0;
      for (int64_t c = 0; c < cin; ++c)
        for (int ky = 0; ky < 3; ++ky) {
          const int64_t iy = 2 * oy - 1 + ky;
          if (iy < 0 || iy >= H) continue;
          float* e = slot[c * 3 + ky];
          if (!(follows && ky == 0)) split_columns(x + ((img * cin + c) * H + iy) * W, W, e, e + L);
          E[ntaps] = e, O[ntaps] = e + L, wk[ntaps] = w16 + (c * 3 + ky) * 3 * (PIX ? 8 : G * 16);
          ++ntaps;
        }
      float* orow = out + t * OW * 4 * G;
      if constexpr (PIX) {  // the row's 16-pixel vectors in runs of up to 3, as equal as can be
        const int64_t nv = (OW + 15) / 16, runs = (nv + 2) / 3, base = nv / runs, more = nv % runs;
        for (int64_t i = 0, v = 0; i < runs; ++i) {
          const int n = static_cast<int>(base + (i < more));
          run_pixels16_n<3>(n, E.data(), O.data(), wk.data(), ntaps, b16, 16 * v, OW, orow, relu);
          v += n;
        }
        continue;
      }
      int64_t g = 0;
      for (; g + R <= NG; g += R) run_quads<G, R>(E.data(), O.data(), wk.data(), ntaps, bias, 4 * g, OW, orow, relu);
      if constexpr (R >= 4)
        for (; g + 2 <= NG; g += 2) run_quads<G, 2>(E.data(), O.data(), wk.data(), ntaps, bias, 4 * g, OW, orow, relu);
      for (; g < NG; ++g) run_quads<G, 1>(E.data(), O.data(), wk.data(), ntaps, bias, 4 * g, OW, orow, relu);
    }
  });
}
#endif

at::Tensor stem_conv(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& b, bool relu) {
  TORCH_CHECK(x_.dim() == 4 && w.dim() == 4 && b.dim() == 1, "stem_conv: expected x (B, Cin, H, W), w (Cout, Cin, 3, 3), b (Cout)");
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "stem_conv: float32 tensors only");
  const int64_t B = x_.size(0), cin = x_.size(1), H = x_.size(2), W = x_.size(3), cout = w.size(0);
  TORCH_CHECK(w.size(1) == cin && w.size(2) == 3 && w.size(3) == 3 && b.size(0) == cout,
              "stem_conv: weight ", w.sizes(), " and bias ", b.sizes(), " do not fit an input of ", cin, " channels");
  TORCH_CHECK(cout == 8 || cout == 16 || cout == 24, "stem_conv: 8, 16 or 24 output channels, got ", cout);
  const at::Tensor x = x_.contiguous();
  at::Tensor out = at::empty({B, cout, (H + 1) / 2, (W + 1) / 2}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
#if defined(__AVX512F__) && !defined(STEM_CONV_256)
  // (Cin, 3, 3, Cout x 4) and (Cout x 4): every weight and bias four times, once per pixel of a quad; 8 outputs
  // (the 16-pixel code) read them once
  const bool pix = cout == 8 && !kStemQuads8;
  const at::Tensor wt = pix ? w.permute({1, 2, 3, 0}).contiguous()
                            : w.permute({1, 2, 3, 0}).repeat_interleave(4, -1).contiguous();
  const at::Tensor bc = pix ? b.contiguous() : b.repeat_interleave(4).contiguous();
#else
  const at::Tensor wt = w.permute({1, 2, 3, 0}).contiguous();  // (Cin, 3, 3, Cout): a row of Cout per tap
  const at::Tensor bc = b.contiguous();
#endif
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  switch (cout) {
#if defined(__AVX512F__) && !defined(STEM_CONV_256)
    case 8:
      if (pix) stem_rows_512<2, true>(xp, B, cin, H, W, wp, bp, relu, op);
      else stem_rows_512<2>(xp, B, cin, H, W, wp, bp, relu, op);
      break;
    case 16: stem_rows_512<4>(xp, B, cin, H, W, wp, bp, relu, op); break;
    default: stem_rows_512<6>(xp, B, cin, H, W, wp, bp, relu, op);
#else
    case 8: stem_rows<1>(xp, B, cin, H, W, wp, bp, relu, op); break;
    case 16: stem_rows<2>(xp, B, cin, H, W, wp, bp, relu, op); break;
    default: stem_rows<3>(xp, B, cin, H, W, wp, bp, relu, op);
#endif
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(uniform_vit, m) { m.def("stem_conv(Tensor x, Tensor w, Tensor b, bool relu) -> Tensor"); }

TORCH_LIBRARY_IMPL(uniform_vit, CPU, m) { m.impl("stem_conv", &stem_conv); }
