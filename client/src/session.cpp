#include "session.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>

#include "tutel/core/secret.hpp"
#include "tutel/ipc/json_body.hpp"
#include "tutel/ipc/socket.hpp"

namespace tutel::client::internal {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr std::chrono::milliseconds kHelloTimeout{60000};

// The socket calls' convention: negative = no bound.
std::chrono::milliseconds socket_timeout(std::chrono::milliseconds t) {
  return t.count() > 0 ? t : std::chrono::milliseconds(-1);
}

std::string program_name() {
  const char* name = program_invocation_short_name;
  return name != nullptr && *name != '\0' ? name : "libtutel_client";
}

// The Status a failed completion carries. The daemon writes Status::to_string() ("Code: text")
// into the message; the code prefix is dropped so it is not repeated.
Status completion_status(const ipc::CompletionDescriptor& c) {
  std::string message(c.message, strnlen(c.message, sizeof c.message));
  if (c.status_code <= 0 || c.status_code > static_cast<int32_t>(StatusCode::kAborted)) {
    return Status::Internal("tuteld completed a request with unknown status code " +
                            std::to_string(c.status_code) + ": " + message);
  }
  const auto code = static_cast<StatusCode>(c.status_code);
  const std::string prefix = std::string(status_code_name(code)) + ": ";
  if (message.compare(0, prefix.size(), prefix) == 0) message.erase(0, prefix.size());
  if (message.empty()) message = "tuteld gave no message";
  return Status(code, std::move(message));
}

// "1 request", "3 requests": for messages.
std::string requests(size_t n) { return std::to_string(n) + (n == 1 ? " request" : " requests"); }

std::string mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

}  // namespace

Result<std::shared_ptr<Session>> Session::open(const std::string& socket_path,
                                               const ClientOptions& options) {
  std::shared_ptr<Session> s(new Session());
  s->socket_path_ = socket_path;
  s->pid_ = ::getpid();
  // Request ids start at a random point, another for each client: a ticket handed to another
  // client of the process (tutel_wait(c2, ticket_of_c1)) names no request there and is refused,
  // where counting from 1 on every client made it wait for, or abandon, that client's own
  // request of the same number. (The daemon only echoes them.)
  const Result<std::string> entropy = random_bytes(4);
  uint32_t start = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(s.get()) >> 4);
  if (entropy.ok()) std::memcpy(&start, entropy->data(), sizeof start);
  s->next_request_id_ = (uint64_t{start} << 32) | 1;
  s->options_ = options;
  if (s->options_.liveness_interval.count() <= 0)
    s->options_.liveness_interval = std::chrono::milliseconds(200);
  // Bounded as the hello is: a stuck daemon's full backlog would block the connect for ever.
  auto fd = ipc::connect_unix(socket_path, s->options_.control_timeout.count() > 0 ? s->options_.control_timeout
                                                                                 : kHelloTimeout);
  if (!fd.ok()) return fd.status().with_context("cannot connect to tuteld");
  s->fd_ = std::move(*fd);
  TUTEL_RETURN_IF_ERROR(s->hello(options).with_context("hello to tuteld at " + socket_path));
  return s;
}

Session::~Session() { close(Status::Aborted("the client was closed")); }

