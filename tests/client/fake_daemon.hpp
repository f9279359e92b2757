// A stand-in for tuteld that speaks the wire protocol (hello + arena, control frames, the rings)
// with trivial arithmetic instead of an MoE, so the client library's mechanics can be tested
// without the daemon: forward y = 2·x, backward dx = 3·dy, l_aux = 0.5, capacity = tokens.
// Behaviours a test can ask for: refuse the hello, fail one request, hang up after N requests,
// hold every completion back until the test lets them go, leave a field out of MapRegion's reply. Device regions are host memfds (their
// data requests fail: the worker computes only in the arena); it records which were unmapped.
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "tutel/core/shared_memory.hpp"
#include "tutel/ipc/arena.hpp"
#include "tutel/ipc/json_body.hpp"
#include "tutel/ipc/ring.hpp"
#include "tutel/ipc/socket.hpp"

namespace tutel::client::testing {

// A fresh directory under /tmp, removed with its contents on destruction.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/tutel-client-XXXXXX";
    if (::mkdtemp(tmpl) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct FakeDaemonOptions {
  uint64_t arena_bytes = 1ull << 20;
  int64_t model_dim = 4;
  std::optional<Status> refuse;        // hello: send this error with request id 0, then hang up
  uint64_t fail_request = 0;           // the data request this many in (from 1) completes with an error
  uint64_t hang_up_after = 0;          // close the session when this many data requests arrived
  std::chrono::milliseconds delay{0};  // before each completion
  std::string map_region_omits;        // MapRegion: the reply lacks this field (a broken daemon)
  uint64_t state_bytes = 4096;         // LayerInfo's; 0: omitted (a daemon without ExportState)
};

class FakeDaemon {
 public:
  FakeDaemon(std::string path, FakeDaemonOptions options)
      : path_(std::move(path)), options_(options) {
    auto fd = ipc::listen_unix(path_, 0600);
    if (!fd.ok()) {
      error_ = fd.status().to_string();
      return;
    }
    listen_fd_ = std::move(*fd);
    thread_ = std::thread([this] { serve(); });
  }
  ~FakeDaemon() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  FakeDaemon(const FakeDaemon&) = delete;
  FakeDaemon& operator=(const FakeDaemon&) = delete;

  const std::string& error() const { return error_; }
  int64_t steps() const { return steps_; }
  uint64_t requests_seen() const { return requests_seen_; }
  // The sequences of the discards it was sent, in order.
  std::vector<uint64_t> discarded() const {
    std::lock_guard lock(discarded_mutex_);
    return discarded_;
  }
  nlohmann::json last_hello() {
    std::lock_guard<std::mutex> lock(mutex_);
    return hello_;
  }
  // While on, requests are taken but not completed, so a client's wait times out for sure.
  void hold_completions(bool on) { hold_ = on; }
  // While on, step requests are read but never answered, so a control call times out for sure.
  void hold_step_replies(bool on) { hold_steps_ = on; }
  // The body of the next GradNorm replies (a daemon's, or a broken one's).
  void set_grad_norm_reply(nlohmann::json body) {
    std::lock_guard<std::mutex> lock(mutex_);
    grad_norm_reply_ = std::move(body);
  }
  // The body of the next ExportState replies; the fake writes nothing into the memfd.
  void set_export_state_reply(nlohmann::json body) {
    std::lock_guard<std::mutex> lock(mutex_);
    export_state_reply_ = std::move(body);
  }
  // How many descriptors each ExportState and ImportState frame carried, in order.
  std::vector<size_t> state_frame_fds() {
    std::lock_guard<std::mutex> lock(mutex_);
    return state_frame_fds_;
  }
  // What the last ImportState's descriptor held, and whether it was a memfd.
  std::pair<std::string, bool> last_import() {
    std::lock_guard<std::mutex> lock(mutex_);
    return last_import_;
  }
  // Its inode: the file the client sent, or a copy of it.
  ino_t last_import_inode() {
    std::lock_guard<std::mutex> lock(mutex_);
    return last_import_inode_;
  }
  // The device regions clients unmapped (kUnmapRegion), in order.
  nlohmann::json grad_norm_reply_ = {{"norm", 1.5}};
  nlohmann::json export_state_reply_ = {{"bytes", 16}};
  std::vector<size_t> state_frame_fds_;
  std::pair<std::string, bool> last_import_;
  ino_t last_import_inode_ = 0;
  std::vector<int64_t> unmapped_regions() {
    std::lock_guard<std::mutex> lock(mutex_);
    return unmapped_;
  }

 private:
  void serve() {
    while (!stop_) {
      pollfd p{listen_fd_.get(), POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      ipc::UniqueFd conn(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!conn.valid()) continue;
      session(std::move(conn));
    }
  }

  // One client session, served until it hangs up or the daemon stops.
  void session(ipc::UniqueFd conn) {
    if (options_.refuse) {
      (void)ipc::send_error(conn.get(), 0, *options_.refuse);
      return;
    }
    std::optional<ipc::Arena> arena;
    std::map<int64_t, SharedMemory> regions;
    std::thread worker;
    std::atomic<bool> session_stop{false};
    std::atomic<bool> hang_up{false};
    auto end_session = [&] {
      session_stop = true;
      if (worker.joinable()) worker.join();
    };
    while (!stop_ && !hang_up) {
      pollfd p{conn.get(), POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      auto frame = ipc::recv_frame(conn.get(), std::chrono::milliseconds(1000));
      if (!frame.ok()) break;  // the client hung up
      const uint32_t rid = frame->header.request_id;
      auto body = ipc::parse_body(*frame);
      if (!body.ok()) break;
      using FT = ipc::FrameType;
      switch (static_cast<FT>(frame->header.type)) {
        case FT::kHello: {
          {
            std::lock_guard<std::mutex> lock(mutex_);
            hello_ = *body;
          }
          auto created = ipc::Arena::create(options_.arena_bytes);
          if (!created.ok()) {
            (void)ipc::send_error(conn.get(), rid, created.status());
            break;
          }
          arena = std::move(*created);
          nlohmann::json reply{{"session", 1}, {"tenant", "fake"}, {"spin_us", 10}};
          ipc::put_layout(reply, arena->layout());
          (void)ipc::send_json(conn.get(), FT::kHelloReply, rid, reply, {arena->fd()});
          worker = std::thread([&] { run_worker(*arena, session_stop, hang_up, conn.get()); });
          break;
        }
        case FT::kCreateLayer:
        case FT::kAttachLayer: {
          const std::string name = body->value("name", std::string("fake_layer"));
          if (name == "oversized_reply") {  // a broken daemon: a header announcing 64 MiB of body
            ipc::FrameHeader h;
            h.type = static_cast<uint16_t>(FT::kLayerInfo);
            h.body_length = 64u << 20;
            h.request_id = rid;
            (void)!::write(conn.get(), &h, sizeof h);
            break;
          }
          if (name == "missing") {
            (void)ipc::send_error(
                conn.get(), rid,
                Status::NotFound("tenant 'fake' has no layer 'missing'; create it first"));
            break;
          }
          nlohmann::json info{{"handle", 7},
                              {"name", name},
                              {"experts", 4},
                              {"model_dim", options_.model_dim},
                              {"hidden", 8},
                              {"output_dim", options_.model_dim},
                              {"k", 2},
                              {"step", 0}};
          if (options_.state_bytes != 0) info["state_bytes"] = options_.state_bytes;
          (void)ipc::send_json(conn.get(), FT::kLayerInfo, rid, info);
          break;
        }
        case FT::kMapRegion: {
          const int64_t bytes = body->value("bytes", int64_t{0});
          auto memory = SharedMemory::create(static_cast<size_t>(bytes), "fake device region");
          if (!memory.ok()) {
            (void)ipc::send_error(conn.get(), rid, memory.status());
            break;
          }
          const int64_t id = static_cast<int64_t>(regions.size()) + 1;
          nlohmann::json reply{{"region", id}, {"bytes", bytes}, {"kind", "host_memfd"}, {"device", "cpu"}};
          reply.erase(options_.map_region_omits);
          (void)ipc::send_json(conn.get(), FT::kOk, rid, reply, {memory->fd()});
          regions.emplace(id, std::move(*memory));
          break;
        }
        case FT::kUnmapRegion: {
          {
            std::lock_guard<std::mutex> lock(mutex_);
            unmapped_.push_back(body->value("region", int64_t{0}));
          }
          (void)ipc::send_json(conn.get(), FT::kOk, rid, nlohmann::json::object());
          break;
        }
        case FT::kStep:
          if (!hold_steps_) (void)ipc::send_json(conn.get(), FT::kOk, rid, {{"step", ++steps_}});
          break;
        case FT::kGradNorm: {
          nlohmann::json reply;
          {
            std::lock_guard<std::mutex> lock(mutex_);
            reply = grad_norm_reply_;
          }
          (void)ipc::send_json(conn.get(), FT::kOk, rid, reply);
          break;
        }
        case FT::kExportState:
        case FT::kImportState: {
          nlohmann::json reply = nlohmann::json::object();
          {
            std::lock_guard<std::mutex> lock(mutex_);
            state_frame_fds_.push_back(frame->fds.size());
            if (static_cast<FT>(frame->header.type) == FT::kExportState) reply = export_state_reply_;
            else if (frame->fds.size() == 1) {
              const int fd = frame->fds[0].get();
              std::string contents(static_cast<size_t>(std::max<off_t>(::lseek(fd, 0, SEEK_END), 0)), '\0');
              const ssize_t n = ::pread(fd, contents.data(), contents.size(), 0);
              contents.resize(n > 0 ? static_cast<size_t>(n) : 0);
              struct stat st {};
              last_import_ = {std::move(contents), check_memory_file(fd, "import").ok()};
              last_import_inode_ = ::fstat(fd, &st) == 0 ? st.st_ino : 0;
            }
          }
          (void)ipc::send_json(conn.get(), FT::kOk, rid, reply);
          break;
        }
        case FT::kSave:
          (void)ipc::send_json(
              conn.get(), FT::kOk, rid,
              {{"path", "/state/fake/checkpoints/" + body->value("path", std::string())}});
          break;
        default:
          (void)ipc::send_json(conn.get(), FT::kOk, rid, nlohmann::json::object());
      }
    }
    end_session();
    // conn closes here: the client sees EOF.
  }

  void run_worker(ipc::Arena& arena, std::atomic<bool>& session_stop, std::atomic<bool>& hang_up,
                  int conn) {
    ipc::RingConsumer<ipc::RequestDescriptor> requests(arena.request_control(),
                                                       arena.request_slots());
    ipc::RingProducer<ipc::CompletionDescriptor> completions(arena.completion_control(),
                                                             arena.completion_slots());
    const ipc::WaitPolicy policy{std::chrono::microseconds(10), std::chrono::milliseconds(20)};
    ipc::RequestDescriptor d;
    auto stopped = [&] { return stop_.load() || session_stop.load(); };
    while (!stopped()) {
      if (requests.pop_wait(&d, policy, stopped) != ipc::PopResult::kItem) continue;
      ++requests_seen_;
      if (options_.hang_up_after != 0 && requests_seen_ >= options_.hang_up_after) {
        hang_up = true;
        ::shutdown(conn, SHUT_RDWR);  // the "daemon" dies with the request unanswered
        return;
      }
      if (options_.delay.count() > 0) std::this_thread::sleep_for(options_.delay);
      while (hold_ && !stopped()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      ipc::CompletionDescriptor c{};
      c.request_id = d.request_id;
      const auto op = static_cast<ipc::Op>(d.op);
      if (op == ipc::Op::kDiscard) {
        std::lock_guard lock(discarded_mutex_);
        discarded_.push_back(d.sequence);
      }
      if (requests_seen_ == options_.fail_request) {
        c.status_code = static_cast<int32_t>(StatusCode::kInvalidArgument);
        std::strcpy(c.message, "InvalidArgument: x has 12 bytes; 3 tokens need 48");
      } else if ((d.flags & ipc::kFlagDeviceRegion) != 0) {
        c.status_code = static_cast<int32_t>(StatusCode::kUnimplemented);
        std::strcpy(c.message, "Unimplemented: the fake daemon computes only in the arena");
      } else if (op == ipc::Op::kForward || op == ipc::Op::kBackward) {
        const float factor = op == ipc::Op::kForward ? 2.f : 3.f;
        auto* in = reinterpret_cast<const float*>(arena.base() + d.input_offset);
        auto* out = reinterpret_cast<float*>(arena.base() + d.output_offset);
        for (uint64_t i = 0; i < d.output_bytes / 4; ++i) out[i] = factor * in[i];
        if (op == ipc::Op::kForward) {
          c.l_aux = 0.5f;
          c.capacity = d.tokens;
          c.dropped = static_cast<int64_t>(d.sequence);  // lets tests see the sequence arrive
        }
      }
      while (!completions.try_push(c) && !stopped()) std::this_thread::yield();
    }
  }

  std::string path_;
  FakeDaemonOptions options_;
  ipc::UniqueFd listen_fd_;
  std::string error_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> hold_{false};
  std::atomic<bool> hold_steps_{false};
  std::atomic<int64_t> steps_{0};
  std::atomic<uint64_t> requests_seen_{0};
  mutable std::mutex discarded_mutex_;
  std::vector<uint64_t> discarded_;  // guarded by discarded_mutex_
  std::mutex mutex_;
  nlohmann::json hello_;
  std::vector<int64_t> unmapped_;
};

}  // namespace tutel::client::testing
