// The UCX Communicator: every collective is one or two exchange steps over UcxRank.
//
// Tags: [ack: 1 bit][group id: 19 bits][step sequence: 24 bits][sender's group rank: 20 bits]. A group id
// is chosen by each receiver for itself (UcxRank::allocate_group_id) and published in the
// split all-gather, so a sender tags a message with the *receiver's* id for the group: ids
// are unique per receiver without any agreement, even when two threads split at once. Every
// rank of a group runs the same steps in the same order, so the sequence numbers agree (a step
// of several messages per peer uses one per message); they wrap after 2^24 − 1, far more than
// can ever be in flight.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "../src/block_layout.hpp"
#include "../src/group_layout.hpp"
#include "../src/reduce.hpp"
#include "../src/two_dh.hpp"
#include "tutel/comm/ucx.hpp"
#include "ucx_rank.hpp"

namespace tutel::comm {
namespace {

using ucx::Clock;
using ucx::Transfer;
using ucx::UcxRank;

constexpr int kSeqBits = 24;
constexpr int kRankBits = 20;
// The sequence number reserved for "gave up" notices; steps never use it.
constexpr uint32_t kNoticeSeq = (1u << kSeqBits) - 1;
constexpr uint64_t kIgnoreSender = ~((uint64_t{1} << kRankBits) - 1);
constexpr uint32_t kInvalidGroupId = ~0u;
// Below this many bytes per rank an all-reduce gathers everything and reduces locally (one
// step); above it, reduce-scatter then all-gather (two steps, 1/size of the traffic each).
constexpr size_t kSmallAllReduceBytes = 16 * 1024;

class UcxCommunicator final : public Communicator {
 public:
  UcxCommunicator(std::shared_ptr<UcxRank> rank, std::vector<int> members,
                  std::vector<uint32_t> group_ids, int me, int local_size,
                  std::chrono::milliseconds timeout)
      : rank_(std::move(rank)),
        members_(std::move(members)),
        group_ids_(std::move(group_ids)),
        me_(me),
        local_size_(local_size),
        timeout_(timeout) {}

  ~UcxCommunicator() override { rank_->cancel_notice(notice_); }

  // Posts the standing receive for notices; call once before the first collective.
  Status start() {
    for (int p = 0; p < size(); ++p)
      if (p != me_) notice_.peers.emplace_back(members_[p], tag(group_ids_[p], me_, kNoticeSeq));
    notice_.self = rank_->describe(rank_->rank());
    notice_.members = members_;
    notice_.sender_mask = (uint64_t{1} << kRankBits) - 1;
    return rank_->post_notice(notice_, tag(group_ids_[me_], 0, kNoticeSeq), kIgnoreSender);
  }

  int rank() const override { return me_; }
  int size() const override { return static_cast<int>(members_.size()); }
  int local_size() const override { return local_size_; }

  std::vector<PeerStatus> peers() const override {
    std::vector<PeerStatus> out;
    for (int p = 0; p < size(); ++p) {
      if (p == me_) continue;
      const int world = members_[p];
      PeerStatus& s = out.emplace_back();
      s.rank = p;
      s.address = rank_->address(world);
      s.error = rank_->failure(world);
      s.failed = !s.error.empty();
      s.same_process = rank_->is_local(world);
      s.peer_memory = rank_->pulls_from_peer(world);
      s.bytes_sent = rank_->bytes_sent(world);
      s.bytes_received = rank_->bytes_received(world);
    }
    return out;
  }

