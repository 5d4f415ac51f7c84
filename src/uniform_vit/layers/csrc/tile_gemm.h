// The register-blocked product shared by the deploy form's dense CPU ops (residual_ffn.cpp, pointwise_conv.cpp,
// conv3x3_s2.cpp; uniform_vit/layers/cpu_kernels.py builds them into one library).
//
//   c[r, j] = epilogue(bias[j] + sum_s sum_k a[r * lda + aoff[s] + k] * b[boff[s] + k * ldb + j])
//
// One segment (aoff = boff = 0) is a plain matrix product of a (M x K, row stride lda) and b (K x N, row stride ldb).
// Several segments are an implicit-GEMM convolution on a channels-last map: a segment is a run of K input values
// that lie next to each other in memory (one kernel row: 3 taps x Cin channels), and the rows r are output pixels
// whose windows are lda floats apart (2 Cin for a stride-2 conv), so no im2col copy is made. The epilogue is
// nothing, a ReLU, or the add of a residual res (row stride ldr).
//
// b may also be packed (pack_b; ldb < 0 asks for it): the column block starting at column j is stored at b + K j
// as its K rows one after another, each as wide as the block (NV V, then V, then the N mod V last columns). In a plain
// matrix a block's rows are a cache line each, 4N bytes apart; packed they are one sequential run, which the
// products read 1.1-1.2x faster at UniForm's wide shapes (N = 480-960) in the traced models (session 18).
//
// Register blocks: R rows x 2 vectors of output columns (6 x 16 with AVX2, 12 x 32 with AVX-512: 12 or 24
// accumulators, 2 column vectors and 1 broadcast), the column panel outer so that its rows of b stay in L1 across
// the row blocks; narrower panels for the tails and one masked vector for the last N mod V columns (until session
// 26 a tail of scalar columns: on AVX-512, where V = 16, uniform_m's 120-wide query conv ran at 0.28x oneDNN's speed
// that way, 0.91x now). At UniForm's shapes on an AVX2 Zen 3 this reaches 63-88 GFLOP/s against the core's
// 93 GFLOP/s FMA peak (benchmarks/RESULTS.md, section 1, sessions 17 and 18).

#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace uniform_vit_tile {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
constexpr int R = 12;  // rows per register block: 24 accumulators + 2 column vectors + 1 broadcast of 32 registers
#else
constexpr int R = 6;   // 12 accumulators + 2 column vectors + 1 broadcast of AVX2's 16 registers
#endif
constexpr int NV = 2;  // output column vectors per register block

enum class Epi { kNone, kRelu, kAdd };

// Where the K-runs of one output row lie: nseg segments at a + aoff[s] (rows lda apart) against b + boff[s].
struct Segments {
  int n = 1;
  int64_t aoff[9] = {0};
  int64_t boff[9] = {0};
};

