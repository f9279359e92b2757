// The index algebra of the 2DH (two-dimensional hierarchical) all-to-all, written once and
// used by every implementation (UCX: memcpy; NCCL: cudaMemcpy2DAsync).
//
// W ranks, L per node, N = W / L nodes; rank r = n·L + l is local index l on node n. Rank r's
// send buffer S_r holds W chunks of c bytes, S_r[d] for destination d, and the result must be
// the linear all-to-all's: R_d[s] = S_s[d].
//
//   0. stride copy   T[j][m] = S[m·L + j]              [N][L] chunks -> [L][N]
//   1. intra-node    (n,l) sends T[j] (N chunks) to (n,j) and receives U[j] from (n,j), so
//                    U[j][m] = T_(n,j)[l][m] = S_(n,j)[m·L + l]: what rank (n,j) sends to the
//                    ranks with local index l, on every node m.
//   2. stride copy   V[m][j] = U[j][m]                 [L][N] chunks -> [N][L]
//   3. inter-node    (n,l) sends V[m] (L chunks) to (m,l) and receives from (m,l) into
//                    R[m·L .. m·L + L), since
//                    R_(n,l)[m·L + j] = V_(m,l)[n][j] = U_(m,l)[j][n] = S_(m,j)[n·L + l].  ✓
//
// Step 3 lands in the final layout. The cost over linear is two stride copies and 2·W·c bytes
// of scratch (T, reused for V, and U); the gain is that a rank sends N - 1 inter-node
// messages of L·c bytes instead of W - L messages of c bytes.
#pragma once

#include <cstddef>
#include <cstring>

namespace tutel::comm::detail {

struct TwoDH {
  int nodes;       // N
  int local_size;  // L
  int node;        // n of this rank
  int local;       // l of this rank

  TwoDH(int rank, int size, int local_size_)
      : nodes(size / local_size_),
        local_size(local_size_),
        node(rank / local_size_),
        local(rank % local_size_) {}

  // Phase 1: block j (at j·phase1_bytes in T and U) goes to / comes from this rank.
  int phase1_peer(int j) const { return node * local_size + j; }
  size_t phase1_bytes(size_t chunk) const { return static_cast<size_t>(nodes) * chunk; }
  // Phase 2: block m (at m·phase2_bytes in V and R) goes to / comes from this rank.
  int phase2_peer(int m) const { return m * local_size + local; }
  size_t phase2_bytes(size_t chunk) const { return static_cast<size_t>(local_size) * chunk; }
};

// dst[j][i] = src[i][j] for a [rows][cols] matrix of `chunk`-byte elements (host memory).
inline void transpose_chunks(void* dst, const void* src, int rows, int cols, size_t chunk) {
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < rows; ++i)
      std::memcpy(d + (static_cast<size_t>(j) * rows + i) * chunk,
                  s + (static_cast<size_t>(i) * cols + j) * chunk, chunk);
}

}  // namespace tutel::comm::detail
