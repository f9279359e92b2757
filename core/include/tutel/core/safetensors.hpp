// Reading and writing safetensors files (https://github.com/huggingface/safetensors).
//
// Layout: an 8-byte little-endian u64 N, N bytes of JSON header, then the data section.
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
// (offsets relative to the data section) plus an optional "__metadata__" string map.
// Multi-byte elements are little-endian, the host's own order (checked at compile time),
// so tensors are used in place with no conversion.
//
// The reader maps the file read-only (or, from another process's descriptor, reads it into
// its own memory) and validates the whole header before returning, so every tensor it hands
// out lies inside the file. The data is only as aligned as the file
// made it: write_safetensors aligns the data section to 8 bytes and packs tensors in the
// order given, so listing them by descending dtype size keeps every tensor aligned.
//
// A mapped file must not be truncated or rewritten in place while open: touching a page past
// its new end raises SIGBUS. write_safetensors replaces a file by rename, which leaves open
// readers on the old contents.
//
// Thread-safety: an open SafetensorsFile is immutable; any number of threads may read it.
// write_safetensors may run concurrently, even for one path: the last rename wins.
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "tutel/core/dtype.hpp"
#include "tutel/core/status.hpp"
#include "tutel/core/tensor.hpp"

namespace tutel {

// One tensor inside an open SafetensorsFile; `data` points into the read-only mapping and
// stays valid while the file (or the object it was moved into) lives.
struct SafetensorsTensor {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  const void* data = nullptr;
  size_t nbytes = 0;

