// The 2DH index algebra, checked without any transport: W simulated ranks run the four steps of
// src/two_dh.hpp with plain copies and must end with the linear all-to-all's layout.
#include "two_dh.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "group_layout.hpp"
#include "reduce.hpp"
#include "tutel/comm/communicator.hpp"

namespace tutel::comm {
namespace {

using Buffer = std::vector<uint8_t>;

uint8_t byte_of(int src, int dst, size_t i) { return static_cast<uint8_t>(src * 31 + dst * 7 + i); }

std::vector<Buffer> simulate_2dh(const std::vector<Buffer>& send, int local_size, size_t c) {
  const int w = static_cast<int>(send.size());
  std::vector<Buffer> t(w, Buffer(w * c)), u(w, Buffer(w * c)), recv(w, Buffer(w * c));
  for (int r = 0; r < w; ++r) {
    const detail::TwoDH g(r, w, local_size);
    detail::transpose_chunks(t[r].data(), send[r].data(), g.nodes, g.local_size, c);
  }
  for (int r = 0; r < w; ++r) {  // phase 1: r receives block j from phase1_peer(j)
    const detail::TwoDH g(r, w, local_size);
    const size_t b = g.phase1_bytes(c);
    for (int j = 0; j < g.local_size; ++j) {
      // The peer sends us its block g.local: the one addressed to our local index.
      std::copy_n(t[g.phase1_peer(j)].data() + g.local * b, b, u[r].data() + j * b);
    }
  }
  for (int r = 0; r < w; ++r) {
    const detail::TwoDH g(r, w, local_size);
    detail::transpose_chunks(t[r].data(), u[r].data(), g.local_size, g.nodes, c);  // V
  }
  for (int r = 0; r < w; ++r) {  // phase 2: r receives block m from phase2_peer(m)
    const detail::TwoDH g(r, w, local_size);
    const size_t b = g.phase2_bytes(c);
    for (int m = 0; m < g.nodes; ++m) {
      // The peer sends us its V block g.node.
      std::copy_n(t[g.phase2_peer(m)].data() + g.node * b, b, recv[r].data() + m * b);
    }
  }
  return recv;
}

TEST(TwoDH, EqualsLinearForEveryShape) {
  for (int w : {1, 2, 4, 6, 8, 12}) {
    for (int l = 1; l <= w; ++l) {
      if (w % l != 0) continue;
      for (size_t c : {size_t{1}, size_t{3}, size_t{16}}) {
        std::vector<Buffer> send(w, Buffer(w * c));
        for (int s = 0; s < w; ++s)
          for (int d = 0; d < w; ++d)
            for (size_t i = 0; i < c; ++i) send[s][d * c + i] = byte_of(s, d, i);
        const auto recv = simulate_2dh(send, l, c);
        for (int d = 0; d < w; ++d)
          for (int s = 0; s < w; ++s)
            for (size_t i = 0; i < c; ++i)
              ASSERT_EQ(recv[d][s * c + i], byte_of(s, d, i))
                  << "W=" << w << " L=" << l << " c=" << c << " dst " << d << " src " << s;
      }
    }
  }
}

TEST(TwoDH, PeersAndSizes) {
  const detail::TwoDH g(/*rank=*/5, /*size=*/8, /*local_size=*/2);  // node 2, local 1
  EXPECT_EQ(g.nodes, 4);
  EXPECT_EQ(g.node, 2);
  EXPECT_EQ(g.local, 1);
  EXPECT_EQ(g.phase1_peer(0), 4);
  EXPECT_EQ(g.phase1_peer(1), 5);
  EXPECT_EQ(g.phase2_peer(0), 1);
  EXPECT_EQ(g.phase2_peer(3), 7);
  EXPECT_EQ(g.phase1_bytes(10), 40u);  // N chunks to each local peer
  EXPECT_EQ(g.phase2_bytes(10), 20u);  // L chunks to each remote peer
}

TEST(TwoDH, TransposeChunks) {
  // [2][3] chunks of 2 bytes -> [3][2]
  const std::vector<uint8_t> src = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5};
  std::vector<uint8_t> dst(12);
  detail::transpose_chunks(dst.data(), src.data(), 2, 3, 2);
  EXPECT_EQ(dst, (std::vector<uint8_t>{0, 0, 3, 3, 1, 1, 4, 4, 2, 2, 5, 5}));
}

TEST(GroupLayout, DerivesLocalSize) {
  // World local_size 2: nodes {0,1} {2,3} {4,5} {6,7}.
  EXPECT_EQ(detail::derive_local_size({0, 1, 2, 3}, 2), 2);
  EXPECT_EQ(detail::derive_local_size({0, 2, 4, 6}, 2), 1);
  EXPECT_EQ(detail::derive_local_size({0, 1, 2}, 2), 1);           // unequal runs
  EXPECT_EQ(detail::derive_local_size({0, 1, 4, 5, 2, 3}, 2), 2);  // node order may vary
  EXPECT_EQ(detail::derive_local_size({0, 2, 1, 3}, 2), 1);        // a node twice
  EXPECT_EQ(detail::derive_local_size({0, 1, 2, 3, 4, 5, 6, 7}, 4), 4);
  EXPECT_EQ(detail::derive_local_size({0, 2, 4, 6}, 4), 2);
}

TEST(Reduce, RankOrderAndAliasing) {
  std::vector<float> a = {1, 5, -2}, b = {3, -1, 7}, c = {0.5f, 2, 2};
  const float* blocks[] = {a.data(), b.data(), c.data()};
  std::vector<float> out(3);
  detail::reduce_in_rank_order(out.data(), blocks, 3, 3, ReduceOp::kSum);
  EXPECT_EQ(out, (std::vector<float>{4.5f, 6, 7}));
  detail::reduce_in_rank_order(a.data(), blocks, 3, 3, ReduceOp::kMax);  // out aliases block 0
  EXPECT_EQ(a, (std::vector<float>{3, 5, 7}));
  std::vector<int64_t> big(5000), other(5000);
  for (int i = 0; i < 5000; ++i) big[i] = i, other[i] = 2 * i;
  const int64_t* iblocks[] = {big.data(), other.data()};
  detail::reduce_in_rank_order(big.data(), iblocks, 2, 5000, ReduceOp::kSum);
  EXPECT_EQ(big[4999], 3 * 4999);
}

TEST(CommunicatorNames, AlgoRoundTrip) {
  EXPECT_EQ(parse_all_to_all_algo("2DH"), AllToAllAlgo::k2DH);
  EXPECT_EQ(parse_all_to_all_algo("linear"), AllToAllAlgo::kLinear);
  EXPECT_FALSE(parse_all_to_all_algo("ring").has_value());
  EXPECT_EQ(to_string(AllToAllAlgo::k2DH), "2dh");
  EXPECT_EQ(to_string(ReduceOp::kMax), "max");
}

}  // namespace
}  // namespace tutel::comm
