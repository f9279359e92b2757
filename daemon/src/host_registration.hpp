// A host range (a session's arena) registered with every rank's backend for fast transfers:
// page-locked on CUDA, nothing to do on the CPU backend.
//
// Registration is an optimisation only: a backend that refuses is logged and skipped, and its
// copies of the range take the slower path.
// Thread-safety: one owner; each call takes the rank's lock around its backend.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "served_layer.hpp"

namespace tutel::daemon {

class HostRegistration {
 public:
  HostRegistration() = default;
  HostRegistration(HostRegistration&& o) noexcept { *this = std::move(o); }
  HostRegistration& operator=(HostRegistration&& o) noexcept;
  HostRegistration(const HostRegistration&) = delete;
  HostRegistration& operator=(const HostRegistration&) = delete;
  ~HostRegistration() { reset(); }

  // Registers [data, data + bytes) with each rank's backend; `what` names the range in the log
  // ("session 7's arena"). Its time on each rank (and its reset's) is `tenant`'s, whose session
  // it serves (FairLock). The ranks must outlive the registration.
  static HostRegistration register_with(const std::vector<std::unique_ptr<Rank>>& ranks, const std::string& tenant,
                                        void* data, size_t bytes, std::string what);

  // Unregisters the range from every backend that accepted it.
  void reset();
  // How many ranks' backends hold the range.
  size_t registered_ranks() const { return ranks_.size(); }

 private:
  std::vector<Rank*> ranks_;  // those whose backend accepted the range
  void* data_ = nullptr;
  std::string what_;
  std::string tenant_;
};

}  // namespace tutel::daemon
