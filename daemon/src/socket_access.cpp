#include "socket_access.hpp"

#include <grp.h>
#include <pwd.h>

#include <algorithm>
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

// Whether a process of `uid` (none: any uid but the owner's) in `groups` has every permission
// bit of `need` (a 0–7 triple) on `file`, by the owner, group or other class (root: always).
bool allows(const FileAccess& file, std::optional<uint32_t> uid, const std::vector<gid_t>& groups, uint32_t need) {
  if (uid && *uid == 0) return true;
  const auto has = [&](uint32_t shift) { return ((file.mode >> shift) & need) == need; };
  if (uid && *uid == file.owner_uid) return has(6);
  if (std::find(groups.begin(), groups.end(), file.group_gid) != groups.end()) return has(3);
  return has(0);
}

}  // namespace

std::vector<std::string> tenants_kept_out(const SocketAccess& access, const std::vector<TenantConfig>& tenants) {
  std::vector<std::string> warnings;
  const std::string where = "client_socket (mode " + octal(access.socket.mode) + ", group " +
                            group_name(access.socket.group_gid) + "; its directory mode " +
                            octal(access.directory.mode) + ", group " + group_name(access.directory.group_gid) + ")";
  const std::string remedy = "set client_socket_group to a group its processes are in, or client_socket_mode = "
                             "\"0666\" (the daemon still serves only the tenants' users), and let them search the "
                             "socket's directory";
  const auto reaches = [&](std::optional<uint32_t> uid, const std::vector<gid_t>& groups) {
    return allows(access.directory, uid, groups, 01) && allows(access.socket, uid, groups, 06);
  };
  for (const TenantConfig& t : tenants) {
    for (const uint32_t uid : t.uids) {
      const auto user = user_groups(uid);
      if (!user) continue;  // its groups are unknown here
      if (!reaches(uid, user->second))
        warnings.push_back("tenant '" + t.name + "': uid " + std::to_string(uid) + " (" + user->first +
                           ") cannot connect to " + where + ": " + remedy);
    }
    for (const uint32_t gid : t.gids)
      if (!reaches(std::nullopt, {static_cast<gid_t>(gid)}))
        warnings.push_back("tenant '" + t.name + "': processes of gid " + group_name(gid) + " cannot connect to " +
                           where + " unless they run as its owner or are in its groups: " + remedy);
  }
  return warnings;
}

}  // namespace tutel::daemon