Status Session::hello(const ClientOptions& options) {
  const uint32_t rid = next_frame_id_++;
  json body{{"client", options.name.empty() ? program_name() : options.name},
            {"pid", static_cast<int64_t>(::getpid())}};
  std::string secret_file = options.secret_file;
  if (const char* env = std::getenv("TUTEL_SECRET_FILE"); secret_file.empty() && env != nullptr) secret_file = env;
  if (!secret_file.empty()) {
    const char* what = options.secret_file.empty() ? "TUTEL_SECRET_FILE" : "ClientOptions::secret_file";
    // Hex: a secret may hold any bytes, and a JSON string only UTF-8.
    TUTEL_ASSIGN_OR_RETURN(const std::string secret, read_secret_file(secret_file, what));
    body["secret"] = to_hex(secret);
  }
  const auto timeout =
      options.control_timeout.count() > 0 ? options.control_timeout : kHelloTimeout;
  const Status sent = ipc::send_json(fd_.get(), ipc::FrameType::kHello, rid, body, {}, timeout);
  // A daemon that refuses this process (no tenant for its uid) says why and hangs up, maybe
  // before the hello arrives: read its reply even when the send failed.
  auto frame = ipc::recv_frame(fd_.get(), sent.ok() ? timeout : std::chrono::milliseconds(1000));
  if (!frame.ok()) return sent.ok() ? frame.status() : sent;
  const auto type = static_cast<ipc::FrameType>(frame->header.type);
  if (frame->header.request_id != rid &&
      !(type == ipc::FrameType::kError && frame->header.request_id == 0)) {
    return Status::Corruption("the reply to hello carries request id " +
                              std::to_string(frame->header.request_id) + ", expected " +
                              std::to_string(rid));
  }
  TUTEL_ASSIGN_OR_RETURN(json reply, ipc::reply_body(*frame, ipc::FrameType::kHelloReply));
  // Its errors stay InvalidArgument: a layout other than this side's is a version mismatch.
  TUTEL_ASSIGN_OR_RETURN(const ipc::ArenaLayout layout, ipc::get_layout(reply));
  if (frame->fds.size() != 1) {
    return Status::Corruption("the hello reply carried " + std::to_string(frame->fds.size()) +
                              " descriptors; expected exactly one (the session arena's memfd)");
  }
  // Mapped only at the announced size, whose layout get_layout checked against this side's.
  TUTEL_ASSIGN_OR_RETURN(ipc::Arena arena, ipc::Arena::attach(std::move(frame->fds[0]), layout.arena_bytes));
  int64_t spin_us = 50;
  const Status described = [&]() -> Status {
    TUTEL_ASSIGN_OR_RETURN(tenant_, ipc::get_string(reply, "tenant"));
    TUTEL_ASSIGN_OR_RETURN(const int64_t session, ipc::get_int(reply, "session"));
    session_id_ = static_cast<uint64_t>(session);
    if (reply.contains("spin_us")) {
      TUTEL_ASSIGN_OR_RETURN(spin_us, ipc::get_int(reply, "spin_us"));
    }
    return Status::OK();
  }();
  if (!described.ok()) return malformed_reply(described, "Hello");
  wait_policy_.spin = std::chrono::microseconds(std::clamp<int64_t>(spin_us, 0, 1000000));
  wait_policy_.timeout = options_.liveness_interval;
  completion_spin_ = ipc::AdaptiveSpin(wait_policy_.spin);
  arena_ = std::move(arena);
  requests_ =
      ipc::RingProducer<ipc::RequestDescriptor>(arena_->request_control(), arena_->request_slots());
  completions_ = ipc::RingConsumer<ipc::CompletionDescriptor>(arena_->completion_control(),
                                                              arena_->completion_slots());
  region_ = DataRegion(arena_->layout().data_bytes);
  return Status::OK();
}

Status Session::lost(const std::string& detail) {
  return Status::Unavailable(
      "lost the connection to tuteld at " + socket_path_ + " (" + detail +
      "): the daemon exited or closed this session; connect again and attach the "
      "layers (they outlive the session)");
}

const Status& Session::usable() {
  if (pid_ != ::getpid()) {
    if (broken_.ok() || fd_.valid())
      broken_ = Status::Unavailable("this tuteld client was connected by process " + std::to_string(pid_) +
                                    "; process " + std::to_string(::getpid()) +
                                    " (forked from it) cannot use it: connect a new client in the child");
    close(broken_);  // this process's copies only; nothing is sent
  }
  return broken_;
}

Status Session::fail(Status st) {
  // The failing call reports its cause; every later call says the session is closed, as
  // Unavailable: a caller that retries a Timeout must not retry a closed session for ever.
  if (broken_.ok())
    broken_ = st.code() == StatusCode::kUnavailable
                  ? st
                  : Status::Unavailable("this session was closed after an earlier failure (" + st.to_string() +
                                        "); connect again and attach the layers (they outlive the session)");
  close(broken_);
  return st;
}

