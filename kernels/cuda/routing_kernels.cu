// Routing on the GPU: locations (the slot of every (token, choice) in its expert's queue) and
// the slot map. The only file of the backend that includes cub.
//
// Locations are a stable counting problem over the sequence of assignments in routing order:
// position q = j·S + p holds (token order[p], choice j), so every choice-0 assignment precedes
// every choice-1 one. Three passes over fixed chunks of kChunk positions:
//   1. histogram per chunk and expert;
//   2. per expert, an exclusive scan over chunks (chunk order), giving each chunk's base slot
//      and the expert's total count;
//   3. per chunk, warps in order: lanes with the same expert (__match_any_sync) take
//      consecutive slots from the chunk's running base, in lane order.
// Integer counts only, so the result is exact and independent of scheduling.
//
// Batch-prioritized order: a radix sort of 64-bit keys (decreasing max score, then token
// index). Keys are unique, so the order is the CPU's std::stable_sort whatever the sort does
// with equal keys.
#include <cub/device/device_radix_sort.cuh>

#include <climits>

#include "cuda/cuda_kernels.hpp"
#include "cuda/device_utils.cuh"

namespace tutel::cuda {
namespace {

constexpr int kChunk = 512;  // positions per block in the counting passes
// Experts whose per-chunk histogram fits a block's shared memory (32 KiB, under the 48 KiB a
// block gets without opting in).
constexpr int64_t kSharedHistogramExperts = 8192;
constexpr int kTokensPerBlock = 4;

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// Bits needed for token indices 0..S-1.
int token_bits(int64_t S) {
  int bits = 0;
  while ((int64_t{1} << bits) < S) ++bits;
  return bits;
}

// Maps a float to an unsigned key that orders like the float; +0 and -0 meet first.
__device__ inline uint32_t ascending_key(float f) {
  const uint32_t u = __float_as_uint(f + 0.f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One warp per token: key = (decreasing max score, token) so that an ascending sort yields the
// batch-prioritized order.
__global__ void priority_key_kernel(const float* scores, int64_t S, int E, int bits, uint64_t* keys) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
       s < S; s += warps) {
    float mx = -INFINITY;
    for (int e = lane; e < E; e += kWarpSize) mx = fmaxf(mx, scores[s * E + e]);
    mx = warp_max(mx);
    if (lane == 0) keys[s] = (static_cast<uint64_t>(~ascending_key(mx)) << bits) | static_cast<uint64_t>(s);
  }
}

// Assignment index s·k + j and expert of position q; the expert is -1 when out of range.
__device__ inline void position(int64_t q, const int32_t* expert_index, const uint64_t* order, int64_t S,
                                int64_t E, int k, uint64_t token_mask, int64_t* assignment, int* expert) {
  const int64_t j = q / S, p = q - j * S;
  const int64_t s = order ? static_cast<int64_t>(order[p] & token_mask) : p;
  *assignment = s * k + j;
  const int32_t e = expert_index[*assignment];
  *expert = (e >= 0 && e < E) ? e : -1;
}

// hist[c, e] = the positions of chunk c routed to expert e. With `shared` the block counts in
// shared memory (E ints) and writes its whole row, so hist needs no zeroing first (one node less
// on a decode step's path); else it adds into a zeroed hist. Counts are integers: the same
// result in any order.
__global__ void chunk_histogram_kernel(const int32_t* expert_index, const uint64_t* order, int64_t S, int64_t E,
                                       int k, uint64_t token_mask, bool shared, int32_t* hist) {
  extern __shared__ int32_t block_counts[];
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  int32_t* row = hist + static_cast<int64_t>(blockIdx.x) * E;
  if (shared) {
    for (int64_t i = threadIdx.x; i < E; i += blockDim.x) block_counts[i] = 0;
    __syncthreads();
  }
  if (q < S * k) {
    int64_t a;
    int e;
    position(q, expert_index, order, S, E, k, token_mask, &a, &e);
    if (e >= 0) atomicAdd(shared ? &block_counts[e] : &row[e], 1);
  }
  if (shared) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < E; i += blockDim.x) row[i] = block_counts[i];
  }
}

// Thread e: hist[c, e] becomes the slots expert e has taken before chunk c.
__global__ void chunk_scan_kernel(int64_t chunks, int64_t E, int32_t* hist, int32_t* expert_count) {
  for (int64_t e = grid_index(); e < E; e += grid_stride()) {
    int32_t running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t v = hist[c * E + e];
      hist[c * E + e] = running;
      running += v;
    }
    expert_count[e] = running;
  }
}

__global__ void chunk_assign_kernel(const int32_t* expert_index, const uint64_t* order, int64_t S, int64_t E,
                                    int k, uint64_t token_mask, int32_t* hist, int32_t* location) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  int64_t a = -1;
  int e = -1;
  if (q < S * k) position(q, expert_index, order, S, E, k, token_mask, &a, &e);
  int32_t* base = hist + static_cast<int64_t>(blockIdx.x) * E;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const unsigned peers = __match_any_sync(kFullMask, e);
  const int rank = __popc(peers & ((1u << lane) - 1u));
  for (int w = 0; w < kChunk / kWarpSize; ++w) {
    if (warp == w) {
      const int32_t start = e >= 0 ? base[e] : 0;
      __syncwarp();  // every peer has read the base before its leader moves it
      if (e >= 0 && rank == 0) base[e] = start + __popc(peers);
      // An expert index out of range never takes a slot: dropped at any capacity.
      if (a >= 0) location[a] = e >= 0 ? start + rank : INT_MAX;
    }
    __syncthreads();  // the next warp sees this warp's bases
  }
}

