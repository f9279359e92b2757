// JSON bodies of control frames: parsing with clear errors, error replies, typed field access
// and the arena layout carried by kHelloReply. No nlohmann exception escapes these functions.
// Thread-safety: all functions are reentrant.
#pragma once

#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "tutel/core/status.hpp"
#include "tutel/ipc/protocol.hpp"
#include "tutel/ipc/socket.hpp"

namespace tutel::ipc {

// A frame's body as a JSON object; an empty body reads as {}. InvalidArgument names the frame
// type and request id and says what is wrong (not JSON, or not an object).
Result<nlohmann::json> parse_body(const Frame& frame);

// JSON text for a frame body. Invalid UTF-8 in strings is replaced with U+FFFD, never thrown.
std::string dump_body(const nlohmann::json& body);

// The body of a kError frame: {"code": int, "code_name": str, "message": str}. Messages longer
// than 64 KiB are cut so the frame always fits.
std::string error_body(const Status& status);
// The Status an error body carries. A malformed body (no integer code in 1..kAborted, no string
// message) becomes Internal saying so; an unknown code keeps its name in the message.
Status status_from_error_body(const nlohmann::json& body);

// The body of a reply: the carried Status when it is kError, Corruption when its type is neither
// kError nor `expected`, otherwise parse_body.
Result<nlohmann::json> reply_body(const Frame& reply, FrameType expected);

// Required fields; InvalidArgument names the field and what was found instead.
Result<int64_t> get_int(const nlohmann::json& body, std::string_view key);
// `value` as an int64 (an integer within int64's range, signed or not); `what` names it in the
// error.
Result<int64_t> as_int(const nlohmann::json& value, std::string_view what);
Result<std::string> get_string(const nlohmann::json& body, std::string_view key);
// A JSON number, integer or not (JSON has no NaN or infinity, so it is finite).
Result<double> get_number(const nlohmann::json& body, std::string_view key);
Result<bool> get_bool(const nlohmann::json& body, std::string_view key);

// The arena layout as kHelloReply fields: arena_bytes, request_ring_offset,
// completion_ring_offset, data_offset, data_bytes and ring_slots (a non-object `body` is
// replaced by an object first).
void put_layout(nlohmann::json& body, const ArenaLayout& layout);
// Reads those fields back and checks them against arena_layout(arena_bytes) and kRingSlots, so
// a daemon with a different layout is refused with a message saying to upgrade.
Result<ArenaLayout> get_layout(const nlohmann::json& body);

// send_frame with dump_body(body).
Status send_json(int fd, FrameType type, uint32_t request_id, const nlohmann::json& body,
                 const std::vector<int>& fds = {},
                 std::chrono::milliseconds timeout = std::chrono::milliseconds(-1));
// A kError frame carrying `status` in reply to `request_id`.
Status send_error(int fd, uint32_t request_id, const Status& status,
                  std::chrono::milliseconds timeout = std::chrono::milliseconds(-1));

}  // namespace tutel::ipc
