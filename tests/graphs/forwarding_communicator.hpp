// A communicator that hands every call to another: the base of test wrappers that watch or
// bracket some collectives (the simulated device's DeviceCollectives, the exchange-thread
// recorder) and pass the rest through unchanged.
#pragma once

#include <memory>
#include <vector>

#include "tutel/comm/communicator.hpp"

namespace tutel::testing {

class ForwardingCommunicator : public comm::Communicator {
 public:
  explicit ForwardingCommunicator(comm::Communicator& inner) : inner_(inner) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  int local_size() const override { return inner_.local_size(); }
  using Communicator::all_to_all;
  Status all_to_all(const void* send, const comm::BlockLayout& send_layout, void* recv,
                    const comm::BlockLayout& recv_layout, comm::AllToAllAlgo algo) override {
    return inner_.all_to_all(send, send_layout, recv, recv_layout, algo);
  }
  Status all_gather(const void* send, void* recv, size_t bytes_per_rank) override {
    return inner_.all_gather(send, recv, bytes_per_rank);
  }
  Status reduce_scatter(const float* send, float* recv, size_t count_per_rank,
                        comm::ReduceOp op) override {
    return inner_.reduce_scatter(send, recv, count_per_rank, op);
  }
  Status all_reduce(float* data, size_t count, comm::ReduceOp op) override {
    return inner_.all_reduce(data, count, op);
  }
  Status all_reduce(int64_t* data, size_t count, comm::ReduceOp op) override {
    return inner_.all_reduce(data, count, op);
  }
  Status barrier() override { return inner_.barrier(); }
  void give_up(const Status& why) override { inner_.give_up(why); }
  // The inner communicator's new group, unwrapped: a wrapper that must also watch the new
  // group's collectives overrides this (and keeps the inner group in owned_).
  Result<std::unique_ptr<Communicator>> split(int color, int key) override {
    return inner_.split(color, key);
  }
  std::vector<comm::PeerStatus> peers() const override { return inner_.peers(); }

 protected:
  comm::Communicator& inner_;
  std::unique_ptr<Communicator> owned_;  // inner_, where a split() made it
};

}  // namespace tutel::testing
