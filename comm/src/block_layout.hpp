// What every implementation of the block all-to-all (Communicator::all_to_all with layouts)
// shares: the check of the two layouts, and moving blocks between a layout and contiguous host
// memory (UCX packs through it where an algorithm needs contiguous blocks: 2DH).
#pragma once

#include <cstring>
#include <string>
#include <utility>

#include "tutel/comm/communicator.hpp"
#include "tutel/core/status.hpp"

namespace tutel::comm::detail {

// The most pieces a block may have (UCX spends a sequence number on each, of 2^24 − 1): as many
// as a layer may have experts, so the expert-parallel layer's piece per local expert always fits.
inline constexpr size_t kMaxPieces = size_t{1} << 20;

// Whether the `blocks`·pieces pieces of `layout` are disjoint, in one of the layouts the
// collective takes: block-major (each block's pieces in order, then the next block) or
// piece-major (piece j of every block, then piece j + 1).
inline bool pieces_disjoint(const BlockLayout& layout, int blocks) {
  const size_t b = layout.piece_bytes, p = layout.pieces, n = static_cast<size_t>(blocks);
  if (b == 0 || (n <= 1 && p <= 1)) return true;
  const bool pieces_apart = p <= 1 || layout.piece_stride >= b;
  const bool blocks_apart = n <= 1 || layout.block_stride >= b;
  const bool block_major =
      pieces_apart && (n <= 1 || (p - 1) * layout.piece_stride + b <= layout.block_stride);
  const bool piece_major =
      blocks_apart && (p <= 1 || (n - 1) * layout.block_stride + b <= layout.piece_stride);
  return block_major || piece_major;
}

// Every rank passes the same pieces and piece_bytes (the sizes its peers expect); this rank's
// two layouts must at least agree with each other, and each must keep its pieces apart.
inline Status check_block_layouts(const BlockLayout& send, const BlockLayout& recv, int blocks) {
  if (send.pieces < 1 || recv.pieces < 1 || send.pieces > kMaxPieces)
    return Status::InvalidArgument("all_to_all: a block needs 1 to " + std::to_string(kMaxPieces) +
                                   " pieces, not " + std::to_string(send.pieces));
  if (send.pieces != recv.pieces || send.piece_bytes != recv.piece_bytes)
    return Status::InvalidArgument(
        "all_to_all: the send blocks are " + std::to_string(send.pieces) + " piece(s) of " +
        std::to_string(send.piece_bytes) + " bytes but the receive blocks " +
        std::to_string(recv.pieces) + " of " + std::to_string(recv.piece_bytes) +
        "; a block arrives as it was sent: give both layouts the same pieces and piece_bytes");
  for (const auto& [layout, which] : {std::pair{&send, "send"}, std::pair{&recv, "receive"}})
    if (!pieces_disjoint(*layout, blocks))
      return Status::InvalidArgument(
          std::string("all_to_all: the ") + which + " layout's pieces overlap (piece_stride " +
          std::to_string(layout->piece_stride) + ", block_stride " +
          std::to_string(layout->block_stride) + " for pieces of " +
          std::to_string(layout->piece_bytes) +
          " bytes): lay the blocks out block-major or piece-major, each piece apart");
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