void Session::close(const Status& why) {
  const auto held = hold();
  if (broken_.ok()) broken_ = why;
  in_flight_.clear();  // their buffers belong to the user: nothing is written into them any more
  // The daemon frees its side when the session ends. This side's mappings stay until their
  // DeviceRegion handles go: the trainer's tensors or kernels may still point into them.
  device_regions_.clear();
  // In the process that connected, the session ends now, even where a forked child still holds a
  // copy of the socket (its pending forwards, regions and max_sessions place would stay with the
  // daemon until the child exits); a child closes only its own copies.
  if (pid_ == ::getpid() && fd_.valid()) (void)::shutdown(fd_.get(), SHUT_RDWR);
  fd_.reset();
  arena_.reset();
}

Result<json> Session::call(ipc::FrameType type, const json& body, ipc::FrameType expected,
                           std::vector<UniqueFd>* fds, const std::vector<int>& send_fds) {
  const auto held = hold();
  if (!usable().ok()) return broken_;
  const std::string what(ipc::frame_type_name(type));
  const uint32_t rid = next_frame_id_++;
  const auto timeout = socket_timeout(options_.control_timeout);
  if (Status st = ipc::send_json(fd_.get(), type, rid, body, send_fds, timeout); !st.ok()) {
    if (st.code() == StatusCode::kInvalidArgument) return st;  // e.g. a spec beyond the frame limit
    return fail(lost("sending " + what + ": " + std::string(st.message())));
  }
  for (;;) {
    auto frame = ipc::recv_frame(fd_.get(), timeout);
    if (!frame.ok()) {
      if (frame.status().code() == StatusCode::kTimeout) {
        // Part of a frame may have been read: the stream cannot be trusted any more.
        return fail(
            Status::Timeout("no reply from tuteld to " + what + " within " +
                            std::to_string(options_.control_timeout.count()) +
                            " ms; the session was closed (raise the control timeout: ClientOptions::control_timeout, "
                            "control_timeout_ms in C, control_timeout= in Python)"));
      }
      if (frame.status().code() == StatusCode::kUnavailable)
        return fail(lost("waiting for the reply to " + what));
      // A frame that fails validation (ipc gives InvalidArgument) is the daemon's fault, not
      // the caller's: Corruption, as malformed_reply says.
      const Status bad = frame.status().code() == StatusCode::kInvalidArgument
                             ? Status::Corruption("tuteld sent a malformed frame: " + std::string(frame.status().message()))
                             : frame.status();
      return fail(bad.with_context("reading the reply to " + what));
    }
    const uint32_t got = frame->header.request_id;
    const auto got_type = static_cast<ipc::FrameType>(frame->header.type);
    if (got == rid) {
      if (fds != nullptr) *fds = std::move(frame->fds);
      return ipc::reply_body(*frame, expected);
    }
    if (got == 0 && got_type == ipc::FrameType::kError) {
      // An error about the connection itself; the daemon closes it next.
      auto st = ipc::reply_body(*frame, expected);
      return fail(st.ok() ? Status::Corruption("malformed error frame") : st.status());
    }
    return fail(Status::Corruption("tuteld answered " + what + " (request " + std::to_string(rid) +
                                   ") with a reply to request " + std::to_string(got)));
  }
}

Result<std::shared_ptr<MappedDeviceRegion>> Session::map_device_region(int rank, uint64_t bytes) {
  const auto held = hold();
  if (!usable().ok()) return broken_;
  std::vector<UniqueFd> fds;
  TUTEL_ASSIGN_OR_RETURN(json reply, call(ipc::FrameType::kMapRegion, {{"rank", rank}, {"bytes", bytes}},
                                          ipc::FrameType::kOk, &fds));
  auto region = std::make_shared<MappedDeviceRegion>();
  // Whatever fails from here, the daemon holds the region for nothing: give it back when its id
  // is known (a failure of that only leaves it to the session's end).
  auto give_back = [&](Status st) {
    if (auto id = ipc::get_int(reply, "region"); id.ok() && *id >= 1 && *id <= std::numeric_limits<uint32_t>::max())
      (void)call(ipc::FrameType::kUnmapRegion, {{"region", *id}}, ipc::FrameType::kOk);
    return st;
  };
  std::string handle;
  const Status described = [&]() -> Status {
    TUTEL_ASSIGN_OR_RETURN(const int64_t id, ipc::get_int(reply, "region"));
    TUTEL_ASSIGN_OR_RETURN(const int64_t got_bytes, ipc::get_int(reply, "bytes"));
    TUTEL_ASSIGN_OR_RETURN(region->kind, ipc::get_string(reply, "kind"));
    TUTEL_ASSIGN_OR_RETURN(region->device, ipc::get_string(reply, "device"));
    if (id < 1 || id > std::numeric_limits<uint32_t>::max() || got_bytes != static_cast<int64_t>(bytes))
      return Status::Corruption("tuteld described the mapped device region as region " + std::to_string(id) + " of " +
                                std::to_string(got_bytes) + " bytes (asked for " + std::to_string(bytes) + ")");
    region->id = static_cast<uint32_t>(id);
    if (reply.contains("handle")) {
      TUTEL_ASSIGN_OR_RETURN(const std::string hex, ipc::get_string(reply, "handle"));
      TUTEL_ASSIGN_OR_RETURN(handle, parse_hex(hex, "the region's handle"));
    }
    return Status::OK();
  }();
  if (!described.ok()) return give_back(malformed_reply(described, "MapRegion"));
  region->rank = rank;
  region->bytes = bytes;
  Result<ImportedMemory> memory = ImportedMemory::open(region->kind, handle, fds.empty() ? UniqueFd() : std::move(fds[0]),
                                                       region->device, bytes);
  if (!memory.ok()) return give_back(memory.status().with_context("mapping device region " + std::to_string(region->id)));
  region->memory = std::move(*memory);
  device_regions_.emplace(region->id, region);
  return region;
}