  using Communicator::all_to_all;
  Status all_to_all(const void* send, const BlockLayout& send_layout, void* recv,
                    const BlockLayout& recv_layout, AllToAllAlgo algo) override {
    TUTEL_RETURN_IF_ERROR(begin("all_to_all"));
    TUTEL_RETURN_IF_ERROR(detail::check_block_layouts(send_layout, recv_layout, size()));
    if (algo == AllToAllAlgo::k2DH && size() % local_size_ != 0)
      return Status::InvalidArgument(
          "2DH all-to-all needs local_size (" + std::to_string(local_size_) +
          ") to divide the group size (" + std::to_string(size()) +
          "); use AllToAllAlgo::kLinear, or a local_size that divides it");
    const auto* s = static_cast<const unsigned char*>(send);
    auto* r = static_cast<unsigned char*>(recv);
    // 2DH with one rank per node, or one node, is the linear exchange.
    if (algo != AllToAllAlgo::k2DH || local_size_ == 1 || local_size_ == size())
      return finish(all_to_all_linear(s, send_layout, r, recv_layout));
    // 2DH moves whole contiguous blocks: a strided side is packed before, or unpacked after.
    const size_t c = send_layout.block_bytes(), total = static_cast<size_t>(size()) * c;
    // The same pieces, back to back.
    const BlockLayout packed{send_layout.piece_bytes, send_layout.pieces, send_layout.piece_bytes, c};
    const bool pack = !send_layout.is_contiguous(), unpack = !recv_layout.is_contiguous();
    // Staging for each strided side: the packed send blocks, then the received ones.
    unsigned char* staging =
        pack || unpack ? scratch_c<unsigned char>((size_t{pack} + size_t{unpack}) * total) : nullptr;
    const unsigned char* in = s;
    if (pack) {
      detail::copy_blocks(staging, packed, s, send_layout, size());
      in = staging;
    }
    unsigned char* out = unpack ? staging + (pack ? total : 0) : r;
    TUTEL_RETURN_IF_ERROR(finish(all_to_all_2dh(in, out, c)));
    if (unpack) detail::copy_blocks(r, recv_layout, out, packed, size());
    return Status::OK();
  }

  Status all_gather(const void* send, void* recv, size_t bytes_per_rank) override {
    TUTEL_RETURN_IF_ERROR(begin("all_gather"));
    return finish(gather(send, recv, bytes_per_rank));
  }

  Status reduce_scatter(const float* send, float* recv, size_t count_per_rank,
                        ReduceOp op) override {
    TUTEL_RETURN_IF_ERROR(begin("reduce_scatter"));
    const int n = size();
    float* scratch = scratch_b<float>(static_cast<size_t>(n) * count_per_rank);
    auto& blocks = blocks_of<float>(n);
    for (int i = 1; i < n; ++i) {
      const int p = (me_ + i) % n;
      add_recv(p, scratch + p * count_per_rank, count_per_rank * sizeof(float));
      add_send(p, send + p * count_per_rank, count_per_rank * sizeof(float));
      blocks[p] = scratch + p * count_per_rank;
    }
    blocks[me_] = send + me_ * count_per_rank;
    Status s = run_step();
    if (s.ok()) detail::reduce_in_rank_order(recv, blocks.data(), n, count_per_rank, op);
    return finish(std::move(s));
  }

  Status all_reduce(float* data, size_t count, ReduceOp op) override {
    TUTEL_RETURN_IF_ERROR(begin("all_reduce"));
    return finish(all_reduce_impl(data, count, op));
  }

  Status all_reduce(int64_t* data, size_t count, ReduceOp op) override {
    TUTEL_RETURN_IF_ERROR(begin("all_reduce"));
    return finish(all_reduce_impl(data, count, op));
  }

  Status barrier() override {
    TUTEL_RETURN_IF_ERROR(begin("barrier"));
    return finish(barrier_step());
  }

  // After the bootstrap's first barrier: BootstrapOptions::cancel no longer ends collectives.
  void end_bootstrap() { rank_->end_bootstrap(); }

  // The bootstrap's first barrier: it also waits for every endpoint to connect.
  Status barrier_until(Clock::time_point deadline) {
    TUTEL_RETURN_IF_ERROR(begin("barrier"));
    deadline_ = deadline;
    return finish(barrier_step());
  }

  Result<std::unique_ptr<Communicator>> split(int color, int key) override {
    TUTEL_RETURN_IF_ERROR(begin("split"));
    struct Entry {
      int32_t color;
      int32_t key;
      uint32_t group_id;
    };
    const auto id = rank_->allocate_group_id();
    const Entry mine{color < 0 ? kNoColor : color, key, id ? *id : kInvalidGroupId};
    std::vector<Entry> all(static_cast<size_t>(size()));
    TUTEL_RETURN_IF_ERROR(finish(gather(&mine, all.data(), sizeof(Entry))));
    if (mine.color == kNoColor) return std::unique_ptr<Communicator>();

    std::vector<int> order;  // group ranks of the new group's members, in the new order
    for (int p = 0; p < size(); ++p)
      if (all[p].color == mine.color) order.push_back(p);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return all[a].key < all[b].key; });
    std::vector<int> members;
    std::vector<uint32_t> ids;
    int new_me = -1;
    for (int p : order) {
      if (all[p].group_id == kInvalidGroupId)
        return Status::ResourceExhausted(
            rank_->describe(members_[p]) +
            " has used all 2^19 - 1 group ids of its communicator; re-bootstrap it");
      if (p == me_) new_me = static_cast<int>(members.size());
      members.push_back(members_[p]);
      ids.push_back(all[p].group_id);
    }
    const int local = detail::derive_local_size(members, rank_->local_size());
    auto child = std::make_unique<UcxCommunicator>(rank_, std::move(members), std::move(ids),
                                                   new_me, local, timeout_);
    TUTEL_RETURN_IF_ERROR(child->start());
    return std::unique_ptr<Communicator>(std::move(child));
  }

