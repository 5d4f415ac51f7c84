// The query-tiled Reuse Attention core in one CPU op (uniform_vit/layers/cpu_kernels.py builds it;
// uniform_vit/layers/attention.py, _reuse_tiled, calls it).
//
//   out = softmax(scale * q^T k + bias) v^T     q, k: (B, Cq, N) and v: (B, C, N), any strides; bias (N, N) or none;
//   relu(out) when relu (UniForm's projection starts with one; applied as the rows are stored).
//   Returns (B, N, C) memory for token-major v (v.stride(1) == 1, a flattened channels-last map), else (B, C, N).
//
// Why not ATen calls per tile: at N = 3136 the Python core made ~80 BLAS calls per product, and each call repacks
// its whole (N, C) value operand (benchmarks/RESULTS.md, section 1, session 14). Here every operand is read where
// it lies, nothing is copied, and only one (N, TQ) slice of the map exists per thread, TQ = 2 vectors of queries
// (32 with AVX-512, 16 with AVX2: it is built for the ISA PyTorch dispatches to, blocked for its registers below).
// The slice is kept transposed, S^T (keys x queries), so that every step vectorises over queries or channels and
// broadcasts the other operand (register blocks for AVX-512 / AVX2):
//   logits  S^T[j, :] = sum_d k[d, j] (scale q[d, tile]) (+ bias[tile, j], gathered down the bias's rows, or for
//           small N read from a transposed copy made once per call), 12 / 6 keys x 2 query vectors in registers,
//           the column maxima on the way;
//   softmax S^T <- exp(S^T - max) with ATen's vectorised exp_u20 (the fast exp PyTorch's CPU flash attention uses
//           for its scores, about 20 ULP), column sums kept;
//   values  token-major v: O[tile, :] = sum_j S^T[j, tile] v[:, j], 6 queries x 4 / 2 channel vectors in registers;
//           channel-major v: O^T[:, tile] = sum_j v[:, j] S^T[j, tile], 12 / 6 channels x 2 query vectors;
//           both over blocks of keys (KEYS, KEYS_TM) so that the block of S^T stays in L1; divided by the sums (and
//           the ReLU applied) as the last block is stored.
// One parallel loop runs over every image's tiles: UniForm's 7 x 7 windows make a call of many images of N = 49
// (two tiles each), where this runs 2.0-2.5x the batched ATen products (session 31).
// Queries past the end of the last tile are computed as zeros and never stored. A column whose maximum is not
// finite (a -inf bias for every key) goes through std::exp, so inf / NaN come out as ATen's softmax gives them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
using VecI = at::vec::Vectorized<int32_t>;
constexpr int64_t V = Vec::size();
constexpr int64_t TQ = 2 * V;  // queries per tile
// Register blocking, sized to the vector registers: AVX-512 has 32, AVX2 16 (accumulators + operands must fit).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int LK = 12;   // logits: keys x 2 query vectors in registers (24 accumulators)
constexpr int VR = 6;    // token-major value product: query rows x VC channel vectors (24 accumulators)
constexpr int VC = 4;
constexpr int CMR = 12;  // channel-major value product: channels x 2 query vectors (24 accumulators)
#else
constexpr int LK = 6;    // 12 accumulators + 2 query vectors + 1 broadcast key = 15 of AVX2's 16 registers
constexpr int VR = 6;    // 12 accumulators + 2 value vectors + 1 broadcast = 15 (4 x 3 measured 5-15 % slower)
constexpr int VC = 2;
constexpr int CMR = 6;   // 12 accumulators + 2 map vectors + 1 broadcast = 15
#endif
constexpr int64_t KEYS = 128;  // keys per block of the value product, channel-major values
// token-major values: a (KEYS_TM, 4 vectors) block of v and the (KEYS_TM, TQ) block of S^T share L1; 64 keys ran
// 1.03-1.06x faster than 128 at N = 3136 (C = 64 / 128; 32 and 256 no better)
constexpr int64_t KEYS_TM = 64;
constexpr int64_t kBiasCopyFloats = 1 << 15;  // the largest transposed bias copy made (128 KiB)

