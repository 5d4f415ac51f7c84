// Training-mode BatchNorm over channels-last maps in two CPU ops (uniform_vit/layers/cpu_kernels.py builds them;
// uniform_vit/layers/conv.py, BatchNorm2d, calls them where ATen's channels-last BatchNorm is slow).
//
//   batch_norm_train(x, w, b, running_mean, running_var, factor, eps) -> (y, mean, invstd)
//       normalises with this batch's statistics (mean, biased variance) and moves the running statistics in place
//       as nn.BatchNorm2d does: running = (1 - factor) running + factor batch, the variance unbiased (M / (M - 1))
//   batch_norm_train_backward(g, x, mean, invstd, w) -> (gx, gw, gb)
//   x, g: (B, C, H, W) float32 in channels-last memory, i.e. M = B*H*W rows of C; w, b, mean, invstd and the
//   running statistics: (C).
// batch_norm_train is differentiable in x, w and b through its own C++ autograd kernel (BatchNormTrainFunction
// below), which calls both ops through the dispatcher: with the running statistics moved in C++ too, a training
// BatchNorm costs one op call from Python. Done in Python (torch.autograd.Function and eight small tensor ops for the
// running statistics), the overhead was 0.25 ms a layer, more than ATen's whole forward + backward on uniform_t's
// late maps (2x2 and 4x4 tokens; benchmarks/RESULTS.md, section 3, session 37).
//
// Why: on an AVX2 Zen 3 ATen's channels-last BatchNorm (forward + backward) ran 4-8x slower than these ops at 4-24
// channels and 1.2-1.8x at 40, 72 and 120, wherever the channel count is not a multiple of 16 (uniform_t's first
// stem layer, 8 channels of 56x56 at batch 128: 33 ms against 6 ms, of a ~310 ms training step;
// benchmarks/RESULTS.md, section 3, session 19).
//
// Each pass walks the rows in chunks spread over the threads, vectorised over channels; sums are kept in float per
// chunk of ROWS rows and added into double per thread, so that a long column does not lose digits. Forward: the
// mean, then the variance around it (two passes, as exact as ATen's), then y = x * scale + shift. Backward: the
// sums of g and of g * (x - mean), then gx = g * k1 + x * k2 + k3 per channel.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();
constexpr int64_t ROWS = 256;  // rows per float partial sum

// For each chunk of rows, fn(row pointer offsets [r0, r1), acc) adds its float sums into acc (n_sums * C floats);
// returns the per-channel totals in double, n_sums * C of them.
template <typename Fn>
std::vector<double> column_sums(int64_t M, int64_t C, int n_sums, const Fn& fn) {
  const int64_t chunks = (M + ROWS - 1) / ROWS;
  const int T = at::get_num_threads();
  std::vector<double> per_thread(static_cast<size_t>(T) * n_sums * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    double* tot = per_thread.data() + static_cast<size_t>(at::get_thread_num()) * n_sums * C;
    std::vector<float> acc(n_sums * C);
    for (int64_t ch = begin; ch < end; ++ch) {
      std::fill(acc.begin(), acc.end(), 0.f);
      fn(ch * ROWS, std::min(M, (ch + 1) * ROWS), acc.data());
      for (int64_t i = 0; i < n_sums * C; ++i) tot[i] += acc[i];
    }
  });
  std::vector<double> out(n_sums * C, 0.0);
  for (int t = 0; t < T; ++t)
    for (int64_t i = 0; i < n_sums * C; ++i) out[i] += per_thread[static_cast<size_t>(t) * n_sums * C + i];
  return out;
}

// dst[c] (op)= f(src row) over channels, vectorised; the last C % V channels scalar
template <typename VecFn, typename ScalarFn>
inline void channels(int64_t C, const VecFn& vf, const ScalarFn& sf) {
  int64_t c = 0;
  for (; c + V <= C; c += V) vf(c);
  for (; c < C; ++c) sf(c);
}

void check_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kFloat && t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "batch_norm_train: ", name, " must be a float32 (B, C, H, W) map in channels-last memory");
}

