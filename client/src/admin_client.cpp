#include "tutel/admin_client.hpp"

#include <utility>

#include "tutel/ipc/arena.hpp"
#include "tutel/ipc/json_body.hpp"
#include "tutel/ipc/socket.hpp"

namespace tutel::client {

using nlohmann::json;

namespace {
Status moved_from() { return Status::InvalidArgument("this AdminClient was moved from"); }
}  // namespace

struct AdminClient::Impl {
  ipc::UniqueFd fd;
  std::string path;
  std::chrono::milliseconds timeout;
  uint32_t next_request_id = 1;
  bool connection_failed = false;  // of the last call

  Result<std::string> call(ipc::FrameType type, const json& body,
                           std::chrono::milliseconds wait_bound) {
    // Every return below but the last is the connection's failure; the last may be tuteld's
    // error answer.
    connection_failed = true;
    if (!fd.valid())
      return Status::Unavailable("the connection to tuteld at " + path + " was lost");
    const std::string what(ipc::frame_type_name(type));
    const uint32_t rid = next_request_id++;
    if (Status st = ipc::send_json(fd.get(), type, rid, body, {}, wait_bound); !st.ok()) {
      fd.reset();
      return st.with_context("sending " + what + " to tuteld at " + path);
    }
    auto frame = ipc::recv_frame(fd.get(), wait_bound);
    if (!frame.ok()) {
      fd.reset();
      if (frame.status().code() == StatusCode::kUnavailable)
        return Status::Unavailable("tuteld at " + path +
                                   " closed the connection before answering " + what);
      return frame.status().with_context("waiting for tuteld's reply to " + what);
    }
    // Request id 0 is the daemon's word about the connection itself, only ever an error.
    const bool connection_error =
        frame->header.request_id == 0 && frame->header.type == static_cast<uint16_t>(ipc::FrameType::kError);
    if (frame->header.request_id != rid && !connection_error) {
      fd.reset();
      return Status::Corruption("tuteld answered request " + std::to_string(rid) +
                                " with a reply to " + std::to_string(frame->header.request_id));
    }
    connection_failed = frame->header.type != static_cast<uint16_t>(ipc::FrameType::kError);
    TUTEL_ASSIGN_OR_RETURN(json reply, ipc::reply_body(*frame, ipc::FrameType::kOk));
    connection_failed = false;
    return ipc::dump_body(reply);
  }
};

AdminClient::AdminClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
AdminClient::AdminClient(AdminClient&&) noexcept = default;
AdminClient& AdminClient::operator=(AdminClient&&) noexcept = default;
AdminClient::~AdminClient() = default;

Result<AdminClient> AdminClient::connect(const std::string& admin_socket_path,
                                         std::chrono::milliseconds timeout) {
  TUTEL_ASSIGN_OR_RETURN(ipc::UniqueFd fd, ipc::connect_unix(admin_socket_path, timeout));
  auto impl = std::make_unique<Impl>();
  impl->fd = std::move(fd);
  impl->path = admin_socket_path;
  impl->timeout = timeout;
  return AdminClient(std::move(impl));
}

bool AdminClient::connection_failed() const { return impl_ && impl_->connection_failed; }

const std::string& AdminClient::socket_path() const {
  static const std::string none;
  return impl_ ? impl_->path : none;
}

Result<std::string> AdminClient::status() {
  if (!impl_) return moved_from();
  return impl_->call(ipc::FrameType::kAdminStatus, json::object(), impl_->timeout);
}
Result<std::string> AdminClient::tenants() {
  if (!impl_) return moved_from();
  return impl_->call(ipc::FrameType::kAdminTenants, json::object(), impl_->timeout);
}
Result<std::string> AdminClient::layers() {
  if (!impl_) return moved_from();
  return impl_->call(ipc::FrameType::kAdminLayers, json::object(), impl_->timeout);
}
Result<std::string> AdminClient::metrics() {
  if (!impl_) return moved_from();
  return impl_->call(ipc::FrameType::kAdminMetrics, json::object(), impl_->timeout);
}
Result<std::string> AdminClient::peers() {
  if (!impl_) return moved_from();
  return impl_->call(ipc::FrameType::kAdminPeers, json::object(), impl_->timeout);
}
Result<std::string> AdminClient::checkpoint(std::string_view layer, std::string_view path) {
  if (!impl_) return moved_from();
  return impl_->call(ipc::FrameType::kAdminCheckpoint,
                     {{"layer", std::string(layer)}, {"path", std::string(path)}},
                     std::chrono::milliseconds(-1));
}
Result<std::string> AdminClient::pin(std::string_view layer, bool pinned) {
  if (!impl_) return moved_from();
  return impl_->call(ipc::FrameType::kAdminPin, {{"layer", std::string(layer)}, {"pinned", pinned}},
                     impl_->timeout);
}
Result<std::string> AdminClient::destroy(std::string_view layer) {
  if (!impl_) return moved_from();
  return impl_->call(ipc::FrameType::kAdminDestroy, {{"layer", std::string(layer)}}, std::chrono::milliseconds(-1));
}
Result<std::string> AdminClient::sessions() {
  if (!impl_) return moved_from();
  return impl_->call(ipc::FrameType::kAdminSessions, json::object(), impl_->timeout);
}
Result<std::string> AdminClient::drain(bool draining) {
  if (!impl_) return moved_from();
  return impl_->call(ipc::FrameType::kAdminDrain, {{"draining", draining}}, impl_->timeout);
}

}  // namespace tutel::client