  void give_up(const Status& why) override {
    if (!broken_.ok()) return;
    // The peers read "<this rank> gave up on its step: rank i's own work failed ...".
    broken_ = Status::Aborted("rank " + std::to_string(me_) + "'s own work failed between collectives: " +
                              std::string(why.message()));
    notice_.what = "its step";
    rank_->give_up(notice_, broken_);
  }

 private:
  // ---- collective framing ----------------------------------------------------------------

  Status begin(const char* what) {
    what_ = what;
    notice_.what = what;
    if (!broken_.ok())
      return Status::Aborted(std::string(what) + ": this communicator failed earlier (" +
                             std::string(broken_.message()) +
                             "); create a new one (ucx_bootstrap or split of a healthy group)");
    deadline_ = Clock::now() + timeout_;
    sends_.clear();
    recvs_.clear();
    return Status::OK();
  }

  // After a failure the group's ranks disagree on where they are: refuse further work. (The
  // peers were told why by UcxRank::exchange.)
  Status finish(Status s) {
    if (s.ok()) return s;
    broken_ = s.with_context(context());
    return broken_;
  }

  std::string context() const {
    std::string c =
        std::string(what_) + " (rank " + std::to_string(me_) + " of " + std::to_string(size());
    if (!is_world()) {
      c += ", a group of world ranks ";
      for (size_t i = 0; i < members_.size(); ++i) {
        if (i == 16) {
          c += ", ...";
          break;
        }
        if (i > 0) c += ',';
        c += std::to_string(members_[i]);
      }
    }
    return c + "; timeout " + std::to_string(timeout_.count()) + " ms)";
  }

  bool is_world() const {
    return group_ids_[me_] == 0 && static_cast<int>(members_.size()) == rank_->size();
  }

  // ---- steps -----------------------------------------------------------------------------

  static uint64_t tag(uint32_t group_id, int sender, uint32_t seq) {
    return (uint64_t{group_id} << (kSeqBits + kRankBits)) | (uint64_t{seq} << kRankBits) |
           static_cast<uint64_t>(sender);
  }

  // A pulled message's acknowledgement travels back with the tag of a message in the other
  // direction of the same step, plus kAckBit: unique at its receiver, like every tag.
  // `message`: the step's j-th message to or from this peer (a step of several pieces).
  void add_send(int peer, const void* buffer, size_t bytes, size_t message = 0) {
    const uint32_t seq = seq_at(message);
    sends_.push_back({members_[peer], tag(group_ids_[peer], me_, seq), const_cast<void*>(buffer), bytes,
                      tag(group_ids_[me_], peer, seq) | ucx::kAckBit});
  }

  void add_recv(int peer, void* buffer, size_t bytes, size_t message = 0) {
    const uint32_t seq = seq_at(message);
    recvs_.push_back({members_[peer], tag(group_ids_[me_], peer, seq), buffer, bytes,
                      tag(group_ids_[peer], me_, seq) | ucx::kAckBit});
  }

  // The step's sequence numbers run from seq_, skipping the notices' (kNoticeSeq).
  uint32_t seq_at(size_t message) const {
    return static_cast<uint32_t>((seq_ + message) % kNoticeSeq);
  }

  // `messages`: the most messages the step exchanged with one peer (its sequence numbers used).
  Status run_step(size_t messages = 1) {
    const Clock::duration grace =
        std::min<Clock::duration>(timeout_ / 4, std::chrono::milliseconds(500));
    Status s = rank_->exchange(sends_, recvs_, deadline_, notice_, grace);
    seq_ = seq_at(messages);
    if (s.ok()) {
      sends_.clear();
      recvs_.clear();
    }
    return s;
  }

