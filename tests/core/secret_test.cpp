// SHA-256 and HMAC-SHA256 against the standards' vectors (FIPS 180-2 appendix B, RFC 4231) and
// Python's hashlib (the padding boundaries), the constant-time comparison, and secret files,
// malformed ones included.
#include "tutel/core/secret.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>

namespace tutel {
namespace {

std::string hex(const Digest& d) {
  std::string out;
  char b[3];
  for (uint8_t v : d) {
    std::snprintf(b, sizeof b, "%02x", v);
    out += b;
  }
  return out;
}

TEST(Sha256, StandardVectors) {
  EXPECT_EQ(hex(sha256("")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(hex(sha256("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex(sha256("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(hex(sha256(std::string(1000000, 'a'))),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// Lengths around the 56-byte padding boundary and the 64-byte block (Python's hashlib).
TEST(Sha256, PaddingBoundaries) {
  const std::pair<size_t, const char*> cases[] = {
      {55, "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318"},
      {56, "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a"},
      {63, "7d3e74a05d7db15bce4ad9ec0658ea98e3f06eeecf16b4c6fff2da457ddc2f34"},
      {64, "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"},
      {65, "635361c48bb9eab14198e76ea8ab7f1a41685d6ad62aa9146d301d4f17eb0ae0"},
      {119, "31eba51c313a5c08226adf18d4a359cfdfd8d2e816b13f4af952f7ea6584dcfb"},
      {120, "2f3d335432c70b580af0e8e1b3674a7c020d683aa5f73aaaedfdc55af904c21c"}};
  for (const auto& [n, expected] : cases) EXPECT_EQ(hex(sha256(std::string(n, 'a'))), expected) << n;
}

TEST(Sha256, AnySplitOfTheInputGivesTheSameDigest) {
  std::mt19937 rng(std::random_device{}());
  std::string data(1000 + rng() % 1000, '\0');
  for (char& c : data) c = static_cast<char>(rng());
  const Digest whole = sha256(data);
  for (int trial = 0; trial < 50; ++trial) {
    Sha256 h;
    size_t at = 0;
    while (at < data.size()) {
      const size_t n = std::min<size_t>(data.size() - at, rng() % 150);
      h.update(data.data() + at, n);
      at += n;
    }
    EXPECT_EQ(h.finish(), whole);
  }
}

TEST(HmacSha256, Rfc4231Vectors) {
  EXPECT_EQ(hex(hmac_sha256(std::string(20, '\x0b'), {"Hi There"})),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  EXPECT_EQ(hex(hmac_sha256("Jefe", {"what do ya want ", "for nothing?"})),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  // A key longer than the block is hashed first.
  EXPECT_EQ(hex(hmac_sha256(std::string(131, '\xaa'), {"Test Using Larger Than Block-Size Key - Hash Key First"})),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
  // A key of exactly one block is used as it is (Python's hmac).
  EXPECT_EQ(hex(hmac_sha256(std::string(64, 'k'), {"exactly a block of key"})),
            "d4229b87e09c5dba84a00e3679ece32b5de4bb58a64d28afe3800adb898c6920");
}

TEST(Hex, TwoLowercaseDigitsPerByte) {
  EXPECT_EQ(to_hex(""), "");
  EXPECT_EQ(to_hex(std::string("\x00\x01\x7f\x80\xff", 5)), "00017f80ff");
  EXPECT_EQ(to_hex("tutel"), "747574656c");
}

TEST(ConstantTimeEqual, ComparesContentsAndLengths) {
  EXPECT_TRUE(constant_time_equal("", ""));
  EXPECT_TRUE(constant_time_equal("secret-secret-16", "secret-secret-16"));
  EXPECT_FALSE(constant_time_equal("secret-secret-16", "secret-secret-17"));
  EXPECT_FALSE(constant_time_equal("Secret-secret-16", "secret-secret-16"));
  EXPECT_FALSE(constant_time_equal("", "x"));
  EXPECT_FALSE(constant_time_equal(std::string_view("ab\0", 3), std::string_view("ab", 2)));
}

class SecretFile : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("tutel-secret-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& content, mode_t mode) {
    const std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << content;
    EXPECT_EQ(::chmod(path.c_str(), mode), 0);
    return path;
  }
  std::filesystem::path dir_;
};

TEST_F(SecretFile, ReadsTheSecretWithoutItsTrailingNewline) {
  const std::string secret = "0123456789abcdef-a-long-enough-secret";
  auto read = read_secret_file(write("s", secret + "\n", 0600), "test secret_file");
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_EQ(*read, secret);
  // Group-readable is allowed (a tenant's group shares it); binary content is kept as it is.
  const std::string binary("\x01\x00\xff\n secret bytes!!", 19);
  read = read_secret_file(write("b", binary + "\r\n", 0640), "test secret_file");
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_EQ(*read, binary);
}

TEST_F(SecretFile, RefusesFilesOthersCanReadOrChange) {
  for (mode_t mode : {0644, 0604, 0602, 0660, 0601}) {
    auto read = read_secret_file(write("s", "0123456789abcdef0123", mode), "tenant 'a' secret_file");
    ASSERT_FALSE(read.ok()) << std::oct << mode;
    EXPECT_EQ(read.status().code(), StatusCode::kPermissionDenied);
    EXPECT_NE(read.status().message().find("tenant 'a' secret_file '"), std::string::npos) << read.status().to_string();
    EXPECT_NE(read.status().message().find("chmod o-rwx,g-w"), std::string::npos) << read.status().to_string();
  }
}

TEST_F(SecretFile, RefusesSecretsTooShortTooLongMissingOrNotFiles) {
  for (const std::string& content : {std::string(), std::string("short\n"), std::string(15, 'x') + "\n\n",
                                     std::string(4097, 'x'), std::string(1 << 20, 'x')}) {
    auto read = read_secret_file(write("s", content, 0600), "secret_file");
    ASSERT_FALSE(read.ok()) << content.size();
    EXPECT_EQ(read.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(read.status().message().find("a secret is 16 to 4096 bytes"), std::string::npos)
        << read.status().to_string();
  }
  EXPECT_TRUE(read_secret_file(write("s", std::string(16, 'x'), 0600), "secret_file").ok());
  EXPECT_TRUE(read_secret_file(write("s", std::string(4096, 'x') + "\n", 0400), "secret_file").ok());
  auto missing = read_secret_file((dir_ / "none").string(), "secret_file");
  EXPECT_EQ(missing.status().code(), StatusCode::kIOError);
  EXPECT_NE(missing.status().message().find("No such file"), std::string::npos) << missing.status().to_string();
  // A FIFO is refused at once rather than waited on (nothing will ever write it).
  const std::string fifo = (dir_ / "fifo").string();
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto from_fifo = read_secret_file(fifo, "secret_file");
  EXPECT_EQ(from_fifo.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(from_fifo.status().message().find("not a regular file"), std::string::npos);
  auto directory = read_secret_file(dir_.string(), "secret_file");
  EXPECT_EQ(directory.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(directory.status().message().find("not a regular file"), std::string::npos);
}

}  // namespace
}  // namespace tutel