at::Tensor channel_vector(const at::Tensor& t, int64_t C, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.scalar_type() == at::kFloat, "batch_norm_train: ", name,
              " must be float32 (", C, ")");
  return t.contiguous();
}

void check_running(const at::Tensor& t, int64_t C, const char* name) {  // written in place: no copies allowed
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "batch_norm_train: ", name, " must be a contiguous float32 (", C, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train(const at::Tensor& x, const at::Tensor& w_,
                                                                 const at::Tensor& b_, const at::Tensor& running_mean,
                                                                 const at::Tensor& running_var, double factor,
                                                                 double eps) {
  check_map(x, "x");
  const int64_t C = x.size(1), M = C ? x.numel() / C : 0;
  TORCH_CHECK(M > 1, "batch_norm_train: needs more than one value per channel, got ", x.sizes());
  TORCH_CHECK(eps >= 0, "batch_norm_train: eps must not be negative");
  TORCH_CHECK(factor >= 0 && factor <= 1, "batch_norm_train: the running statistics' factor must be in [0, 1], got ",
              factor);
  const at::Tensor w = channel_vector(w_, C, "weight"), b = channel_vector(b_, C, "bias");
  check_running(running_mean, C, "running_mean");
  check_running(running_var, C, "running_var");
  const float* xp = x.data_ptr<float>();
  const std::vector<double> s = column_sums(M, C, 1, [&](int64_t r0, int64_t r1, float* acc) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * C;
      channels(C, [&](int64_t c) { (Vec::loadu(acc + c) + Vec::loadu(row + c)).store(acc + c); },
               [&](int64_t c) { acc[c] += row[c]; });
    }
  });
  at::Tensor mean = at::empty({C}, x.options()), invstd = at::empty({C}, x.options());
  float* mp = mean.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) mp[c] = static_cast<float>(s[c] / M);
  const std::vector<double> q = column_sums(M, C, 1, [&](int64_t r0, int64_t r1, float* acc) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * C;
      channels(C, [&](int64_t c) {
        const Vec d = Vec::loadu(row + c) - Vec::loadu(mp + c);
        at::vec::fmadd(d, d, Vec::loadu(acc + c)).store(acc + c);
      }, [&](int64_t c) { acc[c] += (row[c] - mp[c]) * (row[c] - mp[c]); });
    }
  });
  float* ip = invstd.data_ptr<float>();
  std::vector<float> scale(C), shift(C);
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* rm = running_mean.data_ptr<float>();
  float* rv = running_var.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    ip[c] = static_cast<float>(1.0 / std::sqrt(q[c] / M + eps));
    scale[c] = wp[c] * ip[c];
    shift[c] = bp[c] - mp[c] * scale[c];
    rm[c] = static_cast<float>((1 - factor) * rm[c] + factor * (s[c] / M));
    rv[c] = static_cast<float>((1 - factor) * rv[c] + factor * (q[c] / (M - 1)));
  }
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      channels(C, [&](int64_t c) {
        at::vec::fmadd(Vec::loadu(xp + r * C + c), Vec::loadu(scale.data() + c), Vec::loadu(shift.data() + c))
            .store(yp + r * C + c);
      }, [&](int64_t c) { yp[r * C + c] = xp[r * C + c] * scale[c] + shift[c]; });
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_backward(const at::Tensor& g_, const at::Tensor& x,
                                                                         const at::Tensor& mean_,
                                                                         const at::Tensor& invstd_,
                                                                         const at::Tensor& w_) {
  check_map(x, "x");
  TORCH_CHECK(g_.sizes() == x.sizes(), "batch_norm_train_backward: g ", g_.sizes(), " and x ", x.sizes(), " differ");
  const at::Tensor g = g_.contiguous(at::MemoryFormat::ChannelsLast);
  check_map(g, "g");
  const int64_t C = x.size(1), M = C ? x.numel() / C : 0;
  TORCH_CHECK(M > 0, "batch_norm_train_backward: needs at least one value per channel, got ", x.sizes());
  const at::Tensor mean = channel_vector(mean_, C, "mean"), invstd = channel_vector(invstd_, C, "invstd");
  const at::Tensor w = channel_vector(w_, C, "weight");
  const float *xp = x.data_ptr<float>(), *gp = g.data_ptr<float>(), *mp = mean.data_ptr<float>();
  const float *ip = invstd.data_ptr<float>(), *wp = w.data_ptr<float>();
  // sums of g (first C) and of g * (x - mean) (next C)
  const std::vector<double> s = column_sums(M, C, 2, [&](int64_t r0, int64_t r1, float* acc) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *xr = xp + r * C, *gr = gp + r * C;
      channels(C, [&](int64_t c) {
        const Vec gv = Vec::loadu(gr + c);
        (Vec::loadu(acc + c) + gv).store(acc + c);
        at::vec::fmadd(gv, Vec::loadu(xr + c) - Vec::loadu(mp + c), Vec::loadu(acc + C + c)).store(acc + C + c);
      }, [&](int64_t c) {
        acc[c] += gr[c];
        acc[C + c] += gr[c] * (xr[c] - mp[c]);
      });
    }
  });
  at::Tensor gw = at::empty({C}, x.options()), gb = at::empty({C}, x.options());
  std::vector<float> k1(C), k2(C), k3(C);
  for (int64_t c = 0; c < C; ++c) {
    const double inv = ip[c], sg = s[c], sgx = s[C + c];
    gb.data_ptr<float>()[c] = static_cast<float>(sg);
    gw.data_ptr<float>()[c] = static_cast<float>(sgx * inv);
    // gx = w inv (g - sg / M - (x - mean) inv^2 sgx / M) = g k1 + x k2 + k3
    const double a = wp[c] * inv, bcoef = -a * inv * inv * sgx / M;
    k1[c] = static_cast<float>(a);
    k2[c] = static_cast<float>(bcoef);
    k3[c] = static_cast<float>(-a * sg / M - bcoef * mp[c]);
  }
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  float* op = gx.data_ptr<float>();
  at::parallel_for(0, M, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      channels(C, [&](int64_t c) {
        const Vec t = at::vec::fmadd(Vec::loadu(xp + r * C + c), Vec::loadu(k2.data() + c), Vec::loadu(k3.data() + c));
        at::vec::fmadd(Vec::loadu(gp + r * C + c), Vec::loadu(k1.data() + c), t).store(op + r * C + c);
      }, [&](int64_t c) { op[r * C + c] = gp[r * C + c] * k1[c] + xp[r * C + c] * k2[c] + k3[c]; });
  });
  return {gx, gw, gb};
}