struct Args {
  const float* q;   // image b
  int64_t sqd, sqn;
  const float* k;
  int64_t skd, skn;
  const float* v;
  int64_t svc, svn;
  const float* bias;  // nullptr or (N, N)
  int64_t sb0, sb1;
  const float* bias_t;  // nullptr, or the bias transposed once per call: (N, ldt) rows, bias_t[j * ldt + i] = (i, j)
  int64_t ldt;
  int64_t n, cq, c;
  float scale;
  bool token_major;  // output (N, C) rows, else (C, N)
  bool relu;         // store relu(out)
  float* out;        // image b
};

// S^T[j0 + i, :] for i < RK, and the running column maxima.
// bias: nullptr, or the tile's first query row of the (N, N) bias; bias[r * sb0 + j * sb1] is (query t0 + r, key j),
// gathered one vector of queries at a time (bi0, bi1: r * sb0 for the tile's two query vectors).
template <int RK>
void logits_keys(const Args& a, const float* qt, const float* bias, const VecI& bi0, const VecI& bi1, int64_t j0,
                 float* st, Vec& m0, Vec& m1) {
  Vec acc[RK][2];
  for (int i = 0; i < RK; ++i) {
    if (a.bias_t) {  // bias here is the tile's first query column of bias_t
      acc[i][0] = Vec::loadu(bias + (j0 + i) * a.ldt);
      acc[i][1] = Vec::loadu(bias + (j0 + i) * a.ldt + V);
    } else if (bias) {
      acc[i][0] = at::vec::gather<sizeof(float)>(bias + (j0 + i) * a.sb1, bi0);
      acc[i][1] = at::vec::gather<sizeof(float)>(bias + (j0 + i) * a.sb1, bi1);
    } else {
      acc[i][0] = acc[i][1] = Vec(0.f);
    }
  }
  for (int64_t d = 0; d < a.cq; ++d) {
    const Vec q0 = Vec::loadu(qt + d * TQ), q1 = Vec::loadu(qt + d * TQ + V);
    const float* kd = a.k + d * a.skd + j0 * a.skn;
    for (int i = 0; i < RK; ++i) {
      const Vec kb(kd[i * a.skn]);
      acc[i][0] = at::vec::fmadd(kb, q0, acc[i][0]);
      acc[i][1] = at::vec::fmadd(kb, q1, acc[i][1]);
    }
  }
  for (int i = 0; i < RK; ++i) {
    acc[i][0].store(st + (j0 + i) * TQ);
    acc[i][1].store(st + (j0 + i) * TQ + V);
    m0 = at::vec::maximum(m0, acc[i][0]);
    m1 = at::vec::maximum(m1, acc[i][1]);
  }
}

