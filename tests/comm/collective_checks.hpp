// The checks every rank of a test group runs: each collective against a locally computed
// reference, with exact comparison (the float data are integers, so sums are exact).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm_test_util.hpp"
#include "tutel/comm/communicator.hpp"

namespace tutel::comm::testing {

// All-to-all of `chunk` bytes; reports the first wrong byte.
inline void check_all_to_all(Communicator& comm, size_t chunk, AllToAllAlgo algo, uint32_t seed,
                             Failures& f) {
  const int n = comm.size(), me = comm.rank();
  std::vector<uint8_t> send(n * chunk), recv(n * chunk, 0xEE);
  for (int d = 0; d < n; ++d)
    for (size_t i = 0; i < chunk; ++i) send[d * chunk + i] = pattern(me, d, i, seed);
  Status s = comm.all_to_all(send.data(), recv.data(), chunk, algo);
  if (!s.ok()) {
    f.add("all_to_all ", to_string(algo), " chunk ", chunk, ": ", s.to_string());
    return;
  }
  for (int src = 0; src < n; ++src)
    for (size_t i = 0; i < chunk; ++i)
      if (recv[src * chunk + i] != pattern(src, me, i, seed)) {
        f.add("all_to_all ", to_string(algo), " chunk ", chunk, ": rank ", me, " byte ", i,
              " of the chunk from rank ", src, " is wrong");
        return;
      }
}

// The layouts of a block all-to-all's check: strided piece-major (piece j of every block, then
// piece j + 1: the expert side of the expert-parallel layer), strided block-major with room
// between the pieces (a chunk of the token side), and contiguous blocks.
enum class BlockShape { kPieceMajor, kBlockMajor, kContiguous };

inline BlockLayout block_layout(BlockShape shape, size_t pieces, size_t piece_bytes, int n,
                                size_t gap) {
  switch (shape) {
    case BlockShape::kPieceMajor:
      return {piece_bytes, pieces, n * (piece_bytes + gap), piece_bytes + gap};
    case BlockShape::kBlockMajor:
      return {piece_bytes, pieces, piece_bytes + 5 + gap, pieces * (piece_bytes + 5 + gap) + 7};
    case BlockShape::kContiguous:
      return {piece_bytes, pieces, piece_bytes, pieces * piece_bytes};
  }
  return {};
}

// All-to-all of blocks of `pieces` pieces of `piece_bytes` from one layout to another, the gaps
// different on every rank. Every received piece must hold what its sender put in the same
// piece, and every byte between the pieces must be left as it was.
inline void check_all_to_all_blocks(Communicator& comm, size_t pieces, size_t piece_bytes,
                                    AllToAllAlgo algo, BlockShape from_shape, BlockShape to_shape,
                                    uint32_t seed, Failures& f) {
  const int n = comm.size(), me = comm.rank();
  const size_t gap = 1 + static_cast<size_t>(me % 3);
  const BlockLayout from = block_layout(from_shape, pieces, piece_bytes, n, gap);
  const BlockLayout to = block_layout(to_shape, pieces, piece_bytes, n, gap + 1);
  std::vector<uint8_t> send(from.extent(n) + 3, 0xAB), recv(to.extent(n) + 3, 0xEE);
  std::vector<bool> written(recv.size(), false);
  for (int d = 0; d < n; ++d)
    for (size_t j = 0; j < pieces; ++j)
      for (size_t b = 0; b < piece_bytes; ++b)
        send[d * from.block_stride + j * from.piece_stride + b] =
            pattern(me, d, j * piece_bytes + b, seed);
  const std::string what = "all_to_all of " + std::to_string(pieces) + " pieces of " +
                           std::to_string(piece_bytes) + " bytes (" + std::string(to_string(algo)) +
                           ", layouts " + std::to_string(int(from_shape)) + " to " +
                           std::to_string(int(to_shape)) + "): ";
  Status s = comm.all_to_all(send.data(), from, recv.data(), to, algo);
  if (!s.ok()) return f.add(what, s.to_string());
  for (int src = 0; src < n; ++src)
    for (size_t j = 0; j < pieces; ++j)
      for (size_t b = 0; b < piece_bytes; ++b) {
        const size_t at = src * to.block_stride + j * to.piece_stride + b;
        written[at] = true;
        if (recv[at] != pattern(src, me, j * piece_bytes + b, seed))
          return f.add(what, "rank ", me, " byte ", b, " of piece ", j, " from rank ", src,
                       " is wrong");
      }
  for (size_t at = 0; at < recv.size(); ++at)
    if (!written[at] && recv[at] != 0xEE)
      return f.add(what, "rank ", me, " byte ", at, " between the pieces was overwritten");
}

// Every pair of layouts the expert-parallel layer uses, and one strided piece per block, with
// pieces of `piece_bytes`, by `algo`.
inline void check_block_layouts(Communicator& comm, size_t piece_bytes, AllToAllAlgo algo,
                                uint32_t& seed, Failures& f) {
  using enum BlockShape;
  const std::pair<BlockShape, BlockShape> pairs[] = {
      {kBlockMajor, kPieceMajor}, {kPieceMajor, kBlockMajor}, {kContiguous, kPieceMajor},
      {kPieceMajor, kContiguous}};
  for (const auto& [from, to] : pairs)
    check_all_to_all_blocks(comm, 3, piece_bytes, algo, from, to, seed++, f);
  check_all_to_all_blocks(comm, 1, piece_bytes, algo, kBlockMajor, kPieceMajor, seed++, f);
}

inline void check_all_gather(Communicator& comm, size_t bytes, uint32_t seed, Failures& f) {
  const int n = comm.size(), me = comm.rank();
  std::vector<uint8_t> send(bytes), recv(n * bytes, 0xEE);
  for (size_t i = 0; i < bytes; ++i) send[i] = pattern(me, -1, i, seed);
  Status s = comm.all_gather(send.data(), recv.data(), bytes);
  if (!s.ok()) return f.add("all_gather ", bytes, ": ", s.to_string());
  for (int src = 0; src < n; ++src)
    for (size_t i = 0; i < bytes; ++i)
      if (recv[src * bytes + i] != pattern(src, -1, i, seed))
        return f.add("all_gather ", bytes, ": byte ", i, " of rank ", src, " is wrong");
}

// Rank r's element i of block d: small integers, so float sums are exact.
inline float rs_value(int r, int d, size_t i) {
  return static_cast<float>((r * 37 + d * 11 + static_cast<int>(i % 101)) % 1000 - 300);
}

inline void check_reduce_scatter(Communicator& comm, size_t count, ReduceOp op, Failures& f) {
  const int n = comm.size(), me = comm.rank();
  std::vector<float> send(n * count), recv(count, -1.0f);
  for (int d = 0; d < n; ++d)
    for (size_t i = 0; i < count; ++i) send[d * count + i] = rs_value(me, d, i);
  Status s = comm.reduce_scatter(send.data(), recv.data(), count, op);
  if (!s.ok()) return f.add("reduce_scatter ", to_string(op), ": ", s.to_string());
  for (size_t i = 0; i < count; ++i) {
    float expect = rs_value(0, me, i);
    for (int r = 1; r < n; ++r)
      expect =
          op == ReduceOp::kSum ? expect + rs_value(r, me, i) : std::max(expect, rs_value(r, me, i));
    if (recv[i] != expect)
      return f.add("reduce_scatter ", to_string(op), " count ", count, ": element ", i, " is ",
                   recv[i], ", expected ", expect);
  }
}

template <typename T>
void check_all_reduce(Communicator& comm, size_t count, ReduceOp op, Failures& f) {
  const int n = comm.size(), me = comm.rank();
  auto value = [](int r, size_t i) {
    return static_cast<T>((r * 53 + static_cast<int64_t>(i) * 7) % 2001 - 1000);
  };
  std::vector<T> data(count);
  for (size_t i = 0; i < count; ++i) data[i] = value(me, i);
  Status s = comm.all_reduce(data.data(), count, op);
  if (!s.ok()) return f.add("all_reduce ", to_string(op), " count ", count, ": ", s.to_string());
  for (size_t i = 0; i < count; ++i) {
    T expect = value(0, i);
    for (int r = 1; r < n; ++r)
      expect = op == ReduceOp::kSum ? expect + value(r, i) : std::max(expect, value(r, i));
    if (data[i] != expect)
      return f.add("all_reduce ", to_string(op), " count ", count, ": element ", i, " is ", data[i],
                   ", expected ", expect);
  }
}

// Everything but split, over `chunks` for the all-to-alls.
inline std::string check_collectives(Communicator& comm, const std::vector<size_t>& chunks) {
  Failures f;
  uint32_t seed = 1;
  for (size_t chunk : chunks) {
    check_all_to_all(comm, chunk, AllToAllAlgo::kLinear, seed++, f);
    if (comm.size() % comm.local_size() == 0)
      check_all_to_all(comm, chunk, AllToAllAlgo::k2DH, seed++, f);
    // Pieces of half a chunk: past the peer-memory threshold where the chunk is.
    const size_t piece = std::max<size_t>(1, chunk / 2);
    check_block_layouts(comm, piece, AllToAllAlgo::kLinear, seed, f);
    if (comm.size() % comm.local_size() == 0)
      check_block_layouts(comm, piece, AllToAllAlgo::k2DH, seed, f);
  }
  for (size_t bytes : {size_t{1}, size_t{1000}, size_t{200000}})
    check_all_gather(comm, bytes, seed++, f);
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
    check_reduce_scatter(comm, 1, op, f);
    check_reduce_scatter(comm, 3000, op, f);
    for (size_t count : {size_t{1}, size_t{5}, size_t{4099}, size_t{100003}}) {
      check_all_reduce<float>(comm, count, op, f);
      check_all_reduce<int64_t>(comm, count, op, f);
    }
  }
  for (int i = 0; i < 3; ++i)
    if (Status s = comm.barrier(); !s.ok()) f.add("barrier: ", s.to_string());
  return f.text();
}