// Autograd for batch_norm_train in C++: both ops run through the dispatcher (so profilers, dispatch modes and the
// flop counter see them), below autograd; mean and invstd are outputs without gradients.
class BatchNormTrainFunction : public torch::autograd::Function<BatchNormTrainFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& w, const at::Tensor& b,
                                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                                double factor, double eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("uniform_vit::batch_norm_train", "")
                         .typed<decltype(batch_norm_train)>();
    at::AutoDispatchBelowADInplaceOrView below;  // to the CPU kernel, not back into this one
    auto [y, mean, invstd] = op.call(x, w, b, running_mean, running_var, factor, eps);
    ctx->save_for_backward({x, mean, invstd, w});
    ctx->mark_non_differentiable({mean, invstd});
    return {y, mean, invstd};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("uniform_vit::batch_norm_train_backward", "")
                         .typed<decltype(batch_norm_train_backward)>();
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                                     at::Tensor(), at::Tensor()};
    auto [gx, gw, gb] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3]);
    return {gx, gw, gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_autograd(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& running_mean,
    const at::Tensor& running_var, double factor, double eps) {
  auto out = BatchNormTrainFunction::apply(x, w, b, running_mean, running_var, factor, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(uniform_vit, m) {
  m.def("batch_norm_train(Tensor x, Tensor w, Tensor b, Tensor(a!) running_mean, Tensor(b!) running_var, "
        "float factor, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_train_backward(Tensor g, Tensor x, Tensor mean, Tensor invstd, Tensor w) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(uniform_vit, CPU, m) {
  m.impl("batch_norm_train", &batch_norm_train);
  m.impl("batch_norm_train_backward", &batch_norm_train_backward);
}

TORCH_LIBRARY_IMPL(uniform_vit, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
}
