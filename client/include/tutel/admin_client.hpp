// libtutel_client, admin side: requests on tuteld's admin socket (mode 0600, the operator's),
// as used by tutelctl. Replies are the daemon's JSON bodies, returned as text.
//
// Thread-safety: one AdminClient is used by one thread at a time.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "tutel/core/status.hpp"

namespace tutel::client {

class AdminClient {
 public:
  // Connects to the admin socket. `timeout` bounds every later reply (negative: none).
  static Result<AdminClient> connect(const std::string& admin_socket_path,
                                     std::chrono::milliseconds timeout = std::chrono::seconds(60));

  AdminClient(AdminClient&&) noexcept;
  AdminClient& operator=(AdminClient&&) noexcept;
  ~AdminClient();

  Result<std::string> status();   // {"version", "pid", "uptime_seconds", "backend", ...}
  Result<std::string> tenants();  // {"tenants": [...]}
  Result<std::string> layers();   // {"layers": [...]}
  Result<std::string> metrics();  // {"text": Prometheus exposition text}
  Result<std::string> peers();    // {"groups": [{tenant, layer, coordinator, name, rank, size, state, last_error}]}
  // Saves `layer` ("tenant/name") to `path`, as the daemon's process sees it (use an absolute
  // path). Waits without the timeout: large layers take a while. {"path": str}
  Result<std::string> checkpoint(std::string_view layer, std::string_view path);
  // Pins (or unpins) `layer` ("tenant/name"): a pinned layer's cached plans are not dropped to
  // make room for its tenant's other requests. {"layer": str, "pinned": bool}
  Result<std::string> pin(std::string_view layer, bool pinned);
  // Destroys `layer` ("tenant/name") as its client's destroy would: its parameters, plans and
  // checkpoint in state_dir go, and its clients' handles answer NotFound. Waits without the
  // timeout for the layer's control requests before it (a group layer's step may take the
  // group's collective timeout). {"layer": str}
  Result<std::string> destroy(std::string_view layer);
  // Starts (or ends) draining: the daemon takes no new client sessions and creates no layers;
  // the sessions it has go on. {"draining": bool, "sessions": int}
  Result<std::string> drain(bool draining);
  // The client sessions: {"sessions": [{"id", "tenant", "pid", "uid", "client",
  // "connected_seconds", "control_frames_waiting"}]}
  Result<std::string> sessions();

  const std::string& socket_path() const;
  // Whether the last request failed in the connection (tuteld closed it, a send or a receive
  // failed, a reply could not be read) rather than with tuteld's own error answer: "cannot
  // reach tuteld" is only true of the first.
  bool connection_failed() const;

 private:
  struct Impl;
  explicit AdminClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tutel::client
