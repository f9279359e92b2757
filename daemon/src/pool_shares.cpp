#include "pool_shares.hpp"

#include <algorithm>
#include <cassert>

namespace tutel::daemon {

PoolShares::PoolShares(int64_t capacity) : capacity_(std::max<int64_t>(1, capacity)) {}

int64_t PoolShares::in_use(const std::string& tenant) const {
  const auto it = by_tenant_.find(tenant);
  return it == by_tenant_.end() ? 0 : it->second;
}

int64_t PoolShares::share(size_t active) const {
  return std::max<int64_t>(1, capacity_ / static_cast<int64_t>(std::max<size_t>(1, active)));
}

bool PoolShares::may_take(const std::string& tenant, const std::vector<std::string>& others) const {
  if (total_ >= capacity_) return false;
  const int64_t mine_share = share(1 + others.size());
  if (in_use(tenant) < mine_share) return true;
  // Beyond its share: only what the others' unused reservations leave free.
  int64_t reserved_for_others = 0;
  for (const std::string& t : others) reserved_for_others += std::max<int64_t>(0, mine_share - in_use(t));
  return capacity_ - total_ - 1 >= reserved_for_others;
}

void PoolShares::take(const std::string& tenant) {
  ++by_tenant_[tenant];
  ++total_;
}

void PoolShares::give_back(const std::string& tenant) {
  auto it = by_tenant_.find(tenant);
  assert(it != by_tenant_.end() && it->second > 0);
  if (it == by_tenant_.end()) return;
  --total_;
  if (--it->second == 0) by_tenant_.erase(it);
}

}  // namespace tutel::daemon
