// The ranks of train_toy --world W: a launcher that forks them, and their links for summing the
// replicated dense gradients (and the printed losses) over the ranks.
//
// A star through rank 0 over socketpairs made before forking: rank 0 adds the contributions in
// rank order 0..W-1 and sends that one sum back to every rank, so all replicas receive
// bit-identical values and never drift apart. A rank that dies shows up as end-of-file to its
// peer (every other end of its links is closed), not as a hang.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace toy {

// A file descriptor that closes itself.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept;
  Fd& operator=(Fd&& other) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const { return fd_; }
  void reset();

 private:
  int fd_ = -1;
};

// The rank of this process and its links to the others.
class RankGroup {
 public:
  RankGroup() = default;  // a single process
  // links[r] leads to rank r on rank 0; links[0] leads to rank 0 on the others.
  RankGroup(int rank, int world, uint16_t port, std::vector<Fd> links);

  int rank() const { return rank_; }
  int world() const { return world_; }
  // The loopback port where the group layer's ranks meet.
  uint16_t coordinator_port() const { return port_; }
  // "train_toy", or "train_toy rank 2": how messages name this process.
  const std::string& who() const { return who_; }

  // Replaces v by its elementwise sum over the ranks; exits 1 when a peer rank is gone.
  void sum(std::vector<double>& v);

 private:
  int rank_ = 0, world_ = 1;
  uint16_t port_ = 0;
  std::vector<Fd> links_;
  std::string who_ = "train_toy";
};

// Forks `world` ranks, runs body(group) in each and waits for them; at the first failure it
// stops the others (by PID), since a group layer cannot go on without all its ranks. Returns 0
// only if every rank returned 0.
int launch_ranks(int world, const std::function<int(RankGroup&)>& body);

}  // namespace toy
