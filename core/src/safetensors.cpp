#include "tutel/core/safetensors.hpp"

#include "tutel/core/logging.hpp"
#include "tutel/core/shared_memory.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <limits>
#include <new>
#include <optional>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

// The format stores multi-byte elements little-endian and we hand out the mapped bytes as
// they are; a big-endian host would need a byte-swapping copy.
static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian and is used in place");

namespace tutel {
namespace {

using nlohmann::json;

// Entries nest three levels (root, entry, shape); anything much deeper is hostile input,
// cut off before it can make any later recursive walk of the tree expensive.
constexpr int kMaxJsonDepth = 8;
constexpr std::string_view kMetadataKey = "__metadata__";
// Linux >= 5.1; glibc's headers may lack it.
#ifdef F_SEAL_FUTURE_WRITE
constexpr int kSealFutureWrite = F_SEAL_FUTURE_WRITE;
#else
constexpr int kSealFutureWrite = 0x0010;
#endif

std::string errno_text(int err) { return std::generic_category().message(err); }

std::string file_context(const std::string& path) { return "safetensors file '" + path + "'"; }

// `err` is passed by value before any message is built, so allocation cannot clobber errno.
Status errno_status(int err, std::string_view action, const std::string& path) {
  std::string what = std::string(action) + " " + file_context(path) + ": " + errno_text(err);
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return Status::NotFound(std::move(what));
    case EACCES:
    case EPERM:
      return Status::PermissionDenied(std::move(what));
    default:
      return Status::IOError(std::move(what));
  }
}

Status corrupt(const std::string& path, std::string_view problem) {
  return Status::Corruption(file_context(path) + ": " + std::string(problem));
}

Status corrupt_tensor(const std::string& path, std::string_view tensor, std::string_view problem) {
  return Status::Corruption(file_context(path) + ": tensor " + quote_text(tensor) + ": " + std::string(problem));
}

std::string supported_dtypes() {
  std::string out;
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16, DType::kF64, DType::kI32, DType::kI64,
                  DType::kU8}) {
    if (!out.empty()) out += ", ";
    out += safetensors_dtype_name(t);
  }
  return out;
}

// Element count and byte size of a shape, or nullopt when either overflows. The product of
// the non-zero dimensions must fit as well, because views compute strides from them even
// when another dimension makes the tensor empty.
struct ShapeSize {
  int64_t numel;
  uint64_t nbytes;
};
std::optional<ShapeSize> shape_size(const Shape& shape, DType dtype) {
  int64_t nonzero_product = 1;
  bool empty = false;
  for (int64_t d : shape) {
    if (d == 0) {
      empty = true;
      continue;
    }
    if (__builtin_mul_overflow(nonzero_product, d, &nonzero_product)) return std::nullopt;
  }
  const int64_t numel = empty ? 0 : nonzero_product;
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(numel), dtype_size(dtype), &nbytes))
    return std::nullopt;
  return ShapeSize{numel, nbytes};
}

// A first pass over the header before any tree is built. It catches what a tree would hide:
// a tensor name or a '__metadata__' key given twice (the tree keeps the last one silently: a
// checkpoint's "tuteld.spec" could say one thing to one reader and another to the next), and
// nesting too deep to be a real header. nlohmann's parser callback could do this during the
// tree's own parse, but it rescans the parent object after every member: quadratic in the
// tensor count.
class HeaderScan final : public nlohmann::json_sax<json> {
 public:
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  // in_metadata_ changes only where a top-level value starts (depth 1 → 2): values nested
  // inside '__metadata__' (refused later as not strings) leave it as it is.
  bool start_object(std::size_t) override {
    if (depth_ == 1) in_metadata_ = last_root_key_ == kMetadataKey;
    return enter();
  }
  bool start_array(std::size_t) override {
    if (depth_ == 1) in_metadata_ = false;
    return enter();
  }
  bool end_object() override {
    if (depth_ == 2) in_metadata_ = false;
    return leave();
  }
  bool end_array() override { return leave(); }
  bool key(string_t& key) override {
    if (depth_ == 1) {
      root_keys_.push_back(key);
      last_root_key_ = key;
    } else if (depth_ == 2 && in_metadata_) {
      metadata_keys_.push_back(key);
    }
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const json::exception& e) override {
    // nlohmann's message quotes the last token read: the file's bytes, shown escaped and cut.
    error_ = "header is not valid JSON: " + quote_text(e.what(), '"', 300);
    return false;
  }

