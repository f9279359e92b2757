// Runs a request's work so that an exception fails that request instead of the daemon.
//
// Layer ops return Status, but host allocations the tenant's quota does not see (a layer's
// initial values drawn on the host, a checkpoint staged in host memory, containers growing) may
// throw std::bad_alloc; on a pool thread or a session's worker an escaping exception would call
// std::terminate and take every tenant's layers with it, unsaved.
#pragma once

#include <exception>
#include <new>
#include <string>

#include "tutel/core/status.hpp"

namespace tutel::daemon {

template <typename Fn>
auto guarded(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted(
        "tuteld ran out of host memory serving this request; try a smaller request or layer, or ask the "
        "operator to give the daemon more memory");
  } catch (const std::exception& e) {
    return Status::Internal(std::string("tuteld failed serving this request (") + e.what() +
                            "); please report it with the daemon's log");
  }
}

}  // namespace tutel::daemon
