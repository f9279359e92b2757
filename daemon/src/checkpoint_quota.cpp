#include "checkpoint_quota.hpp"

#include <algorithm>
#include <filesystem>
#include <functional>
#include <system_error>
#include <utility>
#include <vector>

#include "tutel/core/logging.hpp"
#include "tutel/core/safetensors.hpp"

namespace tutel::daemon {

namespace fs = std::filesystem;

CheckpointQuota::Reservation& CheckpointQuota::Reservation::operator=(Reservation&& other) noexcept {
  if (this != &other) {
    release();
    quota_ = std::exchange(other.quota_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void CheckpointQuota::Reservation::release() {
  if (quota_ == nullptr) return;
  std::lock_guard lock(quota_->mutex_);
  quota_->reserved_ -= bytes_;
  quota_ = nullptr;
}

Status CheckpointQuota::for_each_entry(const std::function<void(const fs::directory_entry&)>& visit) const {
  std::error_code ec;
  if (!fs::exists(dir_, ec)) return Status::OK();
  // Links are neither followed nor visited: the daemon writes none, and one placed by hand must
  // not make the quota read the file system outside the directory.
  for (fs::recursive_directory_iterator it(dir_, fs::directory_options::none, ec), end; !ec && it != end;
       it.increment(ec)) {
    std::error_code entry_ec;
    if (it->is_symlink(entry_ec)) {
      it.disable_recursion_pending();
      continue;
    }
    visit(*it);
  }
  if (ec) return Status::IOError("cannot list tenant '" + tenant_ + "''s checkpoints in " + dir_ + ": " + ec.message());
  return Status::OK();
}

Result<uint64_t> CheckpointQuota::used_bytes() const {
  uint64_t used = 0;
  TUTEL_RETURN_IF_ERROR(for_each_entry([&](const fs::directory_entry& entry) {
    std::error_code ec;
    if (entry.is_directory(ec)) {
      used += kDirectoryBytes;
    } else if (entry.is_regular_file(ec) && !is_safetensors_temp_name(entry.path().filename().string())) {
      const uintmax_t size = entry.file_size(ec);
      if (!ec) used += size;
    }
  }));
  return used;
}

Result<int64_t> CheckpointQuota::remove_interrupted_saves() {
  std::vector<fs::path> stale;
  TUTEL_RETURN_IF_ERROR(for_each_entry([&](const fs::directory_entry& entry) {
    std::error_code ec;
    if (entry.is_regular_file(ec) && is_safetensors_temp_name(entry.path().filename().string()))
      stale.push_back(entry.path());
  }));
  int64_t removed = 0;
  for (const fs::path& p : stale) {
    std::error_code ec;
    if (fs::remove(p, ec)) {
      ++removed;
    } else if (ec) {
      // Not the start's concern: a temporary file counts against no quota, and it is this
      // tenant's directory alone that the operator must mend (one left here stopped every
      // tenant's daemon).
      TUTEL_LOG(WARN) << "cannot remove " << p.string() << ", a temporary file of a save that never finished: "
                      << ec.message() << "; remove it by hand, and check that tuteld may write to " << dir_;
    }
  }
  return removed;
}

Result<CheckpointQuota::Reservation> CheckpointQuota::reserve(const std::string& path, uint64_t bytes) {
  std::lock_guard lock(mutex_);
  TUTEL_ASSIGN_OR_RETURN(uint64_t used, used_bytes());
  // A save over an existing file replaces it.
  std::error_code ec;
  if (fs::is_regular_file(fs::symlink_status(path, ec))) {
    const uintmax_t old = fs::file_size(path, ec);
    if (!ec) used -= std::min<uint64_t>(used, old);
  }
  if (bytes > max_bytes_ || used + reserved_ > max_bytes_ - bytes)
    return Status::ResourceExhausted(
        "a checkpoint of up to " + std::to_string(bytes) + " bytes would take tenant '" + tenant_ + "''s saved files to " +
        std::to_string(used + reserved_ + bytes) + " bytes, over its max_checkpoint_bytes " +
        std::to_string(max_bytes_) +
        ": save over a checkpoint it no longer needs (the same path), or have the operator remove old ones from " + dir_ +
        " or raise max_checkpoint_bytes");
  reserved_ += bytes;
  Reservation r;
  r.quota_ = this;
  r.bytes_ = bytes;
  return r;
}

}  // namespace tutel::daemon
