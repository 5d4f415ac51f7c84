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
