// Communicator: the collectives one group of ranks runs together.
//
// One object per (rank, group). Every collective is blocking and must be called by every rank
// of the group, in the same order and with the same sizes; a collective that cannot finish
// (a peer died, stopped answering, or passed different sizes) returns an error within the
// communicator's timeout and names the peer. After an error the communicator is unusable:
// every later call returns kAborted, because the ranks no longer agree on where they are.
//
// Implementations (see README.md): UCX over host memory (ucx.hpp) and NCCL over device
// memory (nccl.hpp). Buffers are host or device memory according to the implementation.
//
// Thread-safety: one thread at a time per Communicator object (peers() excepted). Distinct
// Communicators (other ranks, or sub-groups from split() of the same rank) may be used from
// distinct threads at the same time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tutel/core/status.hpp"

namespace tutel::comm {

enum class ReduceOp { kSum, kMax };

// kLinear: every rank exchanges one chunk with every other rank.
// k2DH: two-dimensional hierarchical (Tutel): an intra-node exchange with a stride copy, then
// an exchange among the ranks with the same local index on every node. Fewer, larger
// messages across nodes; needs local_size() to divide size(). Same result as kLinear.
enum class AllToAllAlgo { kLinear, k2DH };

std::string_view to_string(ReduceOp op);
std::string_view to_string(AllToAllAlgo algo);
// "linear" | "2dh" (any letter case).
std::optional<AllToAllAlgo> parse_all_to_all_algo(std::string_view name);

// One other rank of a group as this rank sees it (tutelctl peers).
struct PeerStatus {
  int rank = -1;        // in the group
  std::string address;  // where the bootstrap saw it: "127.0.0.1, pid 4242"
  bool failed = false;
  std::string error;          // why it is considered failed; "" while it answers
  bool same_process = false;  // exchanges by memcpy through a LocalExchange, not a transport
  // Another process of this host whose large messages this rank copies straight out of its
  // memory (process_vm_readv), the transport carrying only a descriptor and an acknowledgement.
  bool peer_memory = false;
  // Payload of the collectives' messages to and from it: what this rank handed to the
  // transport and received, per peer (UCX); or what the collectives addressed to it (NCCL,
  // whose rings route through other ranks). Ranks of one UCX process that share a worker
  // (sub-groups from split()) share the counters.
  uint64_t bytes_sent = 0, bytes_received = 0;
};

// Where the size() blocks of an all-to-all lie in a buffer: block i is `pieces` pieces of
// `piece_bytes` each, piece j at byte offset i·block_stride + j·piece_stride. So one exchange
// can read a block from, and write it to, rows that are not next to each other: the expert-
// parallel layer receives each peer's E_l experts' rows straight into [E_l][W·C] (a piece per
// expert) and sends a chunk of the capacity straight from [E][C] (Communicator::all_to_all).
struct BlockLayout {
  size_t piece_bytes = 0;
  size_t pieces = 1;
  size_t piece_stride = 0;  // between the pieces of a block (unused with one piece)
  size_t block_stride = 0;  // between blocks

  // Blocks of `bytes` back to back, one piece each.
  static BlockLayout contiguous(size_t bytes) { return {bytes, 1, bytes, bytes}; }
  size_t block_bytes() const { return piece_bytes * pieces; }
  // Whether block i is bytes [i·block_bytes(), (i+1)·block_bytes()).
  bool is_contiguous() const {
    return block_stride == block_bytes() && (pieces <= 1 || piece_stride == piece_bytes);
  }
  // Bytes from the first piece's start to the last one's end, over `blocks` blocks.
  size_t extent(int blocks) const {
    if (blocks < 1 || block_bytes() == 0) return 0;
    return static_cast<size_t>(blocks - 1) * block_stride + (pieces - 1) * piece_stride +
           piece_bytes;
  }
};

class Communicator;

// A release registered with a communicator while this lives (Communicator::add_graph_release).
// Move-only; the communicator must outlive it.
class GraphRelease {
 public:
  GraphRelease() = default;
  GraphRelease(Communicator& comm, std::function<void()> release);
  GraphRelease(GraphRelease&& other) noexcept
      : comm_(std::exchange(other.comm_, nullptr)), id_(other.id_) {}
  GraphRelease& operator=(GraphRelease&& other) noexcept;
  GraphRelease(const GraphRelease&) = delete;
  GraphRelease& operator=(const GraphRelease&) = delete;
  ~GraphRelease() { reset(); }
  void reset();

 private:
  Communicator* comm_ = nullptr;
  uint64_t id_ = 0;
};

// split() with this color returns no communicator (MPI_UNDEFINED).
inline constexpr int kNoColor = -1;

class Communicator {
 public:
  virtual ~Communicator() = default;