  template <typename T>
  T* scratch_a(size_t count) {
    if (scratch_a_.size() < count * sizeof(T)) scratch_a_.resize(count * sizeof(T));
    return reinterpret_cast<T*>(scratch_a_.data());
  }
  template <typename T>
  T* scratch_b(size_t count) {
    if (scratch_b_.size() < count * sizeof(T)) scratch_b_.resize(count * sizeof(T));
    return reinterpret_cast<T*>(scratch_b_.data());
  }

  template <typename T>
  T* scratch_c(size_t count) {
    if (scratch_c_.size() < count * sizeof(T)) scratch_c_.resize(count * sizeof(T));
    return reinterpret_cast<T*>(scratch_c_.data());
  }

  template <typename T>
  std::vector<const T*>& blocks_of(int n) {
    auto& blocks = std::get<std::vector<const T*>>(blocks_);
    blocks.assign(static_cast<size_t>(n), nullptr);
    return blocks;
  }

  Status barrier_step() {
    static char token;
    for (int i = 1; i < size(); ++i) {
      const int p = (me_ + i) % size();
      add_recv(p, &token, 0);
      add_send(p, &token, 0);
    }
    return run_step();
  }

  Status gather(const void* send, void* recv, size_t bytes) {
    auto* out = static_cast<unsigned char*>(recv);
    if (out + me_ * bytes != send) std::memmove(out + me_ * bytes, send, bytes);
    for (int i = 1; i < size(); ++i) {
      const int p = (me_ + i) % size();
      add_recv(p, out + p * bytes, bytes);
      add_send(p, send, bytes);
    }
    return run_step();
  }

  // One message per piece, each with a sequence number of its own, so each has a tag of its own
  // (also for the acknowledgement of a pulled one). Ranks that disagree on the number of pieces
  // must not pair up: the one with fewer would return, and leave the others' extra pieces to be
  // taken by its next step. So with several pieces, piece j takes the step's (j + 1)-th number
  // (the first is one piece's) and an empty message the next one ends each peer's pieces: ranks
  // that pass several but different numbers both fail on a message of the wrong size, and a
  // rank that passes one piece against several both wait for a message that never comes, until
  // the timeout. (One piece sends no end: a plain all-to-all of small chunks would pay a second
  // round trip, ~10 µs here.)
  Status all_to_all_linear(const unsigned char* send, const BlockLayout& from, unsigned char* recv,
                           const BlockLayout& to) {
    static char end_of_pieces;
    const int n = size();
    const size_t pieces = from.pieces, first = pieces > 1 ? 1 : 0;
    for (size_t j = 0; j < pieces; ++j)
      std::memcpy(recv + me_ * to.block_stride + j * to.piece_stride,
                  send + me_ * from.block_stride + j * from.piece_stride, from.piece_bytes);
    for (int i = 1; i < n; ++i) {
      const int p = (me_ + i) % n;  // staggered, so not every rank starts with rank 0
      for (size_t j = 0; j < pieces; ++j) {
        add_recv(p, recv + p * to.block_stride + j * to.piece_stride, to.piece_bytes, first + j);
        add_send(p, send + p * from.block_stride + j * from.piece_stride, from.piece_bytes,
                 first + j);
      }
      if (pieces > 1) {
        add_recv(p, &end_of_pieces, 0, first + pieces);
        add_send(p, &end_of_pieces, 0, first + pieces);
      }
    }
    return run_step(pieces > 1 ? pieces + 2 : 1);
  }

  // See src/two_dh.hpp for the algebra.
  Status all_to_all_2dh(const unsigned char* send, unsigned char* recv, size_t c) {
    const detail::TwoDH g(me_, size(), local_size_);
    const size_t total = static_cast<size_t>(size()) * c;
    unsigned char* t = scratch_a<unsigned char>(total);  // T, later V
    unsigned char* u = scratch_b<unsigned char>(total);  // U

    detail::transpose_chunks(t, send, g.nodes, g.local_size, c);
    const size_t b1 = g.phase1_bytes(c);
    for (int i = 1; i < g.local_size; ++i) {
      const int j = (g.local + i) % g.local_size;
      add_recv(g.phase1_peer(j), u + j * b1, b1);
      add_send(g.phase1_peer(j), t + j * b1, b1);
    }
    std::memcpy(u + g.local * b1, t + g.local * b1, b1);
    TUTEL_RETURN_IF_ERROR(run_step());

    unsigned char* v = t;
    detail::transpose_chunks(v, u, g.local_size, g.nodes, c);
    const size_t b2 = g.phase2_bytes(c);
    for (int i = 1; i < g.nodes; ++i) {
      const int m = (g.node + i) % g.nodes;
      add_recv(g.phase2_peer(m), recv + m * b2, b2);
      add_send(g.phase2_peer(m), v + m * b2, b2);
    }
    std::memcpy(recv + g.node * b2, v + g.node * b2, b2);
    return run_step();
  }