bool Session::maps(const std::shared_ptr<MappedDeviceRegion>& region) const {
  const auto held = hold();
  auto it = device_regions_.find(region->id);
  return it != device_regions_.end() && it->second == region;
}

Status Session::unmap_device_region(const std::shared_ptr<MappedDeviceRegion>& region) {
  const auto held = hold();
  if (!maps(region)) return Status::OK();  // the session already ended
  // Requests in flight may address it; they complete first.
  if (Status st = drain(); !st.ok()) {
    // Still in flight, they may still read or write it: it stays mapped on both sides, so that
    // unmapping again once they complete gives the daemon its memory back.
    if (maps(region)) {
      return st.with_context("device region " + std::to_string(region->id) +
                             " is still mapped here and in tuteld; unmap it again (DeviceRegion::unmap, "
                             "tutel_region_unmap) once the requests in flight complete");
    }
    // The session broke (close() forgot its regions); the daemon frees its side.
    region->memory.reset();
    return st;
  }
  device_regions_.erase(region->id);
  region->memory.reset();
  return call(ipc::FrameType::kUnmapRegion, {{"region", region->id}}, ipc::FrameType::kOk).status();
}

Result<std::pair<uint32_t, uint64_t>> Session::locate(const void* data, uint64_t bytes, const char* name) const {
  const auto p = reinterpret_cast<uintptr_t>(data);
  for (const auto& [id, region] : device_regions_) {
    const auto begin = reinterpret_cast<uintptr_t>(region->memory.data());
    // A range of no bytes may start at the region's end (docs/protocol.md §4: an empty batch).
    if (p < begin || p - begin > region->bytes || (p - begin == region->bytes && bytes != 0)) continue;
    const uint64_t offset = p - begin;
    if (bytes > region->bytes - offset)
      return Status::OutOfRange(std::string(name) + " (" + std::to_string(bytes) + " bytes at offset " +
                                std::to_string(offset) + ") runs past the end of device region " +
                                std::to_string(id) + " (" + std::to_string(region->bytes) + " bytes)");
    return std::make_pair(id, offset);
  }
  return Status::InvalidArgument(std::string(name) +
                                 " does not point into a device region of this client; map one with "
                                 "Client::map_device_region and put the tensors there, or use the call without "
                                 "_device");
}

