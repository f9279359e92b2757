#include "socket_access.hpp"

#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
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

std::optional<FileAccess> access_of(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return FileAccess{static_cast<uint32_t>(st.st_uid), static_cast<uint32_t>(st.st_gid),
                    static_cast<uint32_t>(st.st_mode & 0777)};
}

}  // namespace

std::optional<SocketAccess> socket_access_of(const std::string& path) {
  const auto socket = access_of(path);
  if (!socket) return std::nullopt;
  SocketAccess access{*socket, {}};
  std::filesystem::path on_the_way;
  for (const std::filesystem::path& part : std::filesystem::path(path).parent_path()) {  // "/" first
    on_the_way /= part;
    if (const auto dir = access_of(on_the_way.string())) access.directories.emplace_back(on_the_way.string(), *dir);
  }
  return access;
}

std::vector<std::string> tenants_kept_out(const SocketAccess& access, const std::vector<TenantConfig>& tenants) {
  std::vector<std::string> warnings;
  // Why a process of `uid` (none: of any uid but an owner's) in `groups` cannot connect, or "".
  const auto why_out = [&](std::optional<uint32_t> uid, const std::vector<gid_t>& groups) -> std::string {
    for (const auto& [path, dir] : access.directories)
      if (!allows(dir, uid, groups, 01))
        return "cannot search the directory " + path + " (mode " + octal(dir.mode) + ", group " +
               group_name(dir.group_gid) + ") on the way to client_socket: put the socket in a directory its "
               "users can search (state_dir is private: not inside it)";
    if (!allows(access.socket, uid, groups, 06))
      return "cannot connect to client_socket (mode " + octal(access.socket.mode) + ", group " +
             group_name(access.socket.group_gid) + "): set client_socket_group to a group its processes are in" +
             ((access.socket.mode & 0006) == 0006 ? std::string()
                                                  : ", or client_socket_mode = \"0666\" (the daemon still serves "
                                                    "only the tenants' users)");
    return "";
  };
  for (const TenantConfig& t : tenants) {
    for (const uint32_t uid : t.uids) {
      const auto user = user_groups(uid);
      if (!user) continue;  // its groups are unknown here
      if (const std::string why = why_out(uid, user->second); !why.empty())
        warnings.push_back("tenant '" + t.name + "': uid " + std::to_string(uid) + " (" + user->first + ") " + why);
    }
    for (const uint32_t gid : t.gids)
      if (const std::string why = why_out(std::nullopt, {static_cast<gid_t>(gid)}); !why.empty())
        warnings.push_back("tenant '" + t.name + "': processes of gid " + group_name(gid) +
                           " (unless in another group that may) " + why);
  }
  return warnings;
}

}  // namespace tutel::daemon