  // A CPU view of the mapped bytes. The mapping is read-only: writing through the view
  // faults.
  TensorView view() const;
};

// Copies the `t.shape.numel()` values of a floating-point tensor (f32, f64, bf16 or f16) into
// `out` as f32: f32 as it is, bf16 and f16 exactly, f64 rounded to the nearest f32 (as
// PyTorch's .float() rounds). The bytes carry only the file's alignment, so they are copied,
// never cast in place. Infinities and NaN carry over. InvalidArgument naming the tensor for an
// integer dtype, and for a finite f64 that would round to infinity (it has no f32 value).
Status read_as_f32(const SafetensorsTensor& t, float* out);

// The longest header any reader takes (the reference implementation's bound).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = uint64_t{100} << 20;

class SafetensorsFile {
 public:
  // Maps and validates `path`. Errors name the file and, where one is at fault, the
  // tensor: NotFound / PermissionDenied / IOError when the file can't be read, Corruption
  // when its contents are not a valid safetensors file.
  static Result<SafetensorsFile> open(const std::string& path);
  // Reads the file `fd` holds (from offset 0, with pread: the descriptor's offset stays as it
  // was) into memory the object owns, and validates it as open() does. For a file another
  // process handed over: a mapping of it could be truncated under this process (SIGBUS), a copy
  // cannot. Refuses anything but a regular file, and a file over `max_bytes` before reading
  // it (InvalidArgument). `what` names it in errors. The tensors' data is aligned only as the
  // file made it (see above). A header over `max_header_bytes` is refused (InvalidArgument)
  // before it is parsed: a reader that knows what the file may hold bounds the memory its
  // parse takes (a JSON tree is many times its text).
  static Result<SafetensorsFile> read(int fd, const std::string& what, uint64_t max_bytes,
                                      uint64_t max_header_bytes = kMaxSafetensorsHeaderBytes);
  // Maps the file `fd` holds without copying it, as open() maps a path, where it can neither
  // shrink nor change: a memfd sealed against shrinking and writing (F_SEAL_SHRINK,
  // F_SEAL_WRITE; the write seal also forbids punching holes). InvalidArgument for any other
  // descriptor (read() copies those), and for a file over `max_bytes` (a file that grows later
  // is mapped at the size it had). The caller checks that the file is in ordinary memory
  // (check_memory_file) and has no hole (first_hole): reading a hole through the mapping
  // would allocate a page, at this process's charge, or fault where none can be had.
  static Result<SafetensorsFile> map_sealed(int fd, const std::string& what, uint64_t max_bytes,
                                            uint64_t max_header_bytes = kMaxSafetensorsHeaderBytes);

  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  // Sorted by position in the data section.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  // nullptr when there is no tensor of that name.
  const SafetensorsTensor* find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  void unmap() noexcept;
  // Validates the header of the file's `size` bytes at `bytes` (mapped or owned) and fills
  // tensors_, index_ and metadata_.
  Status parse(const char* bytes, uint64_t size, uint64_t max_header_bytes);
  // InvalidArgument over `max_bytes`, Corruption under the 8-byte length prefix.
  static Status check_size(const std::string& what, uint64_t file_size, uint64_t max_bytes);
  // Maps the `file_size` bytes of the regular file `fd` read-only and parses them.
  static Result<SafetensorsFile> map_file(int fd, const std::string& what, uint64_t file_size,
                                          uint64_t max_bytes, uint64_t max_header_bytes);

  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  std::unique_ptr<char[]> owned_;  // read(): the file's bytes
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// A tensor to write: `data` holds shape.numel() * dtype_size(dtype) bytes, row-major.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  const void* data = nullptr;
};

// Writes bytes [offset, offset + size) of tensor `index` into `dst` (host memory): a tensor
// whose data is not in host memory (a device tensor), staged a bounded chunk at a time.
using SafetensorsFill = std::function<Status(size_t index, uint64_t offset, void* dst, size_t size)>;
// The most bytes a fill is asked for at once.
inline constexpr size_t kFillChunkBytes = size_t{8} << 20;

// Syncs directory `dir` to disk (its entries: a file renamed or created in it, a subdirectory
// made); IOError naming it otherwise.
Status fsync_directory(const std::string& dir);

// Writes `tensors` in the order given, with `metadata` as "__metadata__" when not empty.
// Atomic: the bytes go to a temporary file in the same directory, which is fsynced and
// renamed over `path`, then the directory is fsynced; on failure `path` is untouched and
// the temporary file removed, except when only that last fsync fails: then `path` already
// holds the new file (the error says the rename may not survive a crash). An existing `path`
// must be a regular file (a symbolic link, device, FIFO, socket or directory is refused before
// anything is written); the new file is never more open than it was (it keeps the permission
// bits that both it and a new file would have, and the old file's group, or no group access
// where that group cannot be given) and belongs to this process. Refuses duplicate
// names, the reserved name "__metadata__", negative dimensions and null data for a non-empty
// tensor, unless `fill` is given: then such a tensor's bytes come from it, a chunk at a time.
Status write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& tensors,
                         const std::map<std::string, std::string>& metadata = {},
                         const SafetensorsFill& fill = {});

// Writes a safetensors file, laid out as write_safetensors lays one out, at the start of the
// memfd `fd` that another process handed over to be filled (a layer's state for a client);
// returns the file's size. The memfd must be in ordinary memory (check_memory_file), sealed
// against shrinking and not against writing (F_SEAL_WRITE, F_SEAL_FUTURE_WRITE), at least as
// large as the file, and without holes (every page written, or faulted in by MAP_POPULATE; a
// page fallocate reserved is a hole to SEEK_HOLE until it is written): its memory is the
// sender's, and none is allocated here, unless the sender punches a hole while this writes.
// It writes with pwrite, never through a mapping, so such a hole is at worst an error, never
// SIGBUS. Where `fill` is given, a tensor may come with null data: its bytes come from fill.
// `what` names the file in errors.
Result<uint64_t> write_safetensors_into(int fd, const std::string& what,
                                        const std::vector<SafetensorsEntry>& tensors,
                                        const std::map<std::string, std::string>& metadata = {},
                                        const SafetensorsFill& fill = {});

// Whether `filename` (no directory) has the form of write_safetensors' temporary files
// (".<name>.tmp-" and 16 hex digits): one whose writer was interrupted if no write runs.
bool is_safetensors_temp_name(std::string_view filename);

}  // namespace tutel