Result<Ticket> Session::submit(const Submission& s) {
  const auto held = hold();
  if (!usable().ok()) return broken_;
  send_discards();
  if (!usable().ok()) return broken_;  // a discard the ring refused closed the session (its arena too)
  if (s.in_device_region) return submit_in_device_region(s);
  const bool has_data = s.op != ipc::Op::kNop && s.op != ipc::Op::kDiscard;
  if (has_data) {
    const uint64_t in = DataRegion::rounded(s.input_bytes), out = DataRegion::rounded(s.output_bytes);
    // Rounded sizes saturate, so a size near 2^64 (a caller's n - 4 gone below zero) cannot wrap
    // the sum into something small.
    const uint64_t need = in > UINT64_MAX - out ? UINT64_MAX : in + out;
    if (need > region_.capacity()) {
      const uint64_t per_token = s.tokens > 0 ? need / static_cast<uint64_t>(s.tokens) + 1 : need;
      return Status::ResourceExhausted(
          std::string(s.op == ipc::Op::kForward ? "a forward" : s.op == ipc::Op::kBackward ? "a backward" : "a transfer") + " of " +
          std::to_string(s.tokens) + " tokens needs " + std::to_string(need) +
          " bytes of the session arena (" + s.input_name + ": " + std::to_string(s.input_bytes) +
          " + " + s.output_name + ": " + std::to_string(s.output_bytes) +
          ", f32), but its data region holds " + std::to_string(region_.capacity()) + " bytes (" +
          mib(region_.capacity()) +
          "); raise server.arena_bytes in tuteld.toml, or send at most about " +
          std::to_string(region_.capacity() / per_token) + " tokens per request");
    }
  }
  while (in_flight_.size() >= ipc::kRingSlots) TUTEL_RETURN_IF_ERROR(complete_one());

  InFlight r = track(s);
  r.output = s.output;
  r.output_bytes = s.output_bytes;
  while (has_data) {
    if (auto in = region_.allocate(s.input_bytes)) {
      if (auto out = region_.allocate(s.output_bytes)) {
        r.input_block = in;
        r.output_block = out;
        break;
      }
      region_.release(*in);
    }
    if (in_flight_.empty())
      return Status::Internal("the arena's data region is fragmented with nothing in flight");
    TUTEL_RETURN_IF_ERROR(complete_one());  // frees the blocks of the oldest request
  }

  const ipc::ArenaLayout& layout = arena_->layout();
  ipc::RequestDescriptor d = describe(s);
  if (has_data) {
    if (s.input_bytes > 0) std::memcpy(arena_->data() + *r.input_block, s.input, s.input_bytes);
    d.input_offset = layout.data_offset + *r.input_block;
    d.output_offset = layout.data_offset + *r.output_block;
  }
  return push(d, std::move(r));
}

Session::InFlight Session::track(const Submission& s) const {
  InFlight r;
  r.op = s.op;
  r.layer = s.layer;
  r.sequence = s.sequence;
  r.training = s.op == ipc::Op::kForward && (s.flags & ipc::kFlagTraining) != 0;
  return r;
}

ipc::RequestDescriptor Session::describe(const Submission& s) {
  ipc::RequestDescriptor d{};
  d.request_id = next_request_id_++;
  d.op = static_cast<uint32_t>(s.op);
  d.flags = s.flags;
  d.layer_handle = s.layer ? s.layer->info.handle : 0;
  d.sequence = s.sequence;
  d.tokens = s.tokens;
  d.input_bytes = s.input_bytes;
  d.output_bytes = s.output_bytes;
  d.dl_aux = s.dl_aux;
  d.noise_key = s.noise_key;
  return d;
}

Result<Ticket> Session::push(const ipc::RequestDescriptor& d, InFlight r) {
  if (!requests_.try_push(d)) {
    release_blocks(r);
    return fail(Status::Corruption("the request ring is full with " + requests(in_flight_.size()) +
                                   " in flight (its indices were corrupted)"));
  }
  const uint64_t sequence = r.sequence;
  in_flight_.emplace(d.request_id, std::move(r));
  return Ticket{d.request_id, sequence};
}

Result<Ticket> Session::submit_in_device_region(const Submission& s) {
  TUTEL_ASSIGN_OR_RETURN(const auto in, locate(s.input, s.input_bytes, s.input_name));
  TUTEL_ASSIGN_OR_RETURN(const auto out, locate(s.output, s.output_bytes, s.output_name));
  if (in.first != out.first)
    return Status::InvalidArgument(std::string(s.input_name) + " is in device region " + std::to_string(in.first) +
                                   " and " + s.output_name + " in region " + std::to_string(out.first) +
                                   "; a request's tensors must share one region");
  while (in_flight_.size() >= ipc::kRingSlots) TUTEL_RETURN_IF_ERROR(complete_one());
  ipc::RequestDescriptor d = describe(s);
  d.flags |= ipc::kFlagDeviceRegion;
  d.region = in.first;
  d.input_offset = in.second;
  d.output_offset = out.second;
  return push(d, track(s));
}

