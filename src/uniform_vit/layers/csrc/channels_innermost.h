// Maps whose channels lie next to each other in memory, for the ops that read them in place (depthwise_conv.cpp,
// depthwise_grad_weight.cpp). The Python twin is uniform_vit.layers.conv.channels_innermost.
#pragma once

#include <ATen/ATen.h>

// A (B, C, H, W) map in channels-last memory, or a channel slice of one (attention's queries cut from one conv's
// output): channel stride 1, pixels, rows and images each at least as far apart as what they hold.
inline bool channels_innermost(const at::Tensor& t) {
  const int64_t C = t.size(1), H = t.size(2), W = t.size(3);
  return t.stride(1) == 1 && t.stride(3) >= C && t.stride(2) >= W * t.stride(3) && t.stride(0) >= H * t.stride(2);
}

// t itself when its channels are innermost, else a channels-last copy
inline at::Tensor channels_innermost_map(const at::Tensor& t) {
  return channels_innermost(t) ? t : t.contiguous(at::MemoryFormat::ChannelsLast);
}

// The ops on token rows (pointwise_conv.cpp, residual_ffn.cpp) take either an (M, C) matrix or a (B, C, H, W) map,
// whose channels-last memory is the same (B*H*W, C) matrix; a map is returned as a map. Taking the map itself saves
// the caller the permute, reshape and view around every call, which a torch.jit.trace records with the size
// arithmetic of each (about 20 graph nodes a call: 10 % of a traced uniform_t's nodes, session 31).
// rows: the token matrix's memory (a 2-d matrix made contiguous, a map made channels-last); its row count M = numel / C.
inline at::Tensor token_rows(const at::Tensor& x) {
  return x.dim() == 4 ? x.contiguous(at::MemoryFormat::ChannelsLast) : x.contiguous();
}

// an uninitialised result of n columns per token, shaped like x: (M, n), or (B, n, H, W) in channels-last memory
inline at::Tensor token_rows_like(const at::Tensor& x, int64_t n) {
  if (x.dim() == 4)
    return at::empty({x.size(0), n, x.size(2), x.size(3)}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  return at::empty({x.size(0), n}, x.options());
}
