// Whether the tenants' users can reach the client socket at all. The daemon maps a client to
// its tenant by credentials once it has connected; the socket's mode and group, and its
// directory's, decide who may connect first, and a tenant whose users they keep out sees only
// "permission denied" from its client (the second tenant of examples/tuteld.toml did: the
// socket was root's group, 0660).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tutel/daemon/config.hpp"

namespace tutel::daemon {

// A file's owner, group and permission bits.
struct FileAccess {
  uint32_t owner_uid = 0, group_gid = 0;
  uint32_t mode = 0;
};

struct SocketAccess {
  FileAccess socket{0, 0, 0660};
  // Every directory on the way to it, "/" first: connecting needs search (x) in each.
  std::vector<std::pair<std::string, FileAccess>> directories;
};

// The socket at `path` (absolute) and every directory on the way, as they are now; none where
// the socket cannot be inspected.
std::optional<SocketAccess> socket_access_of(const std::string& path);

// A warning for each tenant uid kept out (by its passwd entry's groups), and each tenant gid
// whose processes get in only by another group; none where every one gets in.
std::vector<std::string> tenants_kept_out(const SocketAccess& access, const std::vector<TenantConfig>& tenants);

}  // namespace tutel::daemon
