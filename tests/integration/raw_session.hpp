// A client session spoken by hand through the ipc module, so tests can send what the real
// client library never would.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "tutel/ipc/arena.hpp"
#include "tutel/ipc/json_body.hpp"
#include "tutel/ipc/ring.hpp"
#include "tutel/ipc/socket.hpp"

namespace tutel::testing {

using namespace std::chrono_literals;

class RawSession {
 public:
  explicit RawSession(const std::string& socket) {
    auto fd = ipc::connect_unix(socket);
    EXPECT_TRUE(fd.ok()) << fd.status();
    if (fd.ok()) fd_ = std::move(*fd);
  }
  int fd() const { return fd_.get(); }

  // `fds` go with the frame (SCM_RIGHTS).
  Status send(ipc::FrameType type, const nlohmann::json& body, const std::vector<int>& fds = {}) {
    return ipc::send_json(fd_.get(), type, ++request_id_, body, fds);
  }
  Result<ipc::Frame> receive(std::chrono::milliseconds timeout = 10s) { return ipc::recv_frame(fd_.get(), timeout); }
  // Sends and waits for the reply body (an error reply becomes its Status).
  Result<nlohmann::json> call(ipc::FrameType type, const nlohmann::json& body, ipc::FrameType expected,
                              std::chrono::milliseconds timeout = 10s, const std::vector<int>& fds = {}) {
    TUTEL_RETURN_IF_ERROR(send(type, body, fds));
    TUTEL_ASSIGN_OR_RETURN(ipc::Frame reply, receive(timeout));
    if (reply.header.request_id != request_id_)
      return Status::Internal("reply to request " + std::to_string(reply.header.request_id) + ", expected " +
                              std::to_string(request_id_));
    return ipc::reply_body(reply, expected);
  }
  // Sends raw bytes (a malformed frame).
  void send_bytes(const void* data, size_t n) { ASSERT_EQ(::write(fd_.get(), data, n), static_cast<ssize_t>(n)); }

  Status hello() {
    // A daemon that refuses the connection (max_sessions) says why and hangs up, maybe before
    // the hello is sent: its reply is read even when the send failed, as the client library does.
    const Status sent = send(ipc::FrameType::kHello, {{"client", "raw"}, {"pid", ::getpid()}});
    Result<ipc::Frame> received = receive(sent.ok() ? 10s : 1s);
    if (!received.ok()) return sent.ok() ? received.status() : sent;
    ipc::Frame reply = std::move(received).value();
    TUTEL_ASSIGN_OR_RETURN(nlohmann::json body, ipc::reply_body(reply, ipc::FrameType::kHelloReply));
    if (reply.fds.size() != 1) return Status::Internal("hello reply carried " + std::to_string(reply.fds.size()) + " fds");
    TUTEL_ASSIGN_OR_RETURN(ipc::Arena arena, ipc::Arena::attach(std::move(reply.fds[0]), body["arena_bytes"].get<uint64_t>()));
    arena_ = std::move(arena);
    requests_ = ipc::RingProducer<ipc::RequestDescriptor>(arena_->request_control(), arena_->request_slots());
    completions_ = ipc::RingConsumer<ipc::CompletionDescriptor>(arena_->completion_control(), arena_->completion_slots());
    return Status::OK();
  }
  ipc::Arena& arena() { return *arena_; }

  // Pushes one descriptor without waiting for its completion; false if the ring is full.
  bool push(ipc::RequestDescriptor d) {
    d.request_id = ++ring_request_id_;
    return requests_.try_push(d);
  }
  // Pushes one descriptor and waits (bounded) for its completion.
  std::optional<ipc::CompletionDescriptor> submit(ipc::RequestDescriptor d) {
    d.request_id = ++ring_request_id_;
    if (!requests_.try_push(d)) return std::nullopt;
    ipc::CompletionDescriptor c{};
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    const ipc::PopResult r = completions_.pop_wait(&c, ipc::WaitPolicy{}, [] { return false; }, deadline);
    if (r != ipc::PopResult::kItem) return std::nullopt;
    EXPECT_EQ(c.request_id, d.request_id);
    return c;
  }

  // `timeout`: above a group layer's bootstrap_timeout_ms, whose creation waits for its peers.
  Result<uint64_t> create_layer(const std::string& spec, std::chrono::milliseconds timeout = 10s) {
    TUTEL_ASSIGN_OR_RETURN(nlohmann::json info,
                           call(ipc::FrameType::kCreateLayer, {{"spec", spec}}, ipc::FrameType::kLayerInfo, timeout));
    return info["handle"].get<uint64_t>();
  }

 private:
  ipc::UniqueFd fd_;
  uint32_t request_id_ = 0;
  uint64_t ring_request_id_ = 0;
  std::optional<ipc::Arena> arena_;
  ipc::RingProducer<ipc::RequestDescriptor> requests_;
  ipc::RingConsumer<ipc::CompletionDescriptor> completions_;
};

// A data request of `op` on `layer` as the tests send them: a forward (a training one under a
// nonzero `sequence`) or a backward over `tokens` rows of `width` floats, the input at the data
// region's start and the output right after it; a discard carries no tokens and no buffers.
inline ipc::RequestDescriptor data_request(const ipc::ArenaLayout& l, ipc::Op op, uint64_t layer, uint64_t sequence,
                                           int64_t tokens, int64_t width, uint32_t flags = 0) {
  ipc::RequestDescriptor d{};
  d.op = static_cast<uint32_t>(op);
  d.flags = flags | (op == ipc::Op::kForward && sequence != 0 ? uint32_t{ipc::kFlagTraining} : uint32_t{0});
  d.layer_handle = layer;
  d.sequence = sequence;
  if (op == ipc::Op::kForward || op == ipc::Op::kBackward) {
    const uint64_t bytes = static_cast<uint64_t>(tokens * width) * sizeof(float);
    d.tokens = tokens;
    d.input_offset = l.data_offset;
    d.input_bytes = bytes;
    d.output_offset = l.data_offset + bytes;
    d.output_bytes = bytes;
  }
  return d;
}

}  // namespace tutel::testing