  // This rank's index in the group, in [0, size()).
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Ranks per node: group rank r sits on node r / local_size() with local index
  // r % local_size(). 1 when the group's ranks are not laid out node by node.
  virtual int local_size() const = 0;

  // Block i of `send` goes to rank i, block i of `recv` came from rank i, each buffer laid out
  // as its layout says; piece j of a received block is piece j of the sender's block. Every rank
  // passes the same `pieces` and `piece_bytes` (the strides are each rank's own, for each
  // buffer). No two pieces of `recv` may overlap, nor `recv` overlap `send`.
  virtual Status all_to_all(const void* send, const BlockLayout& send_layout, void* recv,
                            const BlockLayout& recv_layout, AllToAllAlgo algo) = 0;
  // `send` and `recv` hold size() chunks of `chunk_bytes` back to back.
  Status all_to_all(const void* send, void* recv, size_t chunk_bytes, AllToAllAlgo algo) {
    const BlockLayout chunks = BlockLayout::contiguous(chunk_bytes);
    return all_to_all(send, chunks, recv, chunks, algo);
  }
  // recv holds size() blocks of `bytes_per_rank`; block i is rank i's `send`.
  virtual Status all_gather(const void* send, void* recv, size_t bytes_per_rank) = 0;
  // send holds size() blocks of `count_per_rank` floats; recv (count_per_rank floats) gets
  // the reduction over all ranks of their block rank().
  virtual Status reduce_scatter(const float* send, float* recv, size_t count_per_rank,
                                ReduceOp op) = 0;
  // In place. Every rank gets bit-identical results: each element is reduced in rank order.
  virtual Status all_reduce(float* data, size_t count, ReduceOp op) = 0;
  // For capacities and token counts (typically kMax).
  virtual Status all_reduce(int64_t* data, size_t count, ReduceOp op) = 0;
  virtual Status barrier() = 0;
  // This rank gives up on the collectives of its current step: its own work failed between
  // them (a kernel, an allocation), so its next collective would pair with one its peers are
  // still waiting in (a timeout, or, where the sizes happen to agree, wrong data). From now on
  // the communicator refuses every call, as after a failed collective, and the peers are told
  // where the transport can (UCX sends them this rank's notice, so their collective fails at
  // once; NCCL's peers find out at their timeout). Idempotent; a no-op once failed.
  virtual void give_up(const Status& why) = 0;
  // Waits, within the collective timeout, for the work of collectives that returned once it was
  // enqueued: an NCCL communicator made with NcclOptions::synchronize = false (whose collectives
  // may also run inside a CUDA graph launched on its stream), with everything queued before it
  // on that stream. A timeout aborts the communicator, as a collective's would. Communicators
  // whose collectives are done when they return have nothing to wait for.
  virtual Status wait_enqueued() { return Status::OK(); }
  // Collectives issued while their stream is captured into a graph move nothing then, and a
  // launch of the graph issues no call the communicator sees. So a communicator whose
  // collectives can be captured (NCCL) counts their traffic here, per peer, instead of in
  // peers(), and adds it to peers() for each launch its caller reports with count_replayed().
  virtual uint64_t captured_traffic() const { return 0; }
  virtual void count_replayed(uint64_t /*bytes_per_peer*/) {}
  // Graphs that captured a communicator's collectives must be destroyed before it is aborted or
  // destroyed: NCCL (2.26 and later) waits for every such graph to die first, forever while its
  // owner keeps it. The owner registers how to destroy them; the communicator calls every
  // registered release before it aborts (a failed collective, on the calling thread) and before
  // it is destroyed. A release must not call the communicator. Use GraphRelease, which
  // unregisters when its owner goes.
  virtual uint64_t add_graph_release(std::function<void()> /*release*/) { return 0; }
  virtual void remove_graph_release(uint64_t /*id*/) {}
  // Moves whenever device memory the communicator's collectives use of their own (the NCCL 2DH
  // all-to-all's staging) is reallocated: a captured graph of them holds its old address.
  virtual uint64_t scratch_epoch() const { return 0; }

  // Collective over this group: a new communicator over the ranks that passed the same
  // `color`, ordered by `key` (ties by rank here), as MPI_Comm_split. color == kNoColor
  // returns a null pointer. The new group is independent of this one: both may be used at
  // the same time from different threads.
  virtual Result<std::unique_ptr<Communicator>> split(int color, int key) = 0;

  // Every other rank of the group, in rank order. Unlike the collectives, safe from any thread
  // at any time, also while a collective runs.
  virtual std::vector<PeerStatus> peers() const = 0;
};

}  // namespace tutel::comm