// RR rows x NVV column vectors. TAIL: the last vector holds only `last` (< V) columns, read and written with masked
// loads and stores, so it sums in the same order as a whole vector and never touches memory past the last column.
template <int RR, int NVV, Epi E, bool TAIL = false>
inline void mk(const float* a, int64_t lda, const Segments& sg, int64_t K, const float* b, int64_t ldb,
               const float* bias, const float* res, int64_t ldr, float* c, int64_t ldc, int64_t last = V) {
  const auto width = [last](int m) { return TAIL && m == NVV - 1 ? last : V; };
  Vec acc[RR][NVV];
  for (int m = 0; m < NVV; ++m) {
    const Vec bv = Vec::loadu(bias + m * V, width(m));
    for (int r = 0; r < RR; ++r) acc[r][m] = bv;
  }
  for (int s = 0; s < sg.n; ++s) {
    const float* as = a + sg.aoff[s];
    const float* bs = b + sg.boff[s];
    for (int64_t k = 0; k < K; ++k) {
      Vec bk[NVV];
      for (int m = 0; m < NVV; ++m) bk[m] = Vec::loadu(bs + k * ldb + m * V, width(m));
      for (int r = 0; r < RR; ++r) {
        const Vec ab(as[r * lda + k]);
        for (int m = 0; m < NVV; ++m) acc[r][m] = at::vec::fmadd(ab, bk[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int m = 0; m < NVV; ++m) {
      Vec y = acc[r][m];
      if constexpr (E == Epi::kRelu) y = at::vec::clamp_min(y, Vec(0.f));
      if constexpr (E == Epi::kAdd) y = y + Vec::loadu(res + r * ldr + m * V, width(m));
      y.store(c + r * ldc + m * V, width(m));
    }
}

// columns j0 .. j1 of rows 0 .. RR - 1: full panels, then single vectors, then one masked vector for the last
// N mod V columns. Plain b: the block at column j is b + j, rows ldb apart; packed b (ldb < 0): it starts at b + K j,
// rows as far apart as the block is wide. (One block of two vectors, the second masked, for a rest of 24 columns ran
// uniform_m's 120-wide query conv 1.16x slower than a whole vector and a masked one: its packed rows of 24 floats
// straddle cache lines.)
template <int RR, Epi E>
inline void rows(const float* a, int64_t lda, const Segments& sg, int64_t K, const float* b, int64_t ldb,
                 const float* bias, const float* res, int64_t ldr, float* c, int64_t ldc, int64_t j0, int64_t j1) {
  const bool packed = ldb < 0;
  const auto bj = [&](int64_t j) { return packed ? b + K * j : b + j; };
  const auto ld = [&](int64_t width) { return packed ? width : ldb; };
  const auto rj = [&](int64_t jj) { return E == Epi::kAdd ? res + jj : nullptr; };
  int64_t j = j0;
  for (; j + NV * V <= j1; j += NV * V)
    mk<RR, NV, E>(a, lda, sg, K, bj(j), ld(NV * V), bias + j, rj(j), ldr, c + j, ldc);
  for (; j + V <= j1; j += V) mk<RR, 1, E>(a, lda, sg, K, bj(j), ld(V), bias + j, rj(j), ldr, c + j, ldc);
  if (j < j1) mk<RR, 1, E, true>(a, lda, sg, K, bj(j), ld(j1 - j), bias + j, rj(j), ldr, c + j, ldc, j1 - j);
}

// c (M x N) = epilogue(bias + product) for M rows (a tile: a few dozen), column panels outer, row blocks inner
template <Epi E>
void gemm_tile(const float* a, int64_t lda, int64_t M, const Segments& sg, int64_t K, const float* b, int64_t ldb,
               int64_t N, const float* bias, const float* res, int64_t ldr, float* c, int64_t ldc) {
  for (int64_t j0 = 0; j0 < N; j0 += NV * V) {
    const int64_t j1 = std::min(N, j0 + NV * V);
    for (int64_t r = 0; r < M;) {
      int64_t rr = std::min<int64_t>(R, M - r);  // rows in this block (the last block of a tile may be smaller)
      const float* ar = a + r * lda;
      const float* rs = E == Epi::kAdd ? res + r * ldr : nullptr;
      float* cr = c + r * ldc;
      switch (rr) {
#if defined(CPU_CAPABILITY_AVX512)
        case 12: rows<12, E>(ar, lda, sg, K, b, ldb, bias, rs, ldr, cr, ldc, j0, j1); break;
        case 11: case 10: case 9: case 8:
          rows<8, E>(ar, lda, sg, K, b, ldb, bias, rs, ldr, cr, ldc, j0, j1);
          rr = 8;
          break;
        case 7:
#endif
        case 6: rows<6, E>(ar, lda, sg, K, b, ldb, bias, rs, ldr, cr, ldc, j0, j1); rr = 6; break;
        case 5: case 4: rows<4, E>(ar, lda, sg, K, b, ldb, bias, rs, ldr, cr, ldc, j0, j1); rr = 4; break;
        case 3: case 2: rows<2, E>(ar, lda, sg, K, b, ldb, bias, rs, ldr, cr, ldc, j0, j1); rr = 2; break;
        default: rows<1, E>(ar, lda, sg, K, b, ldb, bias, rs, ldr, cr, ldc, j0, j1); rr = 1;
      }
      r += rr;
    }
  }
}

// gemm_tile with the M rows cut into ceil(M / R) blocks of as equal a size as can be (55 rows: five of 11, not four
// of 12, one of 6 and one of 1): a block of few rows has few independent accumulator chains and waits on the FMA
// latency. The stride-2 convs' rows of 13-55 output pixels run 1.12-1.43x faster so on AVX-512 (session 30). The
// products over whole tiles of 8 R rows (the FFN, the 1x1 convs) keep gemm_tile: built with this one in their
// translation units they ran 3-13 % slower, though their blocks are the same (the compiler inlines differently).
template <Epi E>
void gemm_tile_even(const float* a, int64_t lda, int64_t M, const Segments& sg, int64_t K, const float* b,
                    int64_t ldb, int64_t N, const float* bias, float* c, int64_t ldc) {
  const int64_t nb = (M + R - 1) / R;
  if (nb == 0) return;
  const int64_t base = M / nb, more = M % nb;
  for (int64_t j0 = 0; j0 < N; j0 += NV * V) {
    const int64_t j1 = std::min(N, j0 + NV * V);
    for (int64_t blk = 0, r = 0; blk < nb; ++blk) {
      const int64_t rr = base + (blk < more);  // the first M mod nb blocks take one row more
      const float* ar = a + r * lda;
      float* cr = c + r * ldc;
      switch (rr) {
#if defined(CPU_CAPABILITY_AVX512)
        case 12: rows<12, E>(ar, lda, sg, K, b, ldb, bias, nullptr, 0, cr, ldc, j0, j1); break;
        case 11: rows<11, E>(ar, lda, sg, K, b, ldb, bias, nullptr, 0, cr, ldc, j0, j1); break;
        case 10: rows<10, E>(ar, lda, sg, K, b, ldb, bias, nullptr, 0, cr, ldc, j0, j1); break;
        case 9: rows<9, E>(ar, lda, sg, K, b, ldb, bias, nullptr, 0, cr, ldc, j0, j1); break;
        case 8: rows<8, E>(ar, lda, sg, K, b, ldb, bias, nullptr, 0, cr, ldc, j0, j1); break;
        case 7: rows<7, E>(ar, lda, sg, K, b, ldb, bias, nullptr, 0, cr, ldc, j0, j1); break;
#endif
        case 6: rows<6, E>(ar, lda, sg, K, b, ldb, bias, nullptr, 0, cr, ldc, j0, j1); break;
        case 5: rows<5, E>(ar, lda, sg, K, b, ldb, bias, nullptr, 0, cr, ldc, j0, j1); break;
        case 4: rows<4, E>(ar, lda, sg, K, b, ldb, bias, nullptr, 0, cr, ldc, j0, j1); break;
        case 3: rows<3, E>(ar, lda, sg, K, b, ldb, bias, nullptr, 0, cr, ldc, j0, j1); break;
        case 2: rows<2, E>(ar, lda, sg, K, b, ldb, bias, nullptr, 0, cr, ldc, j0, j1); break;
        default: rows<1, E>(ar, lda, sg, K, b, ldb, bias, nullptr, 0, cr, ldc, j0, j1);
      }
      r += rr;
    }
  }
}

// plain product (one segment) over rows 0 .. M - 1
template <Epi E>
inline void gemm_rows(const float* a, int64_t lda, int64_t M, int64_t K, const float* b, int64_t N,
                      const float* bias, const float* res, int64_t ldr, float* c, int64_t ldc, bool packed = false) {
  gemm_tile<E>(a, lda, M, Segments{}, K, b, packed ? -1 : N, N, bias, res, ldr, c, ldc);
}

// b (K x N, row-major) in the packed layout above: for each column block (NV V wide, then V, then the last
// N mod V columns), its K rows
inline void pack_b(const float* b, int64_t K, int64_t N, float* out) {
  int64_t j = 0;
  auto block = [&](int64_t w) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t q = 0; q < w; ++q) out[K * j + k * w + q] = b[k * N + j + q];
    j += w;
  };
  while (j + NV * V <= N) block(NV * V);
  while (j + V <= N) block(V);
  if (j < N) block(N - j);
}

}  // namespace uniform_vit_tile
