// Host reductions in rank order, so every rank that reduces the same blocks gets the same bits.
#pragma once

#include <algorithm>
#include <cstddef>

#include "tutel/comm/communicator.hpp"

namespace tutel::comm::detail {

// out[i] = blocks[0][i] op blocks[1][i] op ... op blocks[n-1][i]. `out` may be one of the blocks.
template <typename T>
void reduce_in_rank_order(T* out, const T* const* blocks, int n, size_t count, ReduceOp op) {
  constexpr size_t kTile = 1024;
  T acc[kTile];
  for (size_t begin = 0; begin < count; begin += kTile) {
    const size_t len = std::min(kTile, count - begin);
    std::copy_n(blocks[0] + begin, len, acc);
    for (int b = 1; b < n; ++b) {
      const T* x = blocks[b] + begin;
      if (op == ReduceOp::kSum) {
        for (size_t i = 0; i < len; ++i) acc[i] += x[i];
      } else {
        for (size_t i = 0; i < len; ++i) acc[i] = x[i] > acc[i] ? x[i] : acc[i];
      }
    }
    std::copy_n(acc, len, out + begin);
  }
}

}  // namespace tutel::comm::detail
