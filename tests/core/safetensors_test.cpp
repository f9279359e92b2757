#include "tutel/core/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <ios>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <system_error>
#include <tuple>
#include <vector>

#include "../common/socket_file.hpp"
#include "tutel/core/logging.hpp"
#include "tutel/core/shared_memory.hpp"

namespace tutel {
namespace {

namespace fs = std::filesystem;

// A fresh directory under /tmp, removed with everything in it at the end of the test.
class TempDir {
 public:
  TempDir() {
    char name[] = "/tmp/tutel_core_test_XXXXXX";
    const char* made = ::mkdtemp(name);
    if (made == nullptr) std::abort();
    path_ = made;
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string le64(uint64_t v) {
  std::string out(8, '\0');
  std::memcpy(out.data(), &v, 8);  // the host is little-endian, as the format
  return out;
}

// A file image: length prefix, header text as given, data bytes.
std::string image(std::string_view header, std::string_view data = {}) {
  return le64(header.size()) + std::string(header) + std::string(data);
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  return names;
}

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  std::string file(const std::string& name) const { return dir_.path() + "/" + name; }
  TempDir dir_;
};

// ---- round trip ----

struct Owned {
  std::string name;
  DType dtype;
  Shape shape;
  std::vector<uint8_t> bytes;
};

Owned random_tensor(std::mt19937_64& rng, std::string name, DType dtype, Shape shape) {
  Owned t{std::move(name), dtype, shape, {}};
  t.bytes.resize(static_cast<size_t>(shape.numel()) * dtype_size(dtype));
  for (uint8_t& b : t.bytes) b = static_cast<uint8_t>(rng());
  return t;
}

std::vector<SafetensorsEntry> entries_of(const std::vector<Owned>& owned) {
  std::vector<SafetensorsEntry> out;
  out.reserve(owned.size());
  for (const Owned& t : owned)
    out.push_back({t.name, t.dtype, t.shape, t.bytes.empty() ? nullptr : t.bytes.data()});
  return out;
}

TEST_F(SafetensorsTest, RoundTripsDTypesShapesAndMetadata) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  // Listed by descending element size, so every tensor lands aligned to its own size.
  const std::vector<Owned> owned = {
      random_tensor(rng, "experts.w1", DType::kF64, {2, 3}),
      random_tensor(rng, "step", DType::kI64, {}),  // a scalar: rank 0, one element
      random_tensor(rng, "gate.weight", DType::kF32, {16, 8}),
      random_tensor(rng, "counts", DType::kI32, {5}),
      random_tensor(rng, "empty", DType::kF32, {0, 7}),
      random_tensor(rng, "experts.w2", DType::kBF16, {3, 2, 5}),
      random_tensor(rng, "bias", DType::kF16, {9}),
      random_tensor(rng, "mask", DType::kU8, {1, 2, 1, 3, 1, 1}),  // rank kMaxDims
      random_tensor(rng, "also_empty", DType::kU8, {0}),
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                       {"note", "ünïcödé, \"quotes\""}};
  const std::string path = file("model.safetensors");
  ASSERT_TRUE(write_safetensors(path, entries_of(owned), metadata).ok());
  EXPECT_EQ(list_dir(dir_.path()), std::vector<std::string>{"model.safetensors"});

  Result<SafetensorsFile> opened = SafetensorsFile::open(path);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const SafetensorsFile& f = *opened;
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.metadata(), metadata);
  ASSERT_EQ(f.tensors().size(), owned.size());
  for (size_t i = 0; i < owned.size(); ++i) {
    SCOPED_TRACE(owned[i].name);
    const SafetensorsTensor& t = f.tensors()[i];  // file order is the order written
    EXPECT_EQ(t.name, owned[i].name);
    EXPECT_EQ(t.dtype, owned[i].dtype);
    EXPECT_EQ(t.shape, owned[i].shape);
    ASSERT_EQ(t.nbytes, owned[i].bytes.size());
    if (t.nbytes > 0) {
      EXPECT_EQ(std::memcmp(t.data, owned[i].bytes.data(), t.nbytes), 0);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data) % dtype_size(t.dtype), 0u);
    }
    EXPECT_EQ(f.find(owned[i].name), &t);

    const TensorView v = t.view();
    EXPECT_EQ(v.data(), t.data);
    EXPECT_EQ(v.dtype(), t.dtype);
    EXPECT_EQ(v.shape(), t.shape);
    EXPECT_EQ(v.nbytes(), t.nbytes);
    EXPECT_TRUE(v.is_contiguous());
    EXPECT_EQ(v.device(), Device{});
  }
  // The reference reader insists that tensors tile the data section exactly, with no gap.
  const std::string bytes = read_file(path);
  const auto* end = static_cast<const char*>(f.tensors().front().data);
  for (const SafetensorsTensor& t : f.tensors()) {
    EXPECT_EQ(static_cast<const char*>(t.data), end) << t.name;
    end = static_cast<const char*>(t.data) + t.nbytes;
  }
  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes.data(), 8);
  EXPECT_EQ(end - static_cast<const char*>(f.tensors().front().data),
            static_cast<ptrdiff_t>(bytes.size() - 8 - header_size));
  EXPECT_EQ(bytes[8], '{');
  EXPECT_EQ(f.find("absent"), nullptr);
  EXPECT_EQ(f.find(""), nullptr);
  EXPECT_EQ(f.find("__metadata__"), nullptr);
}

TEST_F(SafetensorsTest, WriterPadsHeaderSoDataIsAligned) {
  const float values[3] = {1.0f, -2.5f, 3.25f};
  const std::string path = file("aligned.safetensors");
  for (const std::string name : {"a", "ab", "abc", "abcd", "abcde", "abcdef", "abcdefg"}) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(write_safetensors(path, {{name, DType::kF32, {3}, values}}).ok());
    const std::string bytes = read_file(path);
    ASSERT_GE(bytes.size(), 8u);
    uint64_t header_size = 0;
    std::memcpy(&header_size, bytes.data(), 8);
    EXPECT_EQ(header_size % 8, 0u);
    ASSERT_EQ(bytes.size(), 8 + header_size + sizeof(values));
    EXPECT_EQ(std::memcmp(bytes.data() + 8 + header_size, values, sizeof(values)), 0);
    Result<SafetensorsFile> f = SafetensorsFile::open(path);
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(f->tensors()[0].data) % 8, 0u);
    EXPECT_EQ(f->tensors()[0].view().data_as<const float>()[1], -2.5f);
  }
}

