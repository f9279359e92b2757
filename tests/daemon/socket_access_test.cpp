// Which tenants' users the client socket's mode and group, and its directory's, keep out
// (socket_access.hpp), with the users and groups of this machine's databases: root (uid 0), and
// nobody (uid 65534, whose group is 65534 and who is in no other group on Debian).
#include "socket_access.hpp"

#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>

#include <gtest/gtest.h>

#include <filesystem>

#include "tutel/ipc/socket.hpp"

namespace tutel::daemon {
namespace {

TenantConfig tenant(std::string name, std::vector<uint32_t> uids, std::vector<uint32_t> gids = {}) {
  TenantConfig t;
  t.name = std::move(name);
  t.uids = std::move(uids);
  t.gids = std::move(gids);
  return t;
}

// A socket of `owner`, `group`, `mode` in /srv/tuteld (root's, `dir_mode`), under / and /srv.
SocketAccess socket_of(uint32_t owner, uint32_t group, uint32_t mode, uint32_t dir_mode = 0755) {
  return {FileAccess{owner, group, mode},
          {{"/", FileAccess{0, 0, 0755}}, {"/srv", FileAccess{0, 0, 0755}}, {"/srv/tuteld", FileAccess{0, 0, dir_mode}}}};
}

class SocketAccessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const passwd* nobody = ::getpwuid(65534);
    if (nobody == nullptr || nobody->pw_gid != 65534)
      GTEST_SKIP() << "this machine has no user 65534 whose group is 65534";
    int n = 8;
    gid_t groups[8];
    if (::getgrouplist(nobody->pw_name, nobody->pw_gid, groups, &n) != 1 || ::getgrgid(4242) != nullptr)
      GTEST_SKIP() << "user 65534 is in other groups here, or group 4242 exists";
  }
};

TEST_F(SocketAccessTest, AUserOutsideTheSocketsGroupIsNamedWithWhatToSet) {
  const std::vector<TenantConfig> tenants{tenant("ops", {0}), tenant("team-b", {65534})};
  const auto warnings = tenants_kept_out(socket_of(0, 0, 0660), tenants);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("tenant 'team-b': uid 65534 (nobody) cannot connect to client_socket (mode 0660, group 0"),
            std::string::npos)
      << warnings[0];
  EXPECT_NE(warnings[0].find("client_socket_group"), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[0].find("client_socket_mode = \"0666\""), std::string::npos) << warnings[0];
}

TEST_F(SocketAccessTest, AUserInTheSocketsGroupOrASocketForEveryoneGetsIn) {
  const std::vector<TenantConfig> tenants{tenant("team-b", {65534}, {65534})};
  EXPECT_TRUE(tenants_kept_out(socket_of(0, 65534, 0660), tenants).empty());
  EXPECT_TRUE(tenants_kept_out(socket_of(0, 0, 0666), tenants).empty());
  EXPECT_TRUE(tenants_kept_out(socket_of(65534, 0, 0600), {tenant("own", {65534})}).empty()) << "the socket's owner";
  // Root passes any mode; a user without a passwd entry cannot be judged here and is not named.
  EXPECT_TRUE(tenants_kept_out(socket_of(4242, 4242, 0600, 0700), {tenant("root", {0}), tenant("ghost", {4242424})})
                  .empty());
}

// Connecting needs search permission in every directory on the way (a socket inside a new,
// private state_dir, or in a directory made under umask 077): the one that blocks is named, and
// a mode that is already 0666 is not suggested again.
TEST_F(SocketAccessTest, ADirectoryOnTheWayTheUserCannotSearchIsNamed) {
  SocketAccess access = socket_of(0, 0, 0666);
  access.directories[1].second.mode = 0700;  // /srv
  const auto warnings = tenants_kept_out(access, {tenant("team-b", {65534})});
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("tenant 'team-b': uid 65534 (nobody) cannot search the directory /srv (mode 0700"),
            std::string::npos)
      << warnings[0];
  EXPECT_NE(warnings[0].find("not inside it"), std::string::npos) << warnings[0];
  EXPECT_EQ(warnings[0].find("client_socket_mode"), std::string::npos) << warnings[0];
  EXPECT_EQ(tenants_kept_out(socket_of(0, 0, 0666, 0700), {tenant("team-b", {65534})}).size(), 1u);
  EXPECT_TRUE(tenants_kept_out(socket_of(0, 0, 0666, 0711), {tenant("team-b", {65534})}).empty()) << "x alone";
}

TEST_F(SocketAccessTest, AGroupOtherThanTheSocketsIsNamed) {
  const auto warnings = tenants_kept_out(socket_of(0, 0, 0660), {tenant("team-g", {}, {4242})});
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("tenant 'team-g': processes of gid 4242 (unless in another group that may) cannot connect "
                             "to client_socket (mode 0660, group 0"),
            std::string::npos)
      << warnings[0];
  // Under 0600 even the socket's own group is kept out.
  EXPECT_EQ(tenants_kept_out(socket_of(0, 4242, 0600), {tenant("team-g", {}, {4242})}).size(), 1u);
  EXPECT_TRUE(tenants_kept_out(socket_of(0, 4242, 0660), {tenant("team-g", {}, {4242})}).empty());
}

// What the daemon judges: the socket as it is and every directory on the way, "/" first.
TEST(SocketAccessOf, ReadsTheSocketAndEveryDirectoryOnTheWay) {
  char tmpl[] = "/tmp/tutel-access-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = std::string(tmpl) + "/private";
  ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
  ASSERT_EQ(::chmod(dir.c_str(), 0700), 0);
  const std::string path = dir + "/client.sock";
  auto listener = ipc::listen_unix(path, 0666);  // as the daemon makes it
  ASSERT_TRUE(listener.ok()) << listener.status();
  const auto access = socket_access_of(path);
  ASSERT_TRUE(access.has_value());
  EXPECT_EQ(access->socket.mode, 0666u);
  EXPECT_EQ(access->socket.owner_uid, ::geteuid());
  ASSERT_EQ(access->directories.size(), 4u);  // /, /tmp, the temporary directory, private
  EXPECT_EQ(access->directories.front().first, "/");
  EXPECT_EQ(access->directories.back().first, dir);
  EXPECT_EQ(access->directories.back().second.mode, 0700u);
  EXPECT_FALSE(socket_access_of(dir + "/absent.sock").has_value());
  std::error_code ec;
  std::filesystem::remove_all(tmpl, ec);
}

}  // namespace
}  // namespace tutel::daemon
