// A tenant's disk quota for the checkpoints its clients save (state_dir/<tenant>/checkpoints):
// what the files there hold, plus the saves under way, against the tenant's
// max_checkpoint_bytes. state_dir also holds every tenant's exit checkpoints, so one tenant
// filling the disk would cost the others their weights at the next shutdown.
//
// A save reserves an upper bound of its file's size first (replacing a file counts only what it
// adds), so concurrent saves cannot pass the quota together; the reservation ends with the
// save, when the file itself counts. Usage is measured from the directory at each reservation,
// so files removed by the operator give their room back at once: regular files, and 4 KiB for
// each directory (a save may create some); symbolic links are neither followed nor counted, and
// a save's temporary file (core/safetensors.hpp) not at all, since its reservation covers it.
// The caller refuses client paths named like temporary files, and remove_interrupted_saves()
// clears the ones a crash left.
//
// Thread-safety: reserve() may be called from any thread; a Reservation is released on the
// thread that destroys it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <mutex>
#include <string>

#include "tutel/core/status.hpp"

namespace tutel::daemon {

class CheckpointQuota {
 public:
  CheckpointQuota(std::string tenant, std::string dir, uint64_t max_bytes)
      : tenant_(std::move(tenant)), dir_(std::move(dir)), max_bytes_(max_bytes) {}
  CheckpointQuota(const CheckpointQuota&) = delete;
  CheckpointQuota& operator=(const CheckpointQuota&) = delete;

  class Reservation {
   public:
    Reservation() = default;
    Reservation(Reservation&& other) noexcept { *this = std::move(other); }
    Reservation& operator=(Reservation&& other) noexcept;
    ~Reservation() { release(); }

   private:
    friend class CheckpointQuota;
    void release();
    CheckpointQuota* quota_ = nullptr;
    uint64_t bytes_ = 0;
  };

  // Room for a file of at most `bytes` at `path` (inside the directory), or ResourceExhausted
  // saying what the tenant holds and what to do.
  Result<Reservation> reserve(const std::string& path, uint64_t bytes);
  // What the directory's files hold now (an IOError when it cannot be read).
  Result<uint64_t> used_bytes() const;
  // Removes the temporary files of saves that never finished (the daemon was killed): call it
  // while no save runs. Returns how many went; one that cannot be removed is logged and left
  // (it counts against no quota). An IOError only when the directory cannot be read.
  Result<int64_t> remove_interrupted_saves();
  // What a directory counts for.
  static constexpr uint64_t kDirectoryBytes = 4096;

 private:
  // Calls `visit` for every entry under the directory, links neither followed nor visited.
  Status for_each_entry(const std::function<void(const std::filesystem::directory_entry&)>& visit) const;

  const std::string tenant_;
  const std::string dir_;
  const uint64_t max_bytes_;
  std::mutex mutex_;
  uint64_t reserved_ = 0;  // under mutex_
};

}  // namespace tutel::daemon