TEST_F(SafetensorsTest, EmptyFileAndNoMetadata) {
  const std::string path = file("empty.safetensors");
  ASSERT_TRUE(write_safetensors(path, {}).ok());
  Result<SafetensorsFile> f = SafetensorsFile::open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE(f->tensors().empty());
  EXPECT_TRUE(f->metadata().empty());
  EXPECT_FALSE(contains(read_file(path), "__metadata__"));
}

TEST_F(SafetensorsTest, WriteReplacesExistingFileAndLeavesNoTemporaries) {
  const std::string path = file("w.safetensors");
  const int32_t first[2] = {1, 2};
  const int32_t second[3] = {7, 8, 9};
  ASSERT_TRUE(write_safetensors(path, {{"x", DType::kI32, {2}, first}}).ok());
  ASSERT_TRUE(write_safetensors(path, {{"y", DType::kI32, {3}, second}}, {{"v", "2"}}).ok());
  EXPECT_EQ(list_dir(dir_.path()), std::vector<std::string>{"w.safetensors"});
  Result<SafetensorsFile> f = SafetensorsFile::open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->find("x"), nullptr);
  ASSERT_NE(f->find("y"), nullptr);
  EXPECT_EQ(std::memcmp(f->find("y")->data, second, sizeof(second)), 0);
  EXPECT_EQ(f->metadata().at("v"), "2");
}

