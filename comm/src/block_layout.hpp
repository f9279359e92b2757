// What every implementation of the block all-to-all (Communicator::all_to_all with layouts)
// shares: the check of the two layouts, and moving blocks between a layout and contiguous host
// memory (UCX packs through it where an algorithm needs contiguous blocks: 2DH).
#pragma once

#include <cstring>
#include <string>

#include "tutel/comm/communicator.hpp"
#include "tutel/core/status.hpp"

namespace tutel::comm::detail {

// Every rank passes the same pieces and piece_bytes (the sizes its peers expect); this rank's
// two layouts must at least agree with each other, and a block of several pieces must not lay
// a received piece over the next one.
inline Status check_block_layouts(const BlockLayout& send, const BlockLayout& recv) {
  if (send.pieces < 1 || recv.pieces < 1)
    return Status::InvalidArgument("all_to_all: a block needs at least one piece");
  if (send.pieces != recv.pieces || send.piece_bytes != recv.piece_bytes)
    return Status::InvalidArgument(
        "all_to_all: the send blocks are " + std::to_string(send.pieces) + " piece(s) of " +
        std::to_string(send.piece_bytes) + " bytes but the receive blocks " +
        std::to_string(recv.pieces) + " of " + std::to_string(recv.piece_bytes) +
        "; a block arrives as it was sent: give both layouts the same pieces and piece_bytes");
  if (recv.pieces > 1 && recv.piece_stride < recv.piece_bytes)
    return Status::InvalidArgument("all_to_all: the receive layout's pieces overlap (piece_stride " +
                                   std::to_string(recv.piece_stride) + " < piece_bytes " +
                                   std::to_string(recv.piece_bytes) + ")");
  return Status::OK();
}

// Host memory: block i, piece j of `src` (laid out as `from`) to the same piece of `dst` (as
// `to`), for `blocks` blocks.
inline void copy_blocks(void* dst, const BlockLayout& to, const void* src, const BlockLayout& from,
                        int blocks) {
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  for (int i = 0; i < blocks; ++i)
    for (size_t j = 0; j < from.pieces; ++j)
      std::memcpy(d + i * to.block_stride + j * to.piece_stride,
                  s + i * from.block_stride + j * from.piece_stride, from.piece_bytes);
}

}  // namespace tutel::comm::detail