  // Empty when the header is well-formed JSON of sane depth.
  const std::string& error() const { return error_; }
  // The first repeated name at the top level, or nullptr.
  const std::string* duplicate_root_key() { return first_repeated(root_keys_); }
  // The first key repeated inside '__metadata__', or nullptr.
  const std::string* duplicate_metadata_key() { return first_repeated(metadata_keys_); }

 private:
  bool enter() {
    if (++depth_ <= kMaxJsonDepth) return true;
    error_ = "header nests deeper than " + std::to_string(kMaxJsonDepth) + " levels";
    return false;
  }
  bool leave() {
    --depth_;
    return true;
  }

  static const std::string* first_repeated(std::vector<std::string>& keys) {
    std::sort(keys.begin(), keys.end());
    const auto it = std::adjacent_find(keys.begin(), keys.end());
    return it == keys.end() ? nullptr : &*it;
  }

  int depth_ = 0;
  std::vector<std::string> root_keys_, metadata_keys_;
  std::string last_root_key_;
  bool in_metadata_ = false;  // inside the top-level '__metadata__' object
  std::string error_;
};

struct ParsedEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin;
  uint64_t end;
};

Result<ParsedEntry> parse_entry(const std::string& path, const std::string& name, const json& entry,
                                uint64_t data_size) {
  auto fail = [&](std::string_view problem) { return corrupt_tensor(path, name, problem); };
  if (!entry.is_object())
    return fail(std::string("entry is a JSON ") + entry.type_name() +
                ", expected an object with dtype, shape and data_offsets");

  ParsedEntry out{name, DType::kF32, Shape(), 0, 0};

  const auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end()) return fail("missing 'dtype'");
  if (!dtype_it->is_string())
    return fail(std::string("'dtype' is a JSON ") + dtype_it->type_name() + ", expected a string");
  const auto& dtype_text = dtype_it->get_ref<const std::string&>();
  const std::optional<DType> dtype = parse_safetensors_dtype(dtype_text);
  if (!dtype)
    return fail("unsupported dtype " + quote_text(dtype_text, '\'', 32) + " (supported: " + supported_dtypes() + ")");
  out.dtype = *dtype;

  const auto shape_it = entry.find("shape");
  if (shape_it == entry.end()) return fail("missing 'shape'");
  if (!shape_it->is_array())
    return fail(std::string("'shape' is a JSON ") + shape_it->type_name() +
                ", expected an array of integers");
  if (shape_it->size() > static_cast<size_t>(kMaxDims))
    return fail("shape has rank " + std::to_string(shape_it->size()) + ", more than the " +
                std::to_string(kMaxDims) + " dimensions supported");
  for (size_t i = 0; i < shape_it->size(); ++i) {
    const json& dim = (*shape_it)[i];
    const std::string which = "shape dimension " + std::to_string(i);
    if (dim.is_number_unsigned()) {
      const auto value = dim.get<uint64_t>();
      if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        return fail(which + " (" + std::to_string(value) + ") is too large");
      out.shape.push_back(static_cast<int64_t>(value));
    } else if (dim.is_number_integer()) {
      return fail(which + " is negative (" + std::to_string(dim.get<int64_t>()) + ")");
    } else {
      return fail(which + " is a JSON " + dim.type_name() + ", expected a non-negative integer");
    }
  }
  const std::optional<ShapeSize> size = shape_size(out.shape, out.dtype);
  if (!size) return fail("shape " + out.shape.to_string() + " has too many elements");

  const auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end()) return fail("missing 'data_offsets'");
  const json& offsets = *offsets_it;
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned())
    return fail("'data_offsets' must be [begin, end], two non-negative integers; got " +
                offsets.dump(-1, ' ', false, json::error_handler_t::replace));
  out.begin = offsets[0].get<uint64_t>();
  out.end = offsets[1].get<uint64_t>();
  const std::string range =
      "data_offsets [" + std::to_string(out.begin) + ", " + std::to_string(out.end) + "]";
  if (out.begin > out.end) return fail(range + " has begin after end");
  if (out.end > data_size)
    return fail(range + " end past the data section (" + std::to_string(data_size) +
                " bytes); the file is truncated");
  if (out.end - out.begin != size->nbytes)
    return fail(range + " holds " + std::to_string(out.end - out.begin) + " bytes, but " +
                std::string(safetensors_dtype_name(out.dtype)) + " " + out.shape.to_string() +
                " needs " + std::to_string(size->nbytes));
  return out;
}