// An existing path must be a regular file: a symbolic link, a FIFO, a socket or a directory
// stays as it was (a rename would have replaced it: an operator's checkpoint to /dev/null
// replaced the device node), with nothing written beside it. The file that replaces a regular
// one is never more open than it (a private file stays private under any umask), nor than a
// new file.
TEST_F(SafetensorsTest, WriteReplacesOnlyARegularFileAndKeepsItsMode) {
  const int32_t value[2] = {3, 4};
  const std::vector<SafetensorsEntry> tensors{{"x", DType::kI32, {2}, value}};
  const std::string target = file("target.txt"), link = file("link"), fifo = file("fifo"), sub = file("sub");
  {
    std::ofstream out(target);
    out << "keep me";
  }
  ASSERT_EQ(::symlink(target.c_str(), link.c_str()), 0);
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  ASSERT_EQ(::mkdir(sub.c_str(), 0700), 0);
  const std::string sock = file("sock");
  ASSERT_EQ(testing::make_socket_file(sock), 0);
  for (const auto& [path, kind] : std::vector<std::pair<std::string, std::string>>{
           {link, "a symbolic link"}, {fifo, "a FIFO"}, {sub, "a directory"}, {sock, "a socket"}}) {
    const Status st = write_safetensors(path, tensors);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << path << ": " << st;
    EXPECT_NE(st.message().find("it exists and is " + kind), std::string_view::npos) << st;
    EXPECT_NE(st.message().find("nothing was written"), std::string_view::npos) << st;
  }
  struct stat st {};
  ASSERT_EQ(::lstat(link.c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));
  ASSERT_EQ(::lstat(fifo.c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  ASSERT_EQ(::lstat(sub.c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  std::ifstream in(target);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), "keep me");
  ASSERT_EQ(::lstat(sock.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  std::vector<std::string> names = list_dir(dir_.path());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"fifo", "link", "sock", "sub", "target.txt"}));

  // A private file stays private, whatever the umask says of new files; and the new file is
  // never more open than a new file would be (a file placed there 0666 gives no 0666 checkpoint).
  for (const auto& [old_mode, umask_bits, expected] : std::vector<std::tuple<mode_t, mode_t, mode_t>>{
           {0600, 022, 0600}, {0640, 022, 0640}, {0604, 022, 0604}, {0666, 022, 0644}, {0644, 077, 0600}}) {
    ASSERT_EQ(::chmod(target.c_str(), old_mode), 0);
    const mode_t umask_was = ::umask(umask_bits);
    const Status written = write_safetensors(target, tensors);
    ::umask(umask_was);
    ASSERT_TRUE(written.ok()) << written;
    ASSERT_EQ(::stat(target.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, expected) << std::oct << old_mode << " under umask " << umask_bits;
    EXPECT_TRUE(SafetensorsFile::open(target).ok());
  }
  // The owner is not carried (a root daemon giving its file away let that user swap it in a
  // sticky directory): the new file is this process's; the group is carried, so a 0640 file
  // is not opened to this process's own group.
  if (::geteuid() == 0) {
    ASSERT_EQ(::chown(target.c_str(), 65534, 65534), 0);
    ASSERT_EQ(::chmod(target.c_str(), 0640), 0);
    ASSERT_TRUE(write_safetensors(target, tensors).ok());
    ASSERT_EQ(::stat(target.c_str(), &st), 0);
    EXPECT_EQ(st.st_uid, 0u);
    EXPECT_EQ(st.st_gid, 65534u);
    EXPECT_EQ(st.st_mode & 0777, mode_t{0640});
  }
  // A new file takes the umask's mode.
  const std::string fresh = file("fresh.safetensors");
  const mode_t umask_was = ::umask(027);
  ASSERT_TRUE(write_safetensors(fresh, tensors).ok());
  ::umask(umask_was);
  ASSERT_EQ(::stat(fresh.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, mode_t{0640});
}

// What the daemon's checkpoint quota skips, and removes at start, as a save's temporary file.
TEST(SafetensorsTempName, MatchesOnlyTheWritersTemporaryFiles) {
  EXPECT_TRUE(is_safetensors_temp_name(".w.safetensors.tmp-0123456789abcdef"));
  EXPECT_TRUE(is_safetensors_temp_name(".x.tmp-FEDCBA9876543210"));
  EXPECT_FALSE(is_safetensors_temp_name("w.safetensors"));
  EXPECT_FALSE(is_safetensors_temp_name("w.safetensors.tmp-0123456789abcdef"));  // no leading dot
  EXPECT_FALSE(is_safetensors_temp_name(".w.tmp-0123456789abcde"));              // 15 digits
  EXPECT_FALSE(is_safetensors_temp_name(".w.tmp-0123456789abcdeg"));             // not hex
  EXPECT_FALSE(is_safetensors_temp_name(".w.tmq-0123456789abcdef"));
  EXPECT_FALSE(is_safetensors_temp_name(""));
}

TEST_F(SafetensorsTest, WriterRefusesBadInputAndKeepsTheOldFile) {
  const std::string path = file("keep.safetensors");
  const float data[4] = {1, 2, 3, 4};
  ASSERT_TRUE(write_safetensors(path, {{"w", DType::kF32, {4}, data}}).ok());
  const std::string before = read_file(path);

  struct Case {
    const char* label;
    std::vector<SafetensorsEntry> entries;
    const char* fragment;
  };
  const std::vector<Case> cases = {
      {"duplicate",
       {{"w", DType::kF32, {4}, data}, {"w", DType::kF32, {2}, data}},
       "more than once"},
      {"reserved", {{"__metadata__", DType::kF32, {4}, data}}, "reserved"},
      {"null data", {{"w", DType::kF32, {4}, nullptr}}, "no data"},
      {"negative dim", {{"w", DType::kF32, {-1, 4}, data}}, "negative"},
      {"too many elements",
       {{"w", DType::kF32, {int64_t{1} << 40, int64_t{1} << 40}, data}},
       "too many"},
      {"invalid utf-8", {{"w\xff", DType::kF32, {4}, data}}, "UTF-8"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.label);
    const Status s = write_safetensors(path, c.entries);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(contains(s.message(), path)) << s;
    EXPECT_TRUE(contains(s.message(), c.fragment)) << s;
  }
  EXPECT_EQ(write_safetensors(path, {}, {{"bad\xc3", "x"}}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(read_file(path), before);
  EXPECT_EQ(list_dir(dir_.path()), std::vector<std::string>{"keep.safetensors"});

  // A null pointer is fine where there is nothing to write.
  EXPECT_TRUE(write_safetensors(file("z.safetensors"), {{"z", DType::kF32, {0, 3}, nullptr}}).ok());
}

TEST_F(SafetensorsTest, WriteIntoMissingDirectoryFails) {
  const std::string path = file("no/such/dir/x.safetensors");
  const float v = 1;
  const Status s = write_safetensors(path, {{"v", DType::kF32, {}, &v}});
  EXPECT_EQ(s.code(), StatusCode::kNotFound) << s;
  EXPECT_TRUE(contains(s.message(), path)) << s;
}

TEST_F(SafetensorsTest, OpenReportsUnreadablePaths) {
  const std::string missing = file("missing.safetensors");
  Result<SafetensorsFile> r = SafetensorsFile::open(missing);
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(contains(r.status().message(), missing)) << r.status();

  r = SafetensorsFile::open(dir_.path());
  EXPECT_FALSE(r.ok());
  EXPECT_TRUE(contains(r.status().message(), dir_.path())) << r.status();

  const std::string fifo = file("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  r = SafetensorsFile::open(fifo);  // must not block waiting for a writer
  EXPECT_FALSE(r.ok());
  EXPECT_TRUE(contains(r.status().message(), "not a regular file")) << r.status();
}

TEST_F(SafetensorsTest, MoveKeepsTheMappingAlive) {
  const std::string path_a = file("a.safetensors");
  const std::string path_b = file("b.safetensors");
  const double a[2] = {0.5, 1.5};
  const double b[1] = {-4};
  ASSERT_TRUE(write_safetensors(path_a, {{"a", DType::kF64, {2}, a}}).ok());
  ASSERT_TRUE(write_safetensors(path_b, {{"b", DType::kF64, {1}, b}}).ok());
  Result<SafetensorsFile> ra = SafetensorsFile::open(path_a);
  Result<SafetensorsFile> rb = SafetensorsFile::open(path_b);
  ASSERT_TRUE(ra.ok() && rb.ok());

  SafetensorsFile moved(std::move(*ra));
  EXPECT_EQ(moved.path(), path_a);
  ASSERT_NE(moved.find("a"), nullptr);
  EXPECT_EQ(static_cast<const double*>(moved.find("a")->data)[1], 1.5);

  moved = std::move(*rb);  // unmaps a, takes b
  EXPECT_EQ(moved.path(), path_b);
  EXPECT_EQ(moved.find("a"), nullptr);
  ASSERT_NE(moved.find("b"), nullptr);
  EXPECT_EQ(static_cast<const double*>(moved.find("b")->data)[0], -4);
}

// ---- files written by hand: what other writers may legally produce ----

TEST_F(SafetensorsTest, AcceptsLegalHandWrittenLayouts) {
  std::string data(40, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i);
  // Entries out of offset order, a gap before "late", bytes after the last tensor, an empty
  // tensor pointing into another one, an empty metadata map, unknown keys, padding.
  const std::string header =
      R"({"late":{"dtype":"U8","shape":[4],"data_offsets":[20,24],"extra":true},)"
      R"("early":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
      R"("none":{"dtype":"F16","shape":[3,0],"data_offsets":[8,8]},)"
      R"("scalar":{"dtype":"F64","shape":[],"data_offsets":[24,32]},)"
      R"("__metadata__":{}}     )";
  const std::string path = file("legal.safetensors");
  write_file(path, image(header, data));
  Result<SafetensorsFile> f = SafetensorsFile::open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ(f->tensors().size(), 4u);
  EXPECT_EQ(f->tensors()[0].name, "early");
  EXPECT_EQ(f->tensors()[1].name, "none");
  EXPECT_EQ(f->tensors()[2].name, "late");
  EXPECT_EQ(f->tensors()[3].name, "scalar");
  EXPECT_EQ(f->find("none")->nbytes, 0u);
  EXPECT_EQ(f->find("scalar")->shape.rank(), 0);
  EXPECT_EQ(f->find("scalar")->view().numel(), 1);
  EXPECT_EQ(static_cast<const uint8_t*>(f->find("late")->data)[0], 20);
  EXPECT_TRUE(f->metadata().empty());
}

// read_as_f32 on hand-written bytes at odd offsets (a file aligns its tensors only as its writer
// chose): each floating dtype's values against bit patterns whose f32 values are known, f64
// rounded to nearest, and the refusals (an integer tensor, a finite f64 past f32's range).
TEST_F(SafetensorsTest, ReadAsF32ConvertsEveryFloatingDtypeAtAnyAlignment) {
  std::string data(1, '\x55');  // one byte first: every tensor below starts at an odd offset
  auto put = [&](const auto& values) {
    const size_t begin = data.size();
    data.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(values[0]));
    return "[" + std::to_string(begin) + "," + std::to_string(data.size()) + "]";
  };
  // f16: 1, -2, 65504 (its largest), 2^-24 (its smallest subnormal), -0, +inf.
  const std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x7BFF, 0x0001, 0x8000, 0x7C00};
  // bf16: 1, 3.140625, -2^-126, 2^127 (1.0 scaled), the largest finite bf16.
  const std::vector<uint16_t> bf16 = {0x3F80, 0x4049, 0x8080, 0x7F00, 0x7F7F};
  const std::vector<double> f64 = {0.1, -1e-50, 3.4028234663852886e38, 1.0 + 0x1p-24, 1.0 + 0x1p-23 + 0x1p-24,
                                   std::numeric_limits<double>::infinity()};
  const std::vector<float> f32 = {1.5f, -0.0f, std::numeric_limits<float>::denorm_min()};
  // 3.4028235677973366e38 is halfway between the largest f32 and 2^128: it rounds to infinity;
  // the double just below it rounds to the largest f32.
  const std::vector<double> too_big = {std::nextafter(0x1.ffffffp127, 0.0), 2.0, -0x1.ffffffp127};
  const std::vector<int32_t> ints = {1, 2};
  const std::string header = R"({"f16":{"dtype":"F16","shape":[6],"data_offsets":)" + put(f16) +
                             R"(},"bf16":{"dtype":"BF16","shape":[5],"data_offsets":)" + put(bf16) +
                             R"(},"f64":{"dtype":"F64","shape":[2,3],"data_offsets":)" + put(f64) +
                             R"(},"f32":{"dtype":"F32","shape":[3],"data_offsets":)" + put(f32) +
                             R"(},"big":{"dtype":"F64","shape":[3],"data_offsets":)" + put(too_big) +
                             R"(},"ints":{"dtype":"I32","shape":[2],"data_offsets":)" + put(ints) + "}}";
  const std::string path = file("dtypes.safetensors");
  write_file(path, image(header, data));
  Result<SafetensorsFile> f = SafetensorsFile::open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  auto read = [&](const char* name) {
    const SafetensorsTensor* t = f->find(name);
    EXPECT_NE(t, nullptr) << name;
    std::vector<float> out(t ? static_cast<size_t>(t->shape.numel()) : 0, -7.f);
    const Status s = t ? read_as_f32(*t, out.data()) : Status::NotFound(name);
    EXPECT_TRUE(s.ok()) << s;
    return out;
  };
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(read("f16"), (std::vector<float>{1.f, -2.f, 65504.f, 0x1p-24f, -0.f, inf}));
  EXPECT_TRUE(std::signbit(read("f16")[4]));
  EXPECT_EQ(read("bf16"), (std::vector<float>{1.f, 3.140625f, -0x1p-126f, 0x1p127f, 0x1.fep127f}));
  // 0.1 to its nearest f32 (0x3DCCCCCD); -1e-50 to -0; the largest f32 stays; 1 + 2^-24 halfway
  // between 1 and 1 + 2^-23 goes to the even one (1); 1 + 3 · 2^-24 halfway goes up to 1 + 2^-22.
  const std::vector<float> from_f64 = read("f64");
  uint32_t bits;
  std::memcpy(&bits, &from_f64[0], 4);
  EXPECT_EQ(bits, 0x3DCCCCCDu);
  EXPECT_EQ(from_f64[1], 0.f);
  EXPECT_TRUE(std::signbit(from_f64[1]));
  EXPECT_EQ(from_f64[2], std::numeric_limits<float>::max());
  EXPECT_EQ(from_f64[3], 1.f);
  EXPECT_EQ(from_f64[4], 1.f + 0x1p-22f);
  EXPECT_EQ(from_f64[5], inf);
  const std::vector<float> from_f32 = read("f32");
  EXPECT_EQ(from_f32, f32);
  EXPECT_TRUE(std::signbit(from_f32[1]));

  std::vector<float> out(3);
  const Status big = read_as_f32(*f->find("big"), out.data());
  EXPECT_EQ(big.code(), StatusCode::kInvalidArgument) << big;
  EXPECT_EQ(out[0], std::numeric_limits<float>::max());
  EXPECT_TRUE(contains(big.message(), "'big'") && contains(big.message(), "-3.4028235677973366e+38") &&
              contains(big.message(), "element 2") && contains(big.message(), "range of f32"))
      << big;
  const Status integers = read_as_f32(*f->find("ints"), out.data());
  EXPECT_EQ(integers.code(), StatusCode::kInvalidArgument) << integers;
  EXPECT_TRUE(contains(integers.message(), "'ints'") && contains(integers.message(), "i32") &&
              contains(integers.message(), "f32, f64, bf16 or f16"))
      << integers;
}

// ---- corrupt files: each must fail with a message naming the file and the tensor ----

struct CorruptCase {
  const char* label;
  std::string bytes;
  std::vector<std::string> fragments;  // besides the path
};

std::string entry(std::string_view name, std::string_view dtype, std::string_view shape,
                  std::string_view offsets) {
  return "\"" + std::string(name) + "\":{\"dtype\":" + std::string(dtype) +
         ",\"shape\":" + std::string(shape) + ",\"data_offsets\":" + std::string(offsets) + "}";
}

std::string one(std::string_view dtype, std::string_view shape, std::string_view offsets) {
  return image("{" + entry("w", dtype, shape, offsets) + "}", std::string(16, '\x11'));
}

std::vector<CorruptCase> corrupt_cases() {
  const std::string w = "tensor 'w'";
  return {
      {"empty_file", "", {"too short"}},
      {"five_bytes", "\x01\x02\x03\x04\x05", {"too short"}},
      {"length_past_end", le64(1000) + "{}", {"header length 1000", "truncated"}},
      {"length_all_ones", le64(~uint64_t{0}) + "{}", {"header length"}},
      {"empty_header", image(""), {"not valid JSON"}},
      {"not_json", image("{not json}"), {"not valid JSON"}},
      {"cut_json", image(R"({"w":)"), {"not valid JSON"}},
      {"trailing_garbage", image("{} x"), {"not valid JSON"}},
      {"nul_padding", image(std::string("{}\0\0\0\0\0\0", 8)), {"not valid JSON"}},
      {"bad_utf8", image("{\"w\xff\":{}}"), {"not valid JSON"}},
      {"array_root", image("[1,2]"), {"header is a JSON array"}},
      {"string_root", image(R"("w")"), {"header is a JSON string"}},
      {"null_root", image("null"), {"header is a JSON null"}},
      {"entry_number", image(R"({"w":5})"), {w, "expected an object"}},
      {"entry_array", image(R"({"w":[]})"), {w, "expected an object"}},
      {"missing_dtype",
       image(R"({"w":{"shape":[4],"data_offsets":[0,16]}})", std::string(16, 'a')),
       {w, "missing 'dtype'"}},
      {"missing_shape",
       image(R"({"w":{"dtype":"F32","data_offsets":[0,16]}})", std::string(16, 'a')),
       {w, "missing 'shape'"}},
      {"missing_offsets",
       image(R"({"w":{"dtype":"F32","shape":[4]}})", std::string(16, 'a')),
       {w, "missing 'data_offsets'"}},
      {"dtype_number", one("5", "[4]", "[0,16]"), {w, "'dtype'"}},
      {"dtype_unknown", one(R"("F8_E4M3")", "[16]", "[0,16]"), {w, "F8_E4M3", "unsupported dtype"}},
      {"dtype_lowercase", one(R"("f32")", "[4]", "[0,16]"), {w, "'f32'"}},
      {"shape_string", one(R"("F32")", R"("4")", "[0,16]"), {w, "'shape'"}},
      {"shape_object", one(R"("F32")", "{}", "[0,16]"), {w, "'shape'"}},
      {"shape_dim_string", one(R"("F32")", R"([1,"4"])", "[0,16]"), {w, "dimension 1"}},
      {"shape_dim_null", one(R"("F32")", "[null]", "[0,16]"), {w, "dimension 0"}},
      {"shape_dim_negative", one(R"("F32")", "[-1,4]", "[0,16]"), {w, "negative"}},
      {"shape_dim_fraction", one(R"("F32")", "[1.5]", "[0,16]"), {w, "dimension 0"}},
      {"shape_dim_float_integral", one(R"("F32")", "[4.0]", "[0,16]"), {w, "dimension 0"}},
      {"shape_dim_huge", one(R"("F32")", "[18446744073709551615]", "[0,16]"), {w, "too large"}},
      {"shape_dim_bigger_than_u64", one(R"("F32")", "[1e30]", "[0,16]"), {w, "dimension 0"}},
      {"shape_rank_7", one(R"("U8")", "[1,1,1,1,1,1,16]", "[0,16]"), {w, "rank 7"}},
      {"numel_overflow", one(R"("F32")", "[4294967296,4294967296]", "[0,0]"), {w, "too many"}},
      {"numel_overflow_beside_zero",
       one(R"("F32")", "[0,4294967296,4294967296]", "[0,0]"),
       {w, "too many"}},
      {"nbytes_overflow", one(R"("F32")", "[4611686018427387904]", "[0,0]"), {w, "too many"}},
      {"offsets_string", one(R"("F32")", "[4]", R"("0-16")"), {w, "data_offsets"}},
      {"offsets_one", one(R"("F32")", "[4]", "[0]"), {w, "data_offsets"}},
      {"offsets_three", one(R"("F32")", "[4]", "[0,16,16]"), {w, "data_offsets"}},
      {"offsets_negative", one(R"("F32")", "[4]", "[-1,15]"), {w, "data_offsets"}},
      {"offsets_text", one(R"("F32")", "[4]", R"(["0",16])"), {w, "data_offsets"}},
      {"offsets_fraction", one(R"("F32")", "[4]", "[0,16.0]"), {w, "data_offsets"}},
      {"offsets_reversed", one(R"("F32")", "[4]", "[16,0]"), {w, "begin after end"}},
      {"offsets_past_data", one(R"("F32")", "[8]", "[0,32]"), {w, "truncated"}},
      {"offsets_far_past_data",
       one(R"("F32")", "[0]", "[99999999999,99999999999]"),
       {w, "truncated"}},
      {"size_too_small", one(R"("F32")", "[4]", "[0,12]"), {w, "holds 12 bytes", "needs 16"}},
      {"size_too_large", one(R"("F16")", "[4]", "[0,16]"), {w, "holds 16 bytes", "needs 8"}},
      {"overlap",
       image("{" + entry("a", R"("F32")", "[4]", "[0,16]") + "," +
                 entry("b", R"("F32")", "[2]", "[8,16]") + "}",
             std::string(16, 'a')),
       {"tensor 'b'", "overlaps tensor 'a'"}},
      {"same_range",
       image("{" + entry("a", R"("U8")", "[4]", "[4,8]") + "," +
                 entry("b", R"("U8")", "[4]", "[4,8]") + "}",
             std::string(16, 'a')),
       {"tensor 'b'", "overlaps tensor 'a'"}},
      {"duplicate_name",
       image("{" + entry("w", R"("U8")", "[4]", "[0,4]") + "," +
                 entry("w", R"("U8")", "[4]", "[4,8]") + "}",
             std::string(16, 'a')),
       {w, "more than once"}},
      {"metadata_array", image(R"({"__metadata__":[1]})"), {"'__metadata__'", "array"}},
      {"metadata_number_value", image(R"({"__metadata__":{"k":1}})"), {"'__metadata__'", "'k'"}},
      // Readers disagree on which of two equal keys wins: a checkpoint's spec must not be ambiguous.
      {"duplicate_metadata_key",
       image(R"({"__metadata__":{"tuteld.spec":"a","other":"x","tuteld.spec":"b"}})"),
       {"'__metadata__' key 'tuteld.spec'", "more than once"}},
      {"too_deep", image(R"({"__metadata__":{"k":[[[[[[[[[[[[1]]]]]]]]]]]]}})"), {"deeper"}},
      // Names, keys and dtypes come from the file: shown escaped (no terminal control, no forged
      // log line, no quote ending the name early) and cut short, whatever they hold.
      {"control_characters_in_name",
       image("{" + entry(R"(a\u001b[2J\nb\u0000c)", R"("F8_E4M3")", "[16]", "[0,16]") + "}", std::string(16, 'a')),
       {R"(tensor 'a\x1b[2J\x0ab\x00c')", "unsupported dtype"}},
      {"quote_in_name", image("{" + entry("it's", R"("F32")", "[4]", "[0,4]") + "}", std::string(16, 'a')),
       {R"(tensor 'it\'s')", "holds 4 bytes"}},
      {"long_name", image("{" + entry(std::string(100000, 'n'), R"("F32")", "[4]", "[0,4]") + "}", std::string(16, 'a')),
       {"tensor '" + std::string(200, 'n') + "...'", "holds 4 bytes"}},
      {"control_characters_in_dtype", one(R"("\u001b]0;x\u0007")", "[16]", "[0,16]"),
       {R"(unsupported dtype '\x1b]0;x\x07')"}},
      {"long_dtype", one("\"" + std::string(5000, 'D') + "\"", "[16]", "[0,16]"),
       {"unsupported dtype '" + std::string(32, 'D') + "...'"}},
      {"control_characters_in_metadata_key", image(R"({"__metadata__":{"k\u009b2J":1}})"),
       {R"('__metadata__' key 'k\u009b2J')", "holds a JSON number"}},
      {"duplicate_control_metadata_key", image(R"({"__metadata__":{"\n":"a","\n":"b"}})"),
       {R"('__metadata__' key '\x0a')", "more than once"}},
      {"control_characters_in_bad_json", image("{\"\x1b[2J\": 1"), {"not valid JSON"}},
  };
}

// Both readers: open() maps the path, read() copies what a descriptor holds.
TEST_F(SafetensorsTest, RejectsEveryCorruptCaseWithAClearMessage) {
  for (const CorruptCase& c : corrupt_cases()) {
    SCOPED_TRACE(c.label);
    const std::string path = file(std::string(c.label) + ".safetensors");
    write_file(path, c.bytes);
    const UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    ASSERT_TRUE(fd.valid());
    for (const Result<SafetensorsFile>& r : {SafetensorsFile::open(path), SafetensorsFile::read(fd.get(), path, 1 << 20)}) {
      ASSERT_FALSE(r.ok());
      EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << r.status();
      EXPECT_TRUE(contains(r.status().message(), "'" + path + "'")) << r.status();
      for (const std::string& fragment : c.fragments)
        EXPECT_TRUE(contains(r.status().message(), fragment))
            << "missing '" << fragment << "' in: " << r.status();
      EXPECT_FALSE(has_control_characters(r.status().message())) << r.status();
      EXPECT_LT(r.status().message().size(), 1024u) << "a message stays short whatever the file holds";
    }
  }
}

// ---- files handed over by descriptor (a layer's state between the daemon and a client) ----

UniqueFd memfd_holding(const std::string& bytes) {
  UniqueFd fd(::memfd_create("safetensors test", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(::pwrite(fd.get(), bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
  return fd;
}

TEST_F(SafetensorsTest, ReadKeepsItsOwnCopyOfWhatADescriptorHeld) {
  std::mt19937_64 rng(std::random_device{}());
  const std::vector<Owned> tensors = {random_tensor(rng, "w", DType::kF32, {3, 5}),
                                      random_tensor(rng, "b", DType::kF32, {5})};
  const std::string path = file("state.safetensors");
  ASSERT_TRUE(write_safetensors(path, entries_of(tensors), {{"tuteld.step", "4"}}).ok());
  const std::string bytes = read_file(path);
  UniqueFd fd = memfd_holding(bytes);
  ASSERT_EQ(::lseek(fd.get(), 3, SEEK_SET), 3);
  Result<SafetensorsFile> f = SafetensorsFile::read(fd.get(), "the handed-over state", bytes.size());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(::lseek(fd.get(), 0, SEEK_CUR), 3) << "read moved the descriptor's offset, which its sender shares";
  // The sender may rewrite or truncate its file afterwards: what was read stays as it was.
  const std::string garbage(bytes.size(), '\x5a');
  ASSERT_EQ(::pwrite(fd.get(), garbage.data(), garbage.size(), 0), static_cast<ssize_t>(garbage.size()));
  ASSERT_EQ(::ftruncate(fd.get(), 0), 0);
  EXPECT_EQ(f->path(), "the handed-over state");
  EXPECT_EQ(f->metadata().at("tuteld.step"), "4");
  for (const Owned& t : tensors) {
    const SafetensorsTensor* got = f->find(t.name);
    ASSERT_NE(got, nullptr) << t.name;
    EXPECT_EQ(got->shape, t.shape);
    ASSERT_EQ(got->nbytes, t.bytes.size());
    EXPECT_EQ(0, std::memcmp(got->data, t.bytes.data(), t.bytes.size())) << t.name;
  }
}

TEST_F(SafetensorsTest, ReadRefusesWhatIsNotARegularFileAndFilesOverItsBound) {
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  const UniqueFd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
  const UniqueFd dir(::open(dir_.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  for (int fd : {pipe_read.get(), dir.get()}) {
    const Result<SafetensorsFile> r = SafetensorsFile::read(fd, "the state", 1 << 20);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
    EXPECT_TRUE(contains(r.status().message(), "not a regular file")) << r.status();
  }
  // Over the bound: refused from its size alone, before anything is read or allocated (a sparse
  // terabyte here).
  const UniqueFd huge = memfd_holding(image("{}"));
  ASSERT_EQ(::ftruncate(huge.get(), off_t{1} << 40), 0);
  const Result<SafetensorsFile> r = SafetensorsFile::read(huge.get(), "the state", 1 << 20);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(contains(r.status().message(), "more than the 1048576")) << r.status();
  EXPECT_EQ(SafetensorsFile::read(-1, "the state", 1 << 20).status().code(), StatusCode::kIOError);
}

// A reader that knows how long a header its files have refuses a longer one before parsing it
// (a JSON tree takes many times its text: 100 MiB of "[{},{},...]" took 4 GiB); one at the bound
// is read, mapped or copied alike.
TEST_F(SafetensorsTest, AHeaderOverItsReadersBoundIsRefusedUnparsed) {
  std::mt19937_64 rng(std::random_device{}());
  const std::vector<Owned> tensors = {random_tensor(rng, "w", DType::kF32, {3, 5})};
  const std::string path = file("bounded.safetensors");
  ASSERT_TRUE(write_safetensors(path, entries_of(tensors), {{"tuteld.step", "4"}}).ok());
  const std::string bytes = read_file(path);
  uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  UniqueFd sealed = memfd_holding(bytes);
  ASSERT_EQ(::fcntl(sealed.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE), 0);
  const UniqueFd copied = memfd_holding(bytes);
  EXPECT_TRUE(SafetensorsFile::read(copied.get(), "the state", bytes.size(), header).ok());
  EXPECT_TRUE(SafetensorsFile::map_sealed(sealed.get(), "the state", bytes.size(), header).ok());
  for (const Result<SafetensorsFile>& r : {SafetensorsFile::read(copied.get(), "the state", bytes.size(), header - 1),
                                           SafetensorsFile::map_sealed(sealed.get(), "the state", bytes.size(), header - 1)}) {
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
    EXPECT_TRUE(contains(r.status().message(), "header of " + std::to_string(header) + " bytes, more than the " +
                                                   std::to_string(header - 1)))
        << r.status();
  }
}

// A memfd sealed against shrinking and writing is mapped, not copied: the same tensors as open()
// of the same bytes; one without both seals is refused (read() copies it), as is one over the
// bound, and a corrupt one is refused as open() refuses it.
TEST_F(SafetensorsTest, MapSealedMapsOnlyWhatCanNeitherShrinkNorChange) {
  std::mt19937_64 rng(std::random_device{}());
  const std::vector<Owned> tensors = {random_tensor(rng, "w", DType::kF32, {6, 5})};
  const std::string path = file("state.safetensors");
  ASSERT_TRUE(write_safetensors(path, entries_of(tensors), {{"tuteld.step", "9"}}).ok());
  const std::string bytes = read_file(path);
  auto sealed_memfd = [&](const std::string& contents, int seals) {
    UniqueFd fd(::memfd_create("sealed", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    EXPECT_EQ(::pwrite(fd.get(), contents.data(), contents.size(), 0), static_cast<ssize_t>(contents.size()));
    if (seals != 0) {
      EXPECT_EQ(::fcntl(fd.get(), F_ADD_SEALS, seals), 0);
    }
    return fd;
  };
  const UniqueFd good = sealed_memfd(bytes, F_SEAL_SHRINK | F_SEAL_WRITE);
  Result<SafetensorsFile> f = SafetensorsFile::map_sealed(good.get(), "the state", bytes.size());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->metadata().at("tuteld.step"), "9");
  ASSERT_NE(f->find("w"), nullptr);
  EXPECT_EQ(0, std::memcmp(f->find("w")->data, tensors[0].bytes.data(), tensors[0].bytes.size()));
  // The seals hold: neither a write nor a hole punch reaches what is mapped.
  EXPECT_EQ(::pwrite(good.get(), "x", 1, 100), -1);
  EXPECT_EQ(::fallocate(good.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096), -1);

  for (int seals : {0, F_SEAL_SHRINK, F_SEAL_WRITE}) {
    SCOPED_TRACE("seals " + std::to_string(seals));
    const UniqueFd fd = sealed_memfd(bytes, seals);
    const Result<SafetensorsFile> r = SafetensorsFile::map_sealed(fd.get(), "the state", bytes.size());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
    EXPECT_TRUE(contains(r.status().message(), "sealed against shrinking and writing")) << r.status();
  }
  EXPECT_EQ(SafetensorsFile::map_sealed(good.get(), "the state", bytes.size() - 1).status().code(),
            StatusCode::kInvalidArgument);
  const UniqueFd corrupt = sealed_memfd(image("{not json}"), F_SEAL_SHRINK | F_SEAL_WRITE);
  EXPECT_EQ(SafetensorsFile::map_sealed(corrupt.get(), "the state", 1 << 20).status().code(), StatusCode::kCorruption);
}

// A memfd as a receiver of write_safetensors_into must make it: sized, every page faulted in
// (MAP_POPULATE), sealed against shrinking.
Result<SharedMemory> receiver_memfd(size_t bytes) { return SharedMemory::create(bytes, "state receiver"); }

TEST_F(SafetensorsTest, WriteIntoAMemfdLaysOutWhatWriteSafetensorsWritesAndFillsInPlace) {
  std::mt19937_64 rng(std::random_device{}());
  const std::vector<Owned> tensors = {random_tensor(rng, "a", DType::kF32, {4, 3}),
                                      random_tensor(rng, "filled", DType::kF32, {3, 1 << 20}),  // 12 MiB: chunks
                                      random_tensor(rng, "empty", DType::kF32, {0, 2}),
                                      random_tensor(rng, "c", DType::kI64, {2})};
  const std::map<std::string, std::string> metadata = {{"tuteld.step", "12"}, {"tuteld.spec", "x = \"\\\n\""}};
  const std::string path = file("reference.safetensors");
  ASSERT_TRUE(write_safetensors(path, entries_of(tensors), metadata).ok());
  const std::string reference = read_file(path);

  Result<SharedMemory> memfd = receiver_memfd(reference.size() + 100);
  ASSERT_TRUE(memfd.ok()) << memfd.status();
  std::vector<SafetensorsEntry> entries = entries_of(tensors);
  entries[1].data = nullptr;  // this one is filled in place
  std::vector<std::tuple<size_t, uint64_t, size_t>> filled;  // (tensor, offset, bytes)
  Result<uint64_t> written =
      write_safetensors_into(memfd->fd(), "the state", entries, metadata, [&](size_t i, uint64_t at, void* dst, size_t n) {
        filled.emplace_back(i, at, n);
        std::memcpy(dst, tensors[i].bytes.data() + at, n);
        return Status::OK();
      });
  ASSERT_TRUE(written.ok()) << written.status();
  const size_t filled_bytes = tensors[1].bytes.size();
  EXPECT_EQ(filled, (std::vector<std::tuple<size_t, uint64_t, size_t>>{
                        {1, 0, kFillChunkBytes}, {1, kFillChunkBytes, filled_bytes - kFillChunkBytes}}));
  ASSERT_EQ(*written, reference.size());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(memfd->data()), *written), reference);

  // A fill that fails fails the write with its status.
  const Result<uint64_t> failed = write_safetensors_into(memfd->fd(), "the state", entries, metadata,
                                                         [](size_t, uint64_t, void*, size_t) { return Status::IOError("device lost"); });
  EXPECT_EQ(failed.status().code(), StatusCode::kIOError);
  EXPECT_EQ(failed.status().message(), "device lost");
  // Without a fill, null data is refused as write_safetensors refuses it.
  EXPECT_EQ(write_safetensors_into(memfd->fd(), "the state", entries, metadata).status().code(),
            StatusCode::kInvalidArgument);
}

TEST_F(SafetensorsTest, WriteIntoRefusesAMemfdItCannotTrust) {
  const std::vector<float> values(256, 1.5f);
  const std::vector<SafetensorsEntry> entries = {{"w", DType::kF32, {256}, values.data()}};
  auto refusal = [&](int fd) { return write_safetensors_into(fd, "the state", entries).status(); };
  auto expect_refused = [&](const Status& st, std::string_view says) {
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
    EXPECT_TRUE(contains(st.message(), says)) << "missing '" << says << "' in: " << st;
  };
  {
    SCOPED_TRACE("not sealed against shrinking: a truncation would raise SIGBUS in the writer");
    const UniqueFd fd = memfd_holding(std::string(8192, '\0'));
    expect_refused(refusal(fd.get()), "sealed against shrinking");
  }
  {
    SCOPED_TRACE("sealed against writing");
    const UniqueFd fd = memfd_holding(std::string(8192, '\0'));
    ASSERT_EQ(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_WRITE), 0);
    expect_refused(refusal(fd.get()), "sealed against shrinking");
  }
  {
    SCOPED_TRACE("too small");
    const UniqueFd fd = memfd_holding(std::string(600, '\0'));
    ASSERT_EQ(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK), 0);
    expect_refused(refusal(fd.get()), "more than the 600");
  }
  {
    SCOPED_TRACE("sparse: the writer would allocate the pages, and be charged for them");
    const UniqueFd fd = memfd_holding(std::string(4096, '\1'));
    ASSERT_EQ(::ftruncate(fd.get(), 1 << 20), 0);
    ASSERT_EQ(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK), 0);
    expect_refused(refusal(fd.get()), "has a hole at byte 4096");
  }
  {
    SCOPED_TRACE("a hole where the file goes, pages reserved past the end: st_blocks alone adds up");
    const UniqueFd fd = memfd_holding("");
    ASSERT_EQ(::ftruncate(fd.get(), 8192), 0);
    ASSERT_EQ(::fallocate(fd.get(), FALLOC_FL_KEEP_SIZE, 8192, 8192), 0);
    ASSERT_EQ(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK), 0);
    struct stat st {};
    ASSERT_EQ(::fstat(fd.get(), &st), 0);
    ASSERT_GE(static_cast<uint64_t>(st.st_blocks) * 512, static_cast<uint64_t>(st.st_size));
    expect_refused(refusal(fd.get()), "has a hole at byte 0");
  }
  {
    SCOPED_TRACE("sealed against future writes: a writable mapping would be refused");
    Result<SharedMemory> sealed = receiver_memfd(8192);
    ASSERT_TRUE(sealed.ok());
    ASSERT_EQ(::fcntl(sealed->fd(), F_ADD_SEALS, 0x0010 /* F_SEAL_FUTURE_WRITE */), -1)
        << "SharedMemory::create seals further seals";
    const UniqueFd fd = memfd_holding(std::string(8192, '\0'));
    ASSERT_EQ(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | 0x0010), 0);
    expect_refused(refusal(fd.get()), "not against writing");
  }
  {
    SCOPED_TRACE("not a memfd");
    int pipe_fds[2];
    ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
    const UniqueFd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
    expect_refused(refusal(pipe_write.get()), "not a memfd");
    // A file on disk, fully written: a network or FUSE file could block the writer for good.
    const std::string path = file("on_disk");
    write_file(path, std::string(8192, '\0'));
    const UniqueFd on_disk(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    ASSERT_TRUE(on_disk.valid());
    if (!check_memory_file(on_disk.get(), "").ok())  // else /tmp is tmpfs on this machine
      expect_refused(refusal(on_disk.get()), "not a memfd");
  }
  // The same memfd, fully allocated and sealed against shrinking, is taken.
  Result<SharedMemory> good = receiver_memfd(8192);
  ASSERT_TRUE(good.ok());
  EXPECT_TRUE(write_safetensors_into(good->fd(), "the state", entries).ok());
}

TEST_F(SafetensorsTest, RejectsAbsurdHeaderLength) {
  // A sparse file larger than the header length, so only the 100 MB cap can refuse it.
  const uint64_t header_size = uint64_t{150} << 20;
  const std::string path = file("absurd.safetensors");
  write_file(path, le64(header_size) + "{}");
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(header_size + 4096)), 0);
  const Result<SafetensorsFile> r = SafetensorsFile::open(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
  EXPECT_TRUE(contains(r.status().message(), path)) << r.status();
  EXPECT_TRUE(contains(r.status().message(), "over the limit")) << r.status();
}

// ---- fuzz: damaged copies of a valid file must open or fail, never crash ----

TEST_F(SafetensorsTest, SurvivesRandomDamage) {
  std::mt19937_64 rng(20240611);  // fixed: a failure must reproduce
  const std::vector<Owned> owned = {
      random_tensor(rng, "w1", DType::kF32, {4, 3}), random_tensor(rng, "w2", DType::kBF16, {3, 5}),
      random_tensor(rng, "idx", DType::kI64, {2}),   random_tensor(rng, "none", DType::kF16, {0}),
      random_tensor(rng, "s", DType::kU8, {}),
  };
  const std::string valid_path = file("valid.safetensors");
  ASSERT_TRUE(write_safetensors(valid_path, entries_of(owned), {{"k", "v"}}).ok());
  const std::string valid = read_file(valid_path);
  uint64_t header_size = 0;
  std::memcpy(&header_size, valid.data(), 8);
  const size_t header_end = 8 + header_size;

  const std::string json_chars = "{}[]\",:-.0123456789eE \\u";
  int opened = 0;
  int refused = 0;
  volatile uint64_t checksum = 0;
  for (int i = 0; i < 4000; ++i) {
    std::string bytes = valid;
    auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
    switch (i % 7) {
      case 0:  // bit flips, mostly in the header where the parser looks
        for (size_t k = 1 + pick(4); k > 0; --k)
          bytes[pick(header_end)] ^= static_cast<char>(1 << pick(8));
        break;
      case 1:  // JSON punctuation or digits dropped into the header
        for (size_t k = 1 + pick(3); k > 0; --k)
          bytes[8 + pick(header_size)] = json_chars[pick(json_chars.size())];
        break;
      case 2:  // truncation
        bytes.resize(pick(bytes.size()));
        break;
      case 3: {  // a nearby header length
        const uint64_t n = header_size + pick(64) - 32;
        std::memcpy(bytes.data(), &n, 8);
        break;
      }
      case 4:  // random bytes anywhere
        for (size_t k = 1 + pick(8); k > 0; --k)
          bytes[pick(bytes.size())] = static_cast<char>(rng());
        break;
      case 5:  // a character inserted into the header, shifting everything after it
        bytes.insert(8 + pick(header_size), 1, json_chars[pick(json_chars.size())]);
        break;
      case 6:  // a few header bytes removed
        bytes.erase(8 + pick(header_size), 1 + pick(4));
        break;
    }
    // A new name each time: rewriting one file in place makes ext4 flush it on every close.
    const std::string path = file("fuzz" + std::to_string(i) + ".safetensors");
    write_file(path, bytes);
    const Result<SafetensorsFile> r = SafetensorsFile::open(path);
    fs::remove(path);  // an open file keeps its mapping
    if (!r.ok()) {
      ++refused;
      EXPECT_TRUE(contains(r.status().message(), path)) << r.status();
      continue;
    }
    ++opened;
    // Read every byte handed out (a sanitizer build turns a bad range into a failure), and
    // check the reader's promises: sizes agree with shapes, non-empty tensors are disjoint.
    std::vector<std::pair<const char*, size_t>> ranges;
    for (const SafetensorsTensor& t : r->tensors()) {
      ASSERT_EQ(t.nbytes, static_cast<size_t>(t.shape.numel()) * dtype_size(t.dtype));
      const auto* p = static_cast<const unsigned char*>(t.data);
      uint64_t sum = 0;
      for (size_t b = 0; b < t.nbytes; ++b) sum += p[b];
      checksum = sum;  // a volatile store keeps the reads
      if (t.nbytes > 0) ranges.emplace_back(static_cast<const char*>(t.data), t.nbytes);
    }
    std::sort(ranges.begin(), ranges.end());
    for (size_t k = 1; k < ranges.size(); ++k)
      ASSERT_LE(ranges[k - 1].first + ranges[k - 1].second, ranges[k].first);
  }
  (void)checksum;
  EXPECT_GT(opened, 0);
  EXPECT_GT(refused, 0);
}

}  // namespace
}  // namespace tutel