  template <typename T>
  Status all_reduce_impl(T* data, size_t count, ReduceOp op) {
    const int n = size();
    if (n == 1 || count == 0) return Status::OK();
    auto& blocks = blocks_of<T>(n);
    if (count < static_cast<size_t>(n) || count * sizeof(T) <= kSmallAllReduceBytes) {
      T* all = scratch_b<T>(static_cast<size_t>(n) * count);
      TUTEL_RETURN_IF_ERROR(gather(data, all, count * sizeof(T)));
      for (int p = 0; p < n; ++p) blocks[p] = all + p * count;
      detail::reduce_in_rank_order(data, blocks.data(), n, count, op);
      return Status::OK();
    }
    // Reduce-scatter then all-gather over `n` near-equal blocks: block p is [begin(p), begin(p+1)).
    auto begin = [&](int p) { return count * static_cast<size_t>(p) / static_cast<size_t>(n); };
    const size_t mine = begin(me_ + 1) - begin(me_);
    T* incoming = scratch_b<T>(static_cast<size_t>(n) * mine);
    for (int i = 1; i < n; ++i) {
      const int p = (me_ + i) % n;
      add_recv(p, incoming + p * mine, mine * sizeof(T));
      add_send(p, data + begin(p), (begin(p + 1) - begin(p)) * sizeof(T));
      blocks[p] = incoming + p * mine;
    }
    blocks[me_] = data + begin(me_);
    TUTEL_RETURN_IF_ERROR(run_step());
    detail::reduce_in_rank_order(data + begin(me_), blocks.data(), n, mine, op);
    for (int i = 1; i < n; ++i) {
      const int p = (me_ + i) % n;
      add_recv(p, data + begin(p), (begin(p + 1) - begin(p)) * sizeof(T));
      add_send(p, data + begin(me_), mine * sizeof(T));
    }
    return run_step();
  }

  std::shared_ptr<UcxRank> rank_;
  std::vector<int> members_;         // world rank of each group rank
  std::vector<uint32_t> group_ids_;  // each member's id for this group
  int me_;
  int local_size_;
  std::chrono::milliseconds timeout_;

  uint32_t seq_ = 0;
  const char* what_ = "";
  Clock::time_point deadline_;
  Status broken_;
  ucx::Notice notice_;
  std::vector<Transfer> sends_, recvs_;
  std::tuple<std::vector<const float*>, std::vector<const int64_t*>> blocks_;  // reduce inputs
  std::vector<unsigned char> scratch_a_, scratch_b_;
  std::vector<unsigned char> scratch_c_;  // a block all-to-all packed for 2DH
};

}  // namespace

Result<std::unique_ptr<Communicator>> ucx_bootstrap(const BootstrapOptions& options) {
  TUTEL_RETURN_IF_ERROR(validate(options));
  const auto deadline = Clock::now() + options.timeout;
  TUTEL_ASSIGN_OR_RETURN(std::shared_ptr<UcxRank> rank, UcxRank::create(options));
  std::vector<int> members(static_cast<size_t>(options.size));
  std::iota(members.begin(), members.end(), 0);
  std::vector<uint32_t> world_ids(members.size(), 0);  // the world group is id 0 everywhere
  auto comm = std::make_unique<UcxCommunicator>(std::move(rank), std::move(members),
                                                std::move(world_ids), options.rank,
                                                options.local_size, options.collective_timeout);
  TUTEL_RETURN_IF_ERROR(comm->start());
  TUTEL_RETURN_IF_ERROR(
      comm->barrier_until(std::max(deadline, Clock::now() + options.collective_timeout))
          .with_context("bootstrap: connecting to every peer"));
  comm->end_bootstrap();
  return std::unique_ptr<Communicator>(std::move(comm));
}

}  // namespace tutel::comm
