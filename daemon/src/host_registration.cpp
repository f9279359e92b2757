#include "host_registration.hpp"

#include <mutex>
#include <utility>

#include "tutel/core/logging.hpp"

namespace tutel::daemon {

HostRegistration& HostRegistration::operator=(HostRegistration&& o) noexcept {
  if (this != &o) {
    reset();
    ranks_ = std::exchange(o.ranks_, {});
    data_ = std::exchange(o.data_, nullptr);
    what_ = std::exchange(o.what_, {});
    tenant_ = std::exchange(o.tenant_, {});
  }
  return *this;
}

HostRegistration HostRegistration::register_with(const std::vector<std::unique_ptr<Rank>>& ranks,
                                                 const std::string& tenant, void* data, size_t bytes,
                                                 std::string what) {
  HostRegistration r;
  r.data_ = data;
  r.what_ = std::move(what);
  r.tenant_ = tenant;
  for (const std::unique_ptr<Rank>& rank : ranks) {
    Status st;
    {
      FairLock::Seat seat(rank->lock, tenant);
      std::lock_guard lock(seat);
      st = rank->backend->register_host(data, bytes);
    }
    if (st.ok()) {
      r.ranks_.push_back(rank.get());
    } else {
      TUTEL_LOG(WARN) << "rank " << rank->index << " (" << rank->backend->name()
                      << "): cannot register " << r.what_ << " (" << bytes
                      << " bytes) for fast transfers: " << st
                      << "; its copies take the slower path";
    }
  }
  return r;
}

void HostRegistration::reset() {
  for (Rank* rank : ranks_) {
    Status st;
    {
      FairLock::Seat seat(rank->lock, tenant_);
      std::lock_guard lock(seat);
      st = rank->backend->unregister_host(data_);
    }
    if (!st.ok())
      TUTEL_LOG(WARN) << "rank " << rank->index << " (" << rank->backend->name()
                      << "): unregistering " << what_ << " failed: " << st;
  }
  ranks_.clear();
  data_ = nullptr;
}

}  // namespace tutel::daemon