Status parse_metadata(const std::string& path, const json& value,
                      std::map<std::string, std::string>& metadata) {
  if (!value.is_object())
    return corrupt(path, std::string("'__metadata__' is a JSON ") + value.type_name() +
                             ", expected an object of strings");
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string())
      return corrupt(path, "'__metadata__' key " + quote_text(key) + " holds a JSON " + item.type_name() +
                               ", expected a string");
    metadata.emplace(key, item.get<std::string>());
  }
  return Status::OK();
}

}  // namespace

TensorView SafetensorsTensor::view() const {
  return TensorView(const_cast<void*>(data), dtype, shape);
}

Status read_as_f32(const SafetensorsTensor& t, float* out) {
  const size_t n = static_cast<size_t>(t.shape.numel());
  const auto* bytes = static_cast<const unsigned char*>(t.data);
  auto each = [&]<typename Stored>(auto convert) -> Status {
    for (size_t i = 0; i < n; ++i) {
      Stored v;
      std::memcpy(&v, bytes + i * sizeof(Stored), sizeof(Stored));
      TUTEL_RETURN_IF_ERROR(convert(v, out[i], i));
    }
    return Status::OK();
  };
  switch (t.dtype) {
    case DType::kF32:
      if (n > 0) std::memcpy(out, bytes, n * sizeof(float));
      return Status::OK();
    case DType::kBF16:
      return each.operator()<uint16_t>([](uint16_t v, float& f, size_t) {
        f = bf16_to_f32(v);
        return Status::OK();
      });
    case DType::kF16:
      return each.operator()<uint16_t>([](uint16_t v, float& f, size_t) {
        f = f16_to_f32(v);
        return Status::OK();
      });
    case DType::kF64:
      return each.operator()<double>([&](double v, float& f, size_t i) {
        // A finite double that rounds past float's largest value (from halfway between it and
        // 2^128 on: round to nearest, ties to even, takes those to infinity) has no f32 value;
        // one below rounds to the largest.
        if (std::isfinite(v) && std::abs(v) >= 0x1.ffffffp127) {
          char text[32];
          const auto printed = std::to_chars(text, text + sizeof text, v);
          return Status::InvalidArgument("tensor " + quote_text(t.name) + " holds " + std::string(text, printed.ptr) +
                                         " at element " + std::to_string(i) + ", beyond the range of f32");
        }
        f = static_cast<float>(v);
        return Status::OK();
      });
    default:
      return Status::InvalidArgument("tensor " + quote_text(t.name) + " has dtype " + std::string(dtype_name(t.dtype)) +
                                     "; expected floating-point values (f32, f64, bf16 or f16)");
  }
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      mapping_(std::exchange(other.mapping_, nullptr)),
      mapping_size_(std::exchange(other.mapping_size_, 0)),
      owned_(std::move(other.owned_)),
      tensors_(std::move(other.tensors_)),
      index_(std::move(other.index_)),
      metadata_(std::move(other.metadata_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    mapping_ = std::exchange(other.mapping_, nullptr);
    mapping_size_ = std::exchange(other.mapping_size_, 0);
    owned_ = std::move(other.owned_);
    tensors_ = std::move(other.tensors_);
    index_ = std::move(other.index_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() { unmap(); }

void SafetensorsFile::unmap() noexcept {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
  mapping_ = nullptr;
  mapping_size_ = 0;
}

const SafetensorsTensor* SafetensorsFile::find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Result<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  try {
    // O_NONBLOCK keeps a FIFO at `path` from blocking the open; the S_ISREG check then
    // refuses it.
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
    if (!fd.valid()) return errno_status(errno, "cannot open", path);
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return errno_status(errno, "cannot stat", path);
    if (!S_ISREG(st.st_mode))
      return Status::InvalidArgument(file_context(path) + " is not a regular file");
    return map_file(fd.get(), path, static_cast<uint64_t>(st.st_size), ~uint64_t{0}, kMaxSafetensorsHeaderBytes);
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("out of memory reading " + file_context(path));
  } catch (const std::exception& e) {
    return Status::Internal("reading " + file_context(path) + ": " + e.what());
  }
}

Status SafetensorsFile::check_size(const std::string& what, uint64_t file_size, uint64_t max_bytes) {
  if (file_size > max_bytes)
    return Status::InvalidArgument(file_context(what) + " is " + std::to_string(file_size) + " bytes, more than the " +
                                   std::to_string(max_bytes) + " its reader takes");
  if (file_size < 8)
    return corrupt(what, "file is " + std::to_string(file_size) + " bytes, too short for the 8-byte header length");
  return Status::OK();
}

Result<SafetensorsFile> SafetensorsFile::map_file(int fd, const std::string& what, uint64_t file_size,
                                                  uint64_t max_bytes, uint64_t max_header_bytes) {
  TUTEL_RETURN_IF_ERROR(check_size(what, file_size, max_bytes));
  SafetensorsFile file;
  file.path_ = what;
  void* mapping = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (mapping == MAP_FAILED) return errno_status(errno, "cannot map", what);
  // The mapping keeps the file alive on its own; the descriptor is not needed past this.
  file.mapping_ = mapping;
  file.mapping_size_ = file_size;
  TUTEL_RETURN_IF_ERROR(file.parse(static_cast<const char*>(mapping), file_size, max_header_bytes));
  return file;
}

Result<SafetensorsFile> SafetensorsFile::read(int fd, const std::string& what, uint64_t max_bytes,
                                              uint64_t max_header_bytes) {
  try {
    struct stat st {};
    if (::fstat(fd, &st) != 0) return errno_status(errno, "cannot stat", what);
    if (!S_ISREG(st.st_mode))
      return Status::InvalidArgument(file_context(what) +
                                     " is not a regular file (give a memfd or an open file)");
    const auto file_size = static_cast<uint64_t>(st.st_size);
    TUTEL_RETURN_IF_ERROR(check_size(what, file_size, max_bytes));
    SafetensorsFile file;
    file.path_ = what;
    file.owned_.reset(new char[file_size]);
    // pread leaves the descriptor's offset, which the sender may share, as it was.
    for (uint64_t done = 0; done < file_size;) {
      const ssize_t n = ::pread(fd, file.owned_.get() + done, file_size - done, static_cast<off_t>(done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return errno_status(errno, "cannot read", what);
      if (n == 0)
        return corrupt(what, "file shrank from " + std::to_string(file_size) + " to " +
                                 std::to_string(done) + " bytes while it was read");
      done += static_cast<uint64_t>(n);
    }
    TUTEL_RETURN_IF_ERROR(file.parse(file.owned_.get(), file_size, max_header_bytes));
    return file;
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("out of memory reading " + file_context(what));
  } catch (const std::exception& e) {
    return Status::Internal("reading " + file_context(what) + ": " + e.what());
  }
}

Result<SafetensorsFile> SafetensorsFile::map_sealed(int fd, const std::string& what, uint64_t max_bytes,
                                                    uint64_t max_header_bytes) {
  try {
    struct stat st {};
    if (::fstat(fd, &st) != 0) return errno_status(errno, "cannot stat", what);
    const int seals = ::fcntl(fd, F_GET_SEALS);
    if (!S_ISREG(st.st_mode) || seals < 0 || (seals & F_SEAL_SHRINK) == 0 || (seals & F_SEAL_WRITE) == 0)
      return Status::InvalidArgument(file_context(what) +
                                     " is not a memfd sealed against shrinking and writing (F_SEAL_SHRINK, "
                                     "F_SEAL_WRITE); read() copies one that is not");
    return map_file(fd, what, static_cast<uint64_t>(st.st_size), max_bytes, max_header_bytes);
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("out of memory reading " + file_context(what));
  } catch (const std::exception& e) {
    return Status::Internal("reading " + file_context(what) + ": " + e.what());
  }
}

Status SafetensorsFile::parse(const char* bytes, uint64_t file_size, uint64_t max_header_bytes) {
  const std::string& path = path_;
  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes, 8);
  if (header_size > file_size - 8)
    return corrupt(path, "header length " + std::to_string(header_size) + " exceeds the " +
                             std::to_string(file_size - 8) +
                             " bytes that follow it; the file is truncated or not safetensors");
  if (header_size > kMaxSafetensorsHeaderBytes)
    return corrupt(path, "header length " + std::to_string(header_size) +
                             " is over the limit of " + std::to_string(kMaxSafetensorsHeaderBytes) + " bytes");
  if (header_size > max_header_bytes)
    return Status::InvalidArgument(file_context(path) + " has a header of " + std::to_string(header_size) +
                                   " bytes, more than the " + std::to_string(max_header_bytes) +
                                   " its reader takes (its tensors' names and metadata are longer than it expects)");
  const char* data_section = bytes + 8 + header_size;
  const uint64_t data_size = file_size - 8 - header_size;

  // JSON never holds a raw NUL, and nlohmann's lexer would take one for the end of input
  // and ignore whatever follows it.
  if (std::memchr(bytes + 8, '\0', header_size) != nullptr)
    return corrupt(path, "header is not valid JSON: it contains a NUL byte");

  HeaderScan scan;
  json::sax_parse(bytes + 8, data_section, &scan);
  if (!scan.error().empty()) return corrupt(path, scan.error());
  if (const std::string* name = scan.duplicate_root_key())
    return corrupt_tensor(path, *name, "appears more than once in the header");
  if (const std::string* key = scan.duplicate_metadata_key())
    return corrupt(path, "'__metadata__' key " + quote_text(*key) + " appears more than once");
  const json header = json::parse(bytes + 8, data_section, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) return corrupt(path, "header is not valid JSON");
  if (!header.is_object())
    return corrupt(path, std::string("header is a JSON ") + header.type_name() + ", expected an object");

  std::vector<ParsedEntry> entries;
  entries.reserve(header.size());
  for (const auto& [name, value] : header.items()) {
    if (name == kMetadataKey) {
      TUTEL_RETURN_IF_ERROR(parse_metadata(path, value, metadata_));
      continue;
    }
    TUTEL_ASSIGN_OR_RETURN(ParsedEntry entry, parse_entry(path, name, value, data_size));
    entries.push_back(std::move(entry));
  }

  std::sort(entries.begin(), entries.end(), [](const ParsedEntry& a, const ParsedEntry& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  // An empty tensor owns no bytes, so it cannot overlap anything wherever it points.
  const ParsedEntry* previous = nullptr;
  for (const ParsedEntry& entry : entries) {
    if (entry.begin == entry.end) continue;
    if (previous != nullptr && entry.begin < previous->end)
      return corrupt_tensor(path, entry.name,
                            "data [" + std::to_string(entry.begin) + ", " + std::to_string(entry.end) +
                                ") overlaps tensor " + quote_text(previous->name) + " at [" +
                                std::to_string(previous->begin) + ", " + std::to_string(previous->end) + ")");
    previous = &entry;
  }

  tensors_.reserve(entries.size());
  for (ParsedEntry& entry : entries) {
    index_.emplace(entry.name, tensors_.size());
    tensors_.push_back(SafetensorsTensor{std::move(entry.name), entry.dtype, entry.shape, data_section + entry.begin,
                                         static_cast<size_t>(entry.end - entry.begin)});
  }
  return Status::OK();
}

namespace {

Status write_all(int fd, const void* data, size_t size, const std::string& path) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_status(errno, "cannot write", path);
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return Status::OK();
}

// Removes the temporary file unless it was renamed into place.
class TempFileGuard {
 public:
  explicit TempFileGuard(std::string path) : path_(std::move(path)) {}
  TempFileGuard(const TempFileGuard&) = delete;
  TempFileGuard& operator=(const TempFileGuard&) = delete;
  ~TempFileGuard() {
    if (!committed_) ::unlink(path_.c_str());
  }
  void commit() { committed_ = true; }

 private:
  std::string path_;
  bool committed_ = false;
};

constexpr std::string_view kTempInfix = ".tmp-";
constexpr size_t kTempSuffixDigits = 16;

// A fresh, uniquely named file next to `path`, so the final rename stays within one
// filesystem. Created with 0666 so the process umask applies, as for any new file.
Result<std::pair<UniqueFd, std::string>> create_temp_file(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::random_device entropy;
  for (int attempt = 0; attempt < 16; ++attempt) {
    char suffix[17];
    (void)std::snprintf(suffix, sizeof(suffix), "%08x%08x", entropy(), entropy());
    std::string name(1, '.');  // appended piece by piece: GCC 12's -Wrestrict misfires on "." + ...
    name += target.filename().string();
    name += kTempInfix;
    name += suffix;
    std::string temp = (dir / name).string();
    const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0) return std::make_pair(UniqueFd(fd), std::move(temp));
    if (errno != EEXIST) return errno_status(errno, "cannot create a temporary file for", path);
  }
  return Status::IOError("cannot create a unique temporary file for " + file_context(path));
}

// What is at `path` now, if anything: a regular file the write may replace. A rename replaces
// whatever name it lands on, so without this a checkpoint written to a mistyped path replaced
// a device node, a FIFO or a symbolic link with a file (an operator's checkpoint to /dev/null,
// written by a daemon running as root, replaced /dev/null). Checked before anything is written;
// the rename itself never follows a link, so a name swapped in meanwhile is only replaced.
Result<std::optional<struct stat>> file_to_replace(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return std::optional<struct stat>();
    return errno_status(errno, "cannot inspect", path);
  }
  if (S_ISREG(st.st_mode)) return std::optional<struct stat>(st);
  const char* kind = S_ISLNK(st.st_mode)    ? "a symbolic link"
                     : S_ISDIR(st.st_mode)  ? "a directory"
                     : S_ISFIFO(st.st_mode) ? "a FIFO"
                     : S_ISSOCK(st.st_mode) ? "a socket"
                     : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device"
                                                                   : "not a regular file";
  return Status::InvalidArgument("cannot write " + file_context(path) + ": it exists and is " + kind +
                                 ", which a checkpoint never replaces; choose another path (nothing was written)");
}

// The new file is never more open than the file it replaces: it keeps only the permission bits
// both the old file and a new one (this process's umask, a directory's default ACL) would give,
// and the old file's group, so a private file stays private (a root daemon running with its own
// group would otherwise open a user's 0640 file to that group). Where the group cannot be
// carried (a process not in it), the group has no access at all. Never wider (a file someone
// else placed there with mode 0666 must not make a checkpoint writable by all). The owner is not
// carried: a daemon running as root that gave the temporary file to the old file's owner let
// that user, in a sticky directory such as /tmp, move it and put a link in its place before the
// rename (the review's probe). The group gives no such right: in a sticky directory only the
// owner renames.
Status narrow_access(int fd, const struct stat& old, const std::string& path) {
  struct stat created {};
  if (::fstat(fd, &created) != 0) return errno_status(errno, "cannot inspect the temporary file for", path);
  mode_t mode = created.st_mode & old.st_mode & 0777;
  if (created.st_gid != old.st_gid && ::fchown(fd, static_cast<uid_t>(-1), old.st_gid) != 0) mode &= ~mode_t{070};
  if (mode != (created.st_mode & 0777) && ::fchmod(fd, mode) != 0)
    return errno_status(errno, "cannot narrow the new file's mode to that of", path);
  return Status::OK();
}

Status fsync_directory_of(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  return fsync_directory(target.has_parent_path() ? target.parent_path().string() : ".");
}

// The header text, padded so the data section starts 8-byte aligned (and with it the first
// tensor), and each tensor's byte size. Built member by member rather than as one
// ordered_json, whose linear key lookups would make this quadratic in the tensor count.
// `filled_later`: a tensor may come without data (its writer fills it in place).
Result<std::string> build_header(const std::string& path,
                                 const std::vector<SafetensorsEntry>& tensors,
                                 const std::map<std::string, std::string>& metadata,
                                 std::vector<size_t>& sizes, bool filled_later = false) {
  std::string text = "{";
  const auto append_member = [&](const std::string& key, const json& value) {
    if (text.size() > 1) text += ',';
    text += json(key).dump();
    text += ':';
    text += value.dump();
  };
  std::set<std::string_view> names;
  uint64_t offset = 0;
  try {
    if (!metadata.empty()) append_member(std::string(kMetadataKey), metadata);
    for (const SafetensorsEntry& t : tensors) {
      const auto refuse = [&](std::string_view problem) {
        return Status::InvalidArgument("cannot write " + file_context(path) + ": tensor " + quote_text(t.name) +
                                       " " + std::string(problem));
      };
      if (t.name == kMetadataKey) return refuse("uses the reserved name");
      if (!names.insert(t.name).second) return refuse("is given more than once");
      for (int64_t d : t.shape)
        if (d < 0) return refuse("has negative dimension in shape " + t.shape.to_string());
      const std::optional<ShapeSize> size = shape_size(t.shape, t.dtype);
      if (!size) return refuse("has too many elements in shape " + t.shape.to_string());
      if (t.data == nullptr && size->nbytes > 0 && !filled_later) return refuse("has no data");
      uint64_t end = 0;
      if (__builtin_add_overflow(offset, size->nbytes, &end))
        return refuse("overflows the file size");
      append_member(t.name, {{"dtype", std::string(safetensors_dtype_name(t.dtype))},
                             {"shape", std::vector<int64_t>(t.shape.begin(), t.shape.end())},
                             {"data_offsets", json::array({offset, end})}});
      sizes.push_back(static_cast<size_t>(size->nbytes));
      offset = end;
    }
  } catch (const json::type_error& e) {
    return Status::InvalidArgument("cannot write " + file_context(path) +
                                   ": tensor names and metadata must be valid UTF-8 (" + e.what() +
                                   ")");
  }
  text += '}';
  text.append((8 - text.size() % 8) % 8, ' ');
  return text;
}

Status write_safetensors_impl(const std::string& path, const std::vector<SafetensorsEntry>& tensors,
                              const std::map<std::string, std::string>& metadata, const SafetensorsFill& fill) {
  std::vector<size_t> sizes;
  sizes.reserve(tensors.size());
  TUTEL_ASSIGN_OR_RETURN(const std::string header_text,
                         build_header(path, tensors, metadata, sizes, /*filled_later=*/static_cast<bool>(fill)));
  const uint64_t header_size = header_text.size();

  TUTEL_ASSIGN_OR_RETURN(const std::optional<struct stat> replaced, file_to_replace(path));
  TUTEL_ASSIGN_OR_RETURN(auto temp, create_temp_file(path));
  auto& [fd, temp_path] = temp;
  TempFileGuard guard(temp_path);
  if (replaced) TUTEL_RETURN_IF_ERROR(narrow_access(fd.get(), *replaced, path));
  TUTEL_RETURN_IF_ERROR(write_all(fd.get(), &header_size, 8, path));
  TUTEL_RETURN_IF_ERROR(write_all(fd.get(), header_text.data(), header_text.size(), path));
  std::vector<char> chunk;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (sizes[i] == 0) continue;
    if (tensors[i].data != nullptr) {
      TUTEL_RETURN_IF_ERROR(write_all(fd.get(), tensors[i].data, sizes[i], path));
      continue;
    }
    // Staged through a bounded buffer (a device tensor): never a whole tensor's copy here.
    chunk.resize(std::min<size_t>(sizes[i], kFillChunkBytes));
    for (size_t done = 0; done < sizes[i];) {
      const size_t n = std::min(chunk.size(), sizes[i] - done);
      TUTEL_RETURN_IF_ERROR(fill(i, done, chunk.data(), n));
      TUTEL_RETURN_IF_ERROR(write_all(fd.get(), chunk.data(), n, path));
      done += n;
    }
  }
  if (::fsync(fd.get()) != 0) return errno_status(errno, "cannot sync", path);
  if (const int err = fd.close(); err != 0) return errno_status(err, "cannot close", path);
  if (::rename(temp_path.c_str(), path.c_str()) != 0)
    return errno_status(errno, "cannot rename the temporary file onto", path);
  guard.commit();
  // Without this the rename itself may not survive a crash.
  const Status synced = fsync_directory_of(path);
  if (!synced.ok())
    return synced.with_context(path + " was replaced by the new file, but the rename may not survive a crash");
  return synced;
}

}  // namespace

Status fsync_directory(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid() || ::fsync(fd.get()) != 0) {
    const int err = errno;
    return Status::IOError("cannot sync the directory '" + dir + "' to disk: " + errno_text(err));
  }
  return Status::OK();
}

Status write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& tensors,
                         const std::map<std::string, std::string>& metadata, const SafetensorsFill& fill) {
  try {
    return write_safetensors_impl(path, tensors, metadata, fill);
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("out of memory writing " + file_context(path));
  } catch (const std::exception& e) {
    return Status::Internal("writing " + file_context(path) + ": " + e.what());
  }
}

