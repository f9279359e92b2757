// How tenants share a number of slots of the daemon's thread pool (libuv's), so that one
// tenant's work that waits (a group layer's creation waiting for its peers) cannot hold every
// slot and keep the others out.
//
// Every tenant that is active now (the caller decides what that means: for creations, a client
// session connected or a creation under way) has a share of the slots reserved: capacity /
// active tenants, at least 1. Beyond its share a tenant may take only slots that no other
// active tenant's unused reservation needs. So a tenant alone may use every slot, and one that
// becomes active later finds its share as soon as the slots beyond the first one's share are
// given back.
//
// Thread-safety: one thread (the daemon's loop).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tutel::daemon {

class PoolShares {
 public:
  explicit PoolShares(int64_t capacity = 1);

  int64_t capacity() const { return capacity_; }
  int64_t in_use() const { return total_; }
  int64_t in_use(const std::string& tenant) const;
  // What each of `active` tenants has reserved (the caller among them).
  int64_t share(size_t active) const;

  // Whether `tenant` may take one more slot while `others` (the other active tenants, without
  // `tenant`) are active too.
  bool may_take(const std::string& tenant, const std::vector<std::string>& others) const;
  void take(const std::string& tenant);
  void give_back(const std::string& tenant);

 private:
  int64_t capacity_;
  int64_t total_ = 0;
  std::map<std::string, int64_t> by_tenant_;
};

}  // namespace tutel::daemon