__global__ void slot_map_kernel(const int32_t* expert_index, const int32_t* location, int64_t n, int64_t E,
                                int64_t C, int32_t* slots) {
  for (int64_t i = grid_index(); i < n; i += grid_stride()) {
    const int32_t e = expert_index[i], l = location[i];
    if (l >= 0 && l < C && e >= 0 && e < E) slots[e * C + l] = static_cast<int32_t>(i);
  }
}

struct LocationsLayout {
  size_t hist = 0, keys_in = 0, keys_out = 0, sort_temp = 0, sort_temp_bytes = 0, total = 0;
};

LocationsLayout locations_layout(int64_t S, int64_t E, int k, bool batch_prioritized) {
  LocationsLayout l;
  const int64_t chunks = (S * k + kChunk - 1) / kChunk;
  l.total = align256(static_cast<size_t>(chunks * E) * 4);
  if (batch_prioritized) {
    l.keys_in = l.total;
    l.keys_out = l.keys_in + align256(static_cast<size_t>(S) * 8);
    l.sort_temp = l.keys_out + align256(static_cast<size_t>(S) * 8);
    // A size query: no memory is touched.
    cub::DeviceRadixSort::SortKeys(nullptr, l.sort_temp_bytes, static_cast<const uint64_t*>(nullptr),
                                   static_cast<uint64_t*>(nullptr), static_cast<int>(S), 0,
                                   32 + token_bits(S));
    l.total = l.sort_temp + align256(l.sort_temp_bytes);
  }
  return l;
}

}  // namespace

size_t locations_scratch_bytes(int64_t S, int64_t E, int k, bool batch_prioritized) {
  return locations_layout(S, E, k, batch_prioritized).total;
}

cudaError_t launch_locations(const float* scores, const int32_t* expert_index, int64_t S, int64_t E, int k,
                             bool batch_prioritized, void* scratch, size_t scratch_bytes, int32_t* location,
                             int32_t* expert_count, cudaStream_t stream) {
  // chunk_scan_kernel writes every expert_count; without positions nothing else would.
  if (S <= 0 || k <= 0) return cudaMemsetAsync(expert_count, 0, static_cast<size_t>(E) * 4, stream);
  const LocationsLayout layout = locations_layout(S, E, k, batch_prioritized);
  if (scratch_bytes < layout.total) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(scratch);
  auto* hist = reinterpret_cast<int32_t*>(base + layout.hist);
  const int64_t chunks = (S * k + kChunk - 1) / kChunk;

  const int bits = token_bits(S);
  const uint64_t token_mask = (uint64_t{1} << bits) - 1;
  const uint64_t* order = nullptr;
  if (batch_prioritized) {
    auto* keys_in = reinterpret_cast<uint64_t*>(base + layout.keys_in);
    auto* keys_out = reinterpret_cast<uint64_t*>(base + layout.keys_out);
    const int64_t blocks = (S + kTokensPerBlock - 1) / kTokensPerBlock;
    priority_key_kernel<<<static_cast<unsigned>(blocks > kMaxBlocks ? kMaxBlocks : blocks),
                          kTokensPerBlock * kWarpSize, 0, stream>>>(scores, S, static_cast<int>(E), bits, keys_in);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    size_t temp_bytes = layout.sort_temp_bytes;
    if (cudaError_t err = cub::DeviceRadixSort::SortKeys(base + layout.sort_temp, temp_bytes, keys_in, keys_out,
                                                         static_cast<int>(S), 0, 32 + bits, stream);
        err != cudaSuccess)
      return err;
    order = keys_out;
  }

  const bool shared = E <= kSharedHistogramExperts;
  if (!shared) {
    if (cudaError_t err = cudaMemsetAsync(hist, 0, static_cast<size_t>(chunks * E) * 4, stream); err != cudaSuccess)
      return err;
  }
  const size_t shared_bytes = shared ? static_cast<size_t>(E) * 4 : 0;
  chunk_histogram_kernel<<<static_cast<unsigned>(chunks), kChunk, shared_bytes, stream>>>(
      expert_index, order, S, E, k, token_mask, shared, hist);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  chunk_scan_kernel<<<grid_for(E), kThreads, 0, stream>>>(chunks, E, hist, expert_count);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  chunk_assign_kernel<<<static_cast<unsigned>(chunks), kChunk, 0, stream>>>(expert_index, order, S, E, k,
                                                                           token_mask, hist, location);
  return cudaGetLastError();
}

cudaError_t launch_slot_map(const int32_t* expert_index, const int32_t* location, int64_t assignments, int64_t E,
                            int64_t C, int32_t* slots, cudaStream_t stream) {
  if (E * C <= 0) return cudaSuccess;
  // All bytes 0xff: every slot reads -1 (empty).
  if (cudaError_t err = cudaMemsetAsync(slots, 0xff, static_cast<size_t>(E * C) * 4, stream); err != cudaSuccess)
    return err;
  if (assignments <= 0) return cudaSuccess;
  slot_map_kernel<<<grid_for(assignments), kThreads, 0, stream>>>(expert_index, location, assignments, E, C, slots);
  return cudaGetLastError();
}

}  // namespace tutel::cuda
