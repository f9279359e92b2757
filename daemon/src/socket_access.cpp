#include "socket_access.hpp"

#include <grp.h>
#include <pwd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <optional>

namespace tutel::daemon {
namespace {

std::string octal(uint32_t mode) {
  char text[8];
  std::snprintf(text, sizeof text, "%04o", mode & 0777);
  return text;
}

std::string group_name(uint32_t gid) {
  group entry{}, *found = nullptr;
  std::vector<char> buffer(16384);
  if (::getgrgid_r(gid, &entry, buffer.data(), buffer.size(), &found) == 0 && found != nullptr)
    return std::to_string(gid) + " (" + found->gr_name + ")";
  return std::to_string(gid);
}

// The user's name and groups (its primary one first) from the passwd and group databases; none
// where the uid has no passwd entry (its processes' groups cannot be known here).
std::optional<std::pair<std::string, std::vector<gid_t>>> user_groups(uint32_t uid) {
  passwd entry{}, *found = nullptr;
  std::vector<char> buffer(16384);
  if (::getpwuid_r(uid, &entry, buffer.data(), buffer.size(), &found) != 0 || found == nullptr) return std::nullopt;
  std::vector<gid_t> groups(64);
  int n = static_cast<int>(groups.size());
  while (::getgrouplist(found->pw_name, found->pw_gid, groups.data(), &n) < 0 && n > static_cast<int>(groups.size()))
    groups.resize(static_cast<size_t>(n));
  groups.resize(static_cast<size_t>(std::max(n, 0)));
  return std::make_pair(std::string(found->pw_name), std::move(groups));
}

}  // namespace

std::vector<std::string> tenants_kept_out(const SocketAccess& socket, const std::vector<TenantConfig>& tenants) {
  std::vector<std::string> warnings;
  if ((socket.mode & 0006) == 0006) return warnings;  // everyone may connect
  const bool group_may = (socket.mode & 0060) == 0060;
  const std::string where = "client_socket (mode " + octal(socket.mode) + ", group " + group_name(socket.group_gid) + ")";
  const std::string remedy = "set client_socket_group to a group its processes are in, or client_socket_mode = "
                             "\"0666\" (the daemon still serves only the tenants' users)";
  for (const TenantConfig& t : tenants) {
    for (const uint32_t uid : t.uids) {
      if (uid == 0 || uid == socket.owner_uid) continue;  // root passes; the owner has rw in every mode offered
      const auto user = user_groups(uid);
      if (!user) continue;
      if (group_may && std::find(user->second.begin(), user->second.end(), socket.group_gid) != user->second.end())
        continue;
      warnings.push_back("tenant '" + t.name + "': uid " + std::to_string(uid) + " (" + user->first +
                         ") cannot connect to " + where + ": " + remedy);
    }
    for (const uint32_t gid : t.gids) {
      if (group_may && gid == socket.group_gid) continue;
      warnings.push_back("tenant '" + t.name + "': processes of gid " + group_name(gid) + " can connect to " + where +
                         " only as the daemon's user or " + (group_may ? "as members of its group" : "root") + ": " +
                         remedy);
    }
  }
  return warnings;
}

}  // namespace tutel::daemon