Status pwrite_all(int fd, const void* data, size_t size, uint64_t at, const std::string& what) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::pwrite(fd, p, size, static_cast<off_t>(at));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_status(errno, "cannot write", what);
    p += n;
    at += static_cast<uint64_t>(n);
    size -= static_cast<size_t>(n);
  }
  return Status::OK();
}

Result<uint64_t> write_safetensors_into(int fd, const std::string& what,
                                        const std::vector<SafetensorsEntry>& tensors,
                                        const std::map<std::string, std::string>& metadata,
                                        const SafetensorsFill& fill) {
  try {
    std::vector<size_t> sizes;
    sizes.reserve(tensors.size());
    TUTEL_ASSIGN_OR_RETURN(const std::string header_text,
                           build_header(what, tensors, metadata, sizes, /*filled_later=*/static_cast<bool>(fill)));
    uint64_t file_size = 8 + header_text.size();
    for (size_t size : sizes) file_size += size;

    TUTEL_RETURN_IF_ERROR(check_memory_file(fd, "the descriptor to write " + file_context(what) + " into"));
    struct stat st {};
    if (::fstat(fd, &st) != 0) return errno_status(errno, "cannot stat", what);
    const int seals = ::fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & F_SEAL_SHRINK) == 0 || (seals & (F_SEAL_WRITE | kSealFutureWrite)) != 0)
      return Status::InvalidArgument(file_context(what) +
                                     ": the memfd to write it into must be sealed against shrinking "
                                     "(F_SEAL_SHRINK) and not against writing");
    const auto memfd_size = static_cast<uint64_t>(st.st_size);
    if (memfd_size < file_size)
      return Status::InvalidArgument(file_context(what) + " takes " + std::to_string(file_size) +
                                     " bytes, more than the " + std::to_string(memfd_size) + " of the memfd given");
    // Pages the sender allocated are charged to it; pages this process filled in would be
    // charged here, and the sender could hold them for good. So the memfd must have no hole.
    // (st_blocks alone would not see a hole beside pages reserved past the end.) A sender that
    // punches one while this writes still gets it filled here, at this process's charge.
    TUTEL_ASSIGN_OR_RETURN(const uint64_t hole, first_hole(fd));
    if (hole < memfd_size)
      return Status::InvalidArgument(file_context(what) + ": the memfd given has a hole at byte " +
                                     std::to_string(hole) + " of its " + std::to_string(memfd_size) +
                                     "; touch every page first (write it, or map it with MAP_POPULATE)");
    // pwrite, not a mapping: a page the sender punched out meanwhile that cannot be had again
    // is an error here, where a write through a mapping would raise SIGBUS.
    const uint64_t header_size = header_text.size();
    TUTEL_RETURN_IF_ERROR(pwrite_all(fd, &header_size, 8, 0, what));
    TUTEL_RETURN_IF_ERROR(pwrite_all(fd, header_text.data(), header_text.size(), 8, what));
    std::vector<char> chunk;
    uint64_t at = 8 + header_text.size();
    for (size_t i = 0; i < tensors.size(); at += sizes[i], ++i) {
      if (sizes[i] == 0) continue;
      if (tensors[i].data != nullptr) {
        TUTEL_RETURN_IF_ERROR(pwrite_all(fd, tensors[i].data, sizes[i], at, what));
        continue;
      }
      // Staged through a bounded buffer (a device tensor): never a whole tensor's copy here.
      chunk.resize(std::min<size_t>(sizes[i], kFillChunkBytes));
      for (size_t done = 0; done < sizes[i];) {
        const size_t n = std::min(chunk.size(), sizes[i] - done);
        TUTEL_RETURN_IF_ERROR(fill(i, done, chunk.data(), n));
        TUTEL_RETURN_IF_ERROR(pwrite_all(fd, chunk.data(), n, at + done, what));
        done += n;
      }
    }
    return file_size;
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("out of memory writing " + file_context(what));
  } catch (const std::exception& e) {
    return Status::Internal("writing " + file_context(what) + ": " + e.what());
  }
}

bool is_safetensors_temp_name(std::string_view filename) {
  if (filename.size() < 1 + kTempInfix.size() + kTempSuffixDigits || filename.front() != '.') return false;
  const std::string_view suffix = filename.substr(filename.size() - kTempSuffixDigits);
  for (const char c : suffix)
    if (!std::isxdigit(static_cast<unsigned char>(c))) return false;
  return filename.substr(filename.size() - kTempSuffixDigits - kTempInfix.size(), kTempInfix.size()) == kTempInfix;
}

}  // namespace tutel