bool Session::peer_gone() {
  const auto now = Clock::now();
  if (now - last_liveness_check_ < options_.liveness_interval) return false;
  last_liveness_check_ = now;
  pollfd p{fd_.get(), POLLIN | POLLRDHUP, 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  if (p.revents & (POLLHUP | POLLERR | POLLRDHUP | POLLNVAL)) return true;
  if (p.revents & POLLIN) {
    char byte;
    const ssize_t n = ::recv(fd_.get(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
  }
  return false;
}

std::optional<Clock::time_point> Session::request_deadline() const {
  if (options_.request_timeout.count() <= 0) return std::nullopt;
  return ipc::deadline_after(options_.request_timeout);
}

Status Session::complete_one() { return complete_one(request_deadline(), options_.request_timeout, true); }

Status Session::complete_one(std::optional<Clock::time_point> deadline, std::chrono::milliseconds bound,
                             bool bound_is_option) {
  if (!broken_.ok()) return broken_;  // (its callers checked usable(), once per call)
  if (in_flight_.empty())
    return Status::Internal("waiting for a completion with nothing in flight");
  bool gone = false;
  ipc::CompletionDescriptor c;
  const ipc::WaitPolicy policy{completion_spin_.next(), wait_policy_.timeout};
  const auto waiting_since = Clock::now();
  ipc::PopResult r = completions_.pop_wait(
      &c, policy, [&] { return gone = peer_gone(); }, deadline);
  completion_spin_.observe(Clock::now() - waiting_since);
  if (r == ipc::PopResult::kEmpty && gone)
    r = completions_.try_pop(&c);  // posted just before the exit
  if (r == ipc::PopResult::kCorrupt) {
    return fail(
        Status::Corruption("the completion ring's indices are corrupt; the session was closed"));
  }
  if (r == ipc::PopResult::kEmpty) {
    if (gone) {
      std::string detail =
          "the socket closed with " + requests(in_flight_.size()) + " in flight";
      // The daemon may have said why before hanging up.
      if (auto frame = ipc::recv_frame(fd_.get(), std::chrono::milliseconds(0));
          frame.ok() && frame->header.type == static_cast<uint16_t>(ipc::FrameType::kError)) {
        if (auto body = ipc::parse_body(*frame); body.ok())
          detail += "; it said: " + ipc::status_from_error_body(*body).to_string();
      }
      return fail(lost(detail));
    }
    return Status::Timeout("no completion from tuteld within " + std::to_string(bound.count()) + " ms (" +
                           requests(in_flight_.size()) + " in flight; they stay in flight, wait again" +
                           (bound_is_option ? " or raise the request timeout: ClientOptions::request_timeout, "
                                              "request_timeout_ms in C, request_timeout= in Python)"
                                            : ")"));
  }
  auto it = in_flight_.find(c.request_id);
  if (it == in_flight_.end()) {
    return fail(Status::Corruption("tuteld completed request " + std::to_string(c.request_id) +
                                   ", which is not in flight; the session was closed"));
  }
  finish(c.request_id, it->second, c);
  in_flight_.erase(it);
  return Status::OK();
}

void Session::finish(uint64_t request_id, InFlight& r, const ipc::CompletionDescriptor& c) {
  if (r.abandoned) {
    release_blocks(r);
    return;
  }
  Finished f;
  f.info.sequence = r.sequence;
  if (r.training) f.training_layer = r.layer;
  if (c.status_code == 0) {
    if (r.output != nullptr && r.output_bytes > 0 && r.output_block)
      std::memcpy(r.output, arena_->data() + *r.output_block, r.output_bytes);
    if (r.op == ipc::Op::kForward) {
      f.info.l_aux = c.l_aux;
      f.info.capacity = c.capacity;
      f.info.dropped = c.dropped;
    }
    f.checksum = c.checksum;
  } else {
    f.status = completion_status(c);
    if (r.training && r.layer) r.layer->pending.erase(r.sequence);  // nothing to backward
  }
  release_blocks(r);
  finished_[request_id] = std::move(f);
}

void Session::release_blocks(InFlight& r) {
  if (r.input_block) region_.release(*r.input_block);
  if (r.output_block) region_.release(*r.output_block);
  r.input_block.reset();
  r.output_block.reset();
}

Result<ForwardInfo> Session::wait(uint64_t request_id, std::optional<std::chrono::milliseconds> timeout) {
  const auto held = hold();
  TUTEL_ASSIGN_OR_RETURN(Finished f, wait_finished(request_id, timeout));
  return f.info;
}

Result<uint64_t> Session::wait_checksum(uint64_t request_id) {
  const auto held = hold();
  TUTEL_ASSIGN_OR_RETURN(Finished f, wait_finished(request_id, std::nullopt));
  return f.checksum;
}

Result<Session::Finished> Session::wait_finished(uint64_t request_id,
                                                 std::optional<std::chrono::milliseconds> timeout) {
  // A timeout given here bounds this whole wait; the option bounds each completion.
  std::optional<Clock::time_point> deadline;
  if (timeout) deadline = ipc::deadline_after(std::max(*timeout, std::chrono::milliseconds(0)));
  // Once per wait, not per completion: a fork cannot happen inside this call (a getpid is a
  // system call, ~0.1 µs here).
  (void)usable();
  for (;;) {
    if (auto it = finished_.find(request_id); it != finished_.end()) {
      Finished f = std::move(it->second);
      finished_.erase(it);
      if (!f.status.ok()) return f.status;
      return f;
    }
    if (!broken_.ok()) return broken_;
    const auto in_flight = in_flight_.find(request_id);
    // An abandoned request completes without a trace: waiting for it would only wait longer.
    if (in_flight == in_flight_.end() || in_flight->second.abandoned) {
      return Status::InvalidArgument(
          "request " + std::to_string(request_id) +
          " is not in flight on this client (already waited for, abandoned, or never submitted here)");
    }
    TUTEL_RETURN_IF_ERROR(timeout ? complete_one(deadline, *timeout, false) : complete_one());
  }
}

void Session::abandon(uint64_t request_id) {
  const auto held = hold();
  // Not from a forked child: it would push a discard into the parent's ring under the request id
  // the parent uses next.
  if (!usable().ok()) return;
  if (auto done = finished_.find(request_id); done != finished_.end()) {
    // Completed while the caller waited for another request: its output is written already,
    // but no backward may pair with it.
    if (auto layer = done->second.training_layer.lock()) {
      layer->pending.erase(done->second.info.sequence);
      if (done->second.status.ok()) queue_discard(layer->info.handle, done->second.info.sequence);
    }
    finished_.erase(done);
    send_discards();
    return;
  }
  auto it = in_flight_.find(request_id);
  if (it == in_flight_.end()) return;
  InFlight& r = it->second;
  r.abandoned = true;
  r.output = nullptr;
  if (r.training && r.layer) {
    r.layer->pending.erase(r.sequence);
    // The daemon keeps a training forward's state for its backward, which will never come: a
    // discard after it (the ring is read in order) gives that memory back to the tenant. (A
    // trainer that retried its timed-out forwards filled its tenant's quota with them.)
    queue_discard(r.layer->info.handle, r.sequence);
  }
  send_discards();
}

void Session::queue_discard(uint64_t layer_handle, uint64_t sequence) {
  discards_.push_back({layer_handle, sequence});
}

void Session::send_discards() {
  // Only into free ring slots: a discard never waits (abandon() is called where the caller has
  // given up waiting); the rest goes with the next submit or drain.
  while (!discards_.empty() && in_flight_.size() < ipc::kRingSlots && broken_.ok()) {
    ipc::RequestDescriptor d{};
    d.request_id = next_request_id_++;
    d.op = static_cast<uint32_t>(ipc::Op::kDiscard);
    d.layer_handle = discards_.front().first;
    d.sequence = discards_.front().second;
    InFlight r;
    r.op = ipc::Op::kDiscard;
    r.abandoned = true;  // its completion goes without a trace
    if (!push(d, std::move(r)).ok()) return;
    discards_.pop_front();
  }
}

Status Session::drain() {
  const auto held = hold();
  if (!usable().ok()) return broken_;
  send_discards();
  while (!in_flight_.empty()) TUTEL_RETURN_IF_ERROR(complete_one());
  return broken_;
}

}  // namespace tutel::client::internal