// O[t0 + r, c0 : c0 + CV V] = sum_j S^T[j, r] v[c0.., j] (+ what is there unless first), r < R: token-major v.
template <int R, int CV>
void value_tm(const Args& a, const float* st, int64_t r0, int64_t c0, int64_t k0, int64_t k1, float* o, bool first,
              const float* inv) {
  Vec acc[R][CV];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < CV; ++m) acc[r][m] = first ? Vec(0.f) : Vec::loadu(o + r * a.c + m * V);
  for (int64_t j = k0; j < k1; ++j) {
    const float* vj = a.v + j * a.svn + c0;
    Vec vk[CV];
    for (int m = 0; m < CV; ++m) vk[m] = Vec::loadu(vj + m * V);
    const float* sj = st + j * TQ + r0;
    for (int r = 0; r < R; ++r) {
      const Vec sb(sj[r]);
      for (int m = 0; m < CV; ++m) acc[r][m] = at::vec::fmadd(sb, vk[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const Vec iv(inv ? inv[r] : 1.f);  // the softmax's division (and the ReLU), when this is the last block of keys
    for (int m = 0; m < CV; ++m) {
      Vec y = inv ? acc[r][m] * iv : acc[r][m];
      if (inv && a.relu) y = at::vec::clamp_min(y, Vec(0.f));
      y.store(o + r * a.c + m * V);
    }
  }
}

// O^T[c0 + i, tile] = sum_j v[c0 + i, j] S^T[j, tile] (+ acc), i < RC: channel-major v; acc: (RC, TQ) floats.
template <int RC>
void value_cm(const Args& a, const float* st, int64_t c0, int64_t k0, int64_t k1, float* acc_mem, bool first) {
  Vec acc[RC][2];
  for (int i = 0; i < RC; ++i) {
    acc[i][0] = first ? Vec(0.f) : Vec::loadu(acc_mem + i * TQ);
    acc[i][1] = first ? Vec(0.f) : Vec::loadu(acc_mem + i * TQ + V);
  }
  const float* vc = a.v + c0 * a.svc;
  for (int64_t j = k0; j < k1; ++j) {
    const Vec s0 = Vec::loadu(st + j * TQ), s1 = Vec::loadu(st + j * TQ + V);
    for (int i = 0; i < RC; ++i) {
      const Vec vb(vc[i * a.svc + j * a.svn]);
      acc[i][0] = at::vec::fmadd(vb, s0, acc[i][0]);
      acc[i][1] = at::vec::fmadd(vb, s1, acc[i][1]);
    }
  }
  for (int i = 0; i < RC; ++i) {
    acc[i][0].store(acc_mem + i * TQ);
    acc[i][1].store(acc_mem + i * TQ + V);
  }
}

// inv: nullptr, or the rows' 1 / (softmax sum) when k1 is the last key (then stored divided)
template <int R>
void value_tm_rows(const Args& a, const float* st, int64_t r0, int64_t k0, int64_t k1, float* o, bool first,
                   const float* inv) {
  int64_t c0 = 0;
  for (; c0 + VC * V <= a.c; c0 += VC * V) value_tm<R, VC>(a, st, r0, c0, k0, k1, o + c0, first, inv);
  for (; c0 + V <= a.c; c0 += V) value_tm<R, 1>(a, st, r0, c0, k0, k1, o + c0, first, inv);
  for (; c0 < a.c; ++c0)  // the last channels, fewer than one vector
    for (int r = 0; r < R; ++r) {
      float s = first ? 0.f : o[r * a.c + c0];
      for (int64_t j = k0; j < k1; ++j) s += st[j * TQ + r0 + r] * a.v[j * a.svn + c0 * a.svc];
      o[r * a.c + c0] = inv ? (a.relu ? std::max(s * inv[r], 0.f) : s * inv[r]) : s;
    }
}

void tile(const Args& a, int64_t t0, float* st, float* qt, float* cm_acc) {
  const int64_t n = a.n, rows = std::min(TQ, n - t0);
  // Q^T tile, scaled; zeros past the last query. Read a query at a time: token-major queries (a channels-last map,
  // as the deploy layer passes them) are one run of Cq floats each
  if (rows < TQ) std::fill(qt, qt + a.cq * TQ, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* qr = a.q + (t0 + r) * a.sqn;
    for (int64_t d = 0; d < a.cq; ++d) qt[d * TQ + r] = qr[d * a.sqd] * a.scale;
  }
  // the bias of the tile's queries, gathered down its rows (queries past the last row read the last row again:
  // their columns are never stored)
  const float* bias = a.bias_t ? a.bias_t + t0 : a.bias ? a.bias + t0 * a.sb0 : nullptr;
  alignas(64) int32_t idx[TQ];
  for (int64_t r = 0; r < TQ; ++r) idx[r] = static_cast<int32_t>(std::min(r, rows - 1) * a.sb0);
  const VecI bi0 = VecI::loadu(idx), bi1 = VecI::loadu(idx + V);
  const Vec ninf(-std::numeric_limits<float>::infinity());
  Vec m0 = ninf, m1 = ninf;
  int64_t j = 0;
  for (; j + LK <= n; j += LK) logits_keys<LK>(a, qt, bias, bi0, bi1, j, st, m0, m1);
  for (; j + 4 <= n; j += 4) logits_keys<4>(a, qt, bias, bi0, bi1, j, st, m0, m1);
  for (; j < n; ++j) logits_keys<1>(a, qt, bias, bi0, bi1, j, st, m0, m1);
  // softmax down the columns: exp(S^T - max), column sums
  alignas(64) float mx[TQ], inv[TQ];
  m0.store(mx);
  m1.store(mx + V);
  bool finite = true;
  for (int64_t r = 0; r < TQ; ++r) finite = finite && std::isfinite(mx[r]);
  if (finite) {
    const Vec x0 = Vec::loadu(mx), x1 = Vec::loadu(mx + V);
    Vec s0(0.f), s1(0.f);
    for (int64_t jj = 0; jj < n; ++jj) {
      const Vec e0 = (Vec::loadu(st + jj * TQ) - x0).exp_u20(), e1 = (Vec::loadu(st + jj * TQ + V) - x1).exp_u20();
      e0.store(st + jj * TQ);
      e1.store(st + jj * TQ + V);
      s0 = s0 + e0;
      s1 = s1 + e1;
    }
    (Vec(1.f) / s0).store(inv);
    (Vec(1.f) / s1).store(inv + V);
  } else {
    for (int64_t r = 0; r < TQ; ++r) {
      float s = 0.f;
      for (int64_t jj = 0; jj < n; ++jj) s += (st[jj * TQ + r] = std::exp(st[jj * TQ + r] - mx[r]));
      inv[r] = 1.f / s;
    }
  }
  if (a.token_major) {
    float* o = a.out + t0 * a.c;
    for (int64_t k0 = 0; k0 < n; k0 += KEYS_TM) {
      const int64_t k1 = std::min(n, k0 + KEYS_TM);
      const float* iv = k1 == n ? inv : nullptr;  // the last block of keys stores the rows divided by their sums
      for (int64_t r = 0; r < rows;) {  // blocks of VR query rows; the rest as one smaller block (8 left: 4 + 4)
        const int64_t left = rows - r, rr = left == 8 ? 4 : std::min<int64_t>(VR, left);
        const float* ivr = iv ? iv + r : nullptr;
        switch (rr) {
          case 6: value_tm_rows<6>(a, st, r, k0, k1, o + r * a.c, k0 == 0, ivr); break;
          case 5: value_tm_rows<5>(a, st, r, k0, k1, o + r * a.c, k0 == 0, ivr); break;
          case 4: value_tm_rows<4>(a, st, r, k0, k1, o + r * a.c, k0 == 0, ivr); break;
          case 3: value_tm_rows<3>(a, st, r, k0, k1, o + r * a.c, k0 == 0, ivr); break;
          case 2: value_tm_rows<2>(a, st, r, k0, k1, o + r * a.c, k0 == 0, ivr); break;
          default: value_tm_rows<1>(a, st, r, k0, k1, o + r * a.c, k0 == 0, ivr);
        }
        r += rr;
      }
    }
  } else {
    const Vec i0 = Vec::loadu(inv), i1 = Vec::loadu(inv + V);
    for (int64_t c0 = 0; c0 < a.c; c0 += CMR) {
      const int64_t rc = std::min<int64_t>(CMR, a.c - c0);
      for (int64_t k0 = 0; k0 < n; k0 += KEYS) {
        const int64_t k1 = std::min(n, k0 + KEYS);
        for (int64_t i = 0; i < rc;) {  // CMR channels at a time; the rest in blocks of 8 (AVX-512), 4 and 1
          const int64_t left = rc - i, w = left >= CMR ? CMR : left >= 8 ? 8 : left >= 4 ? 4 : 1;
          float* acc = cm_acc + i * TQ;
          switch (w) {
            case CMR: value_cm<CMR>(a, st, c0 + i, k0, k1, acc, k0 == 0); break;
#if defined(CPU_CAPABILITY_AVX512)
            case 8: value_cm<8>(a, st, c0 + i, k0, k1, acc, k0 == 0); break;
#endif
            case 4: value_cm<4>(a, st, c0 + i, k0, k1, acc, k0 == 0); break;
            default: value_cm<1>(a, st, c0 + i, k0, k1, acc, k0 == 0);
          }
          i += w;
        }
      }
      for (int64_t i = 0; i < rc; ++i) {  // O^T rows: out[c0 + i, t0 : t0 + rows]
        float* dst = a.out + (c0 + i) * n + t0;
        Vec y0 = Vec::loadu(cm_acc + i * TQ) * i0, y1 = Vec::loadu(cm_acc + i * TQ + V) * i1;
        if (a.relu) y0 = at::vec::clamp_min(y0, Vec(0.f)), y1 = at::vec::clamp_min(y1, Vec(0.f));
        if (rows == TQ) {
          y0.store(dst);
          y1.store(dst + V);
        } else {
          alignas(64) float tmp[TQ];
          y0.store(tmp);
          y1.store(tmp + V);
          std::copy(tmp, tmp + rows, dst);
        }
      }
    }
  }
}

at::Tensor reuse_core(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& bias_opt, double scale, bool relu) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "reuse_core: expected q, k (B, Cq, N) and v (B, C, N)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "reuse_core: float32 tensors only");
  const int64_t B = v.size(0), c = v.size(1), n = v.size(2), cq = q.size(1);
  TORCH_CHECK(q.size(0) == B && k.size(0) == B && k.size(1) == cq && q.size(2) == n && k.size(2) == n,
              "reuse_core: q, k, v shapes do not match: ", q.sizes(), " ", k.sizes(), " ", v.sizes());
  at::Tensor bias;
  if (bias_opt.has_value() && bias_opt->defined()) {
    bias = bias_opt->to(at::kFloat);
    TORCH_CHECK(bias.dim() == 2 && bias.size(0) == n && bias.size(1) == n, "reuse_core: bias must be (N, N)");
  }
  const bool token_major = v.stride(1) == 1 && c > 1 && n > 1;
  at::Tensor out = token_major ? at::empty({B, n, c}, v.options()) : at::empty({B, c, n}, v.options());
  if (B == 0 || n == 0 || c == 0) return out;
  const int64_t tiles = (n + TQ - 1) / TQ;
  // one parallel loop over every (image, tile): with UniForm's 7 x 7 windows a call is many small images (N = 49,
  // two tiles each), and a loop, a map buffer and query buffers per image cost more than the image's own work
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // Small maps (UniForm's windows: N = 49, two tiles) read the bias transposed, a vector of queries per load, instead
  // of gathering it down its rows for every key of every tile: (N, tiles TQ) floats made once per call, zeros past
  // the last query. Large maps keep the gathers (a copy of an N x N bias would double its memory).
  at::Tensor bt;
  const int64_t ldt = tiles * TQ;
  if (bp && n * ldt <= kBiasCopyFloats) {
    bt = at::zeros({n, ldt}, q.options());
    bt.narrow(1, 0, n).copy_(bias.t());
  }
  const float* btp = bt.defined() ? bt.data_ptr<float>() : nullptr;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor sbuf = at::empty({n, TQ}, q.options());  // this thread's slice of the map, transposed
    std::vector<float> qt(cq * TQ), cm_acc(CMR * TQ);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tiles;
      Args a{qp + b * q.stride(0), q.stride(1), q.stride(2), kp + b * k.stride(0), k.stride(1), k.stride(2),
             vp + b * v.stride(0), v.stride(1), v.stride(2), bp, bp ? bias.stride(0) : 0, bp ? bias.stride(1) : 0,
             btp, ldt, n, cq, c, static_cast<float>(scale), token_major, relu, op + b * n * c};
      tile(a, (t % tiles) * TQ, sbuf.data_ptr<float>(), qt.data(), cm_acc.data());
    }
  });
  return out;
}

// How many threads at::parallel_for really uses here for `tasks` tasks (the tests check that the library was built
// with OpenMP: without it every tile runs on the calling thread).
int64_t parallel_width(int64_t tasks) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { seen |= uint64_t{1} << (at::get_thread_num() % 64); });
  return __builtin_popcountll(seen.load());
}

}  // namespace

TORCH_LIBRARY(uniform_vit, m) {
  m.def("reuse_core(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale, bool relu=False) -> Tensor");
  m.def("parallel_width(int tasks) -> int");
}

TORCH_LIBRARY_IMPL(uniform_vit, CPU, m) { m.impl("reuse_core", &reuse_core); }

TORCH_LIBRARY_IMPL(uniform_vit, CompositeExplicitAutograd, m) { m.impl("parallel_width", &parallel_width); }