// Splits into even and odd ranks and runs collectives in each half.
inline std::string check_split_even_odd(Communicator& comm) {
  Failures f;
  const int me = comm.rank(), n = comm.size();
  auto sub = comm.split(me % 2, me);
  if (!sub.ok()) return "split: " + sub.status().to_string();
  Communicator& g = **sub;
  const int expect_size = (n + 1 - me % 2) / 2;
  if (g.rank() != me / 2 || g.size() != expect_size)
    f.add("split: rank ", me, " got group rank ", g.rank(), " of ", g.size(), ", expected ", me / 2,
          " of ", expect_size);
  for (size_t chunk : {size_t{12}, size_t{4096}}) {
    check_all_to_all(g, chunk, AllToAllAlgo::kLinear, 100 + me % 2, f);
    if (g.size() % g.local_size() == 0)
      check_all_to_all(g, chunk, AllToAllAlgo::k2DH, 200 + me % 2, f);
  }
  check_all_reduce<float>(g, 777, ReduceOp::kSum, f);
  check_all_reduce<int64_t>(g, 3, ReduceOp::kMax, f);
  if (Status s = g.barrier(); !s.ok()) f.add("barrier in sub-group: ", s.to_string());
  // A rank that passes kNoColor gets no communicator, the others a group without it.
  auto partial = comm.split(me == 0 ? kNoColor : 0, -me);
  if (!partial.ok()) {
    f.add("split with kNoColor: ", partial.status().to_string());
  } else if (me == 0) {
    if (*partial) f.add("split: kNoColor returned a communicator");
  } else if (!*partial) {
    f.add("split: rank ", me, " got no communicator");
  } else {
    Communicator& p = **partial;
    if (p.size() != n - 1 || p.rank() != n - 1 - me)  // ordered by key = -rank
      f.add("split by -rank: rank ", me, " got ", p.rank(), " of ", p.size());
    check_all_to_all(p, 100, AllToAllAlgo::kLinear, 300, f);
  }
  if (Status s = comm.barrier(); !s.ok()) f.add("barrier after split: ", s.to_string());
  return f.text();
}

// Two groups over the same ranks (one in reverse order) run collectives at the same time from
// two threads; each checks contents seeded per group, so any cross-talk shows.
inline std::string check_concurrent_groups(Communicator& comm, int rounds) {
  Failures f;
  const int me = comm.rank(), n = comm.size();
  auto forward = comm.split(0, me);
  auto reverse = comm.split(0, n - me);
  if (!forward.ok() || !reverse.ok()) return "split for concurrency failed";
  if ((*reverse)->rank() != n - 1 - me) f.add("reverse group rank ", (*reverse)->rank());
  Failures f1, f2;
  auto work = [rounds](Communicator& g, uint32_t base, Failures& out) {
    for (int k = 0; k < rounds && out.ok(); ++k) {
      check_all_to_all(g, 1000 + 37 * static_cast<size_t>(k % 5), AllToAllAlgo::kLinear,
                       base + static_cast<uint32_t>(k), out);
      check_all_gather(g, 64, base + 5000 + static_cast<uint32_t>(k), out);
      check_all_reduce<int64_t>(g, 7, ReduceOp::kSum, out);
    }
  };
  std::thread t([&] { work(**forward, 1000, f1); });
  work(**reverse, 9000, f2);
  t.join();
  f.merge("forward group: ", f1.text());
  f.merge("reverse group: ", f2.text());
  if (Status s = comm.barrier(); !s.ok()) f.add("barrier after concurrency: ", s.to_string());
  return f.text();
}

}  // namespace tutel::comm::testing
