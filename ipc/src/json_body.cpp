#include "tutel/ipc/json_body.hpp"

#include <algorithm>
#include <exception>
#include <limits>
#include <string>
#include <string_view>
#include <utility>

namespace tutel::ipc {
namespace {

using nlohmann::json;

constexpr size_t kMaxErrorMessage = 64u << 10;

std::string frame_label(const Frame& f) {
  return std::string(frame_type_name(static_cast<FrameType>(f.header.type))) + " frame (request " +
         std::to_string(f.header.request_id) + ")";
}

std::string kind_name(const json& v) { return v.type_name(); }

// Request and reply bodies are flat: a layer spec's tables are text inside a string. Deeper
// nesting is refused before parsing: copying or printing a parsed document recurses once per
// level, so 150 000 nested brackets in a 300 KB frame would overflow the daemon's stack.
constexpr size_t kMaxNesting = 32;

// The deepest nesting of arrays and objects in `text`, brackets inside strings not counted;
// stops counting past `limit`.
size_t nesting_depth(std::string_view text, size_t limit) {
  size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
      if (deepest > limit) return deepest;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

}  // namespace

Result<nlohmann::json> parse_body(const Frame& frame) {
  if (frame.body.empty()) return json::object();
  if (nesting_depth(frame.body, kMaxNesting) > kMaxNesting)
    return Status::InvalidArgument(frame_label(frame) + ": the body nests arrays and objects more than " +
                                   std::to_string(kMaxNesting) + " deep; request bodies are flat");
  json body = json::parse(frame.body, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) {
    // Parse once more, with exceptions, only to recover the parser's position and reason.
    std::string why = "malformed JSON";
    try {
      [[maybe_unused]] const json again = json::parse(frame.body);
    } catch (const json::exception& e) {
      why = e.what();
    }
    return Status::InvalidArgument(frame_label(frame) + ": the body is not valid JSON: " + why);
  }
  if (!body.is_object()) {
    return Status::InvalidArgument(frame_label(frame) + ": the body must be a JSON object, got " +
                                   kind_name(body));
  }
  return body;
}

std::string dump_body(const nlohmann::json& body) {
  try {
    return body.dump(-1, ' ', false, json::error_handler_t::replace);
  } catch (const std::exception&) {
    return "{}";  // only allocation failure reaches here
  }
}

std::string error_body(const Status& status) {
  std::string message(status.message());
  if (message.size() > kMaxErrorMessage) {
    message.resize(kMaxErrorMessage);
    message += "... (cut)";
  }
  json body = {{"code", static_cast<int>(status.code())},
               {"code_name", std::string(status_code_name(status.code()))},
               {"message", std::move(message)}};
  return dump_body(body);
}

Status status_from_error_body(const nlohmann::json& body) {
  if (!body.is_object()) {
    return Status::Internal("the peer sent a malformed error reply (a " + kind_name(body) +
                            ", not an object)");
  }
  const auto code_it = body.find("code");
  const auto message_it = body.find("message");
  if (code_it == body.end() || !code_it->is_number_integer()) {
    return Status::Internal("the peer sent a malformed error reply (no integer 'code')");
  }
  if (message_it == body.end() || !message_it->is_string()) {
    return Status::Internal("the peer sent a malformed error reply (no string 'message')");
  }
  const auto code = code_it->get<int64_t>();
  std::string message = message_it->get<std::string>();
  if (code == 0) {
    return Status::Internal("the peer sent an error reply with code 0 (OK): " + message);
  }
  if (code < 0 || code > static_cast<int64_t>(StatusCode::kAborted)) {
    std::string name = "unnamed";
    if (auto it = body.find("code_name"); it != body.end() && it->is_string()) {
      name = it->get<std::string>();
    }
    return Status::Internal("error code " + std::to_string(code) + " (" + name +
                            ") unknown to this side: " + message);
  }
  return Status(static_cast<StatusCode>(code), std::move(message));
}

Result<nlohmann::json> reply_body(const Frame& reply, FrameType expected) {
  const auto type = static_cast<FrameType>(reply.header.type);
  if (type == FrameType::kError) {
    TUTEL_ASSIGN_OR_RETURN(json body, parse_body(reply));
    return status_from_error_body(body);
  }
  if (type != expected) {
    return Status::Corruption("expected a " + std::string(frame_type_name(expected)) +
                              " reply, got " + frame_label(reply));
  }
  return parse_body(reply);
}

Result<int64_t> get_int(const nlohmann::json& body, std::string_view key) {
  const std::string k(key);
  if (!body.is_object()) return Status::InvalidArgument("expected an object holding '" + k + "'");
  const auto it = body.find(k);
  if (it == body.end()) return Status::InvalidArgument("field '" + k + "' is missing");
  return as_int(*it, "field '" + k + "'");
}

Result<int64_t> as_int(const nlohmann::json& value, std::string_view what) {
  if (value.is_number_unsigned()) {
    const auto v = value.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      return Status::InvalidArgument(std::string(what) + " is " + std::to_string(v) + ", beyond the int64 range");
    return static_cast<int64_t>(v);
  }
  if (value.is_number_integer()) return value.get<int64_t>();
  return Status::InvalidArgument(std::string(what) + " must be an integer, got " + kind_name(value));
}

Result<double> get_number(const nlohmann::json& body, std::string_view key) {
  const std::string k(key);
  if (!body.is_object()) return Status::InvalidArgument("expected an object holding '" + k + "'");
  const auto it = body.find(k);
  if (it == body.end()) return Status::InvalidArgument("field '" + k + "' is missing");
  if (!it->is_number()) return Status::InvalidArgument("field '" + k + "' must be a number, got " + kind_name(*it));
  return it->get<double>();
}

Result<bool> get_bool(const nlohmann::json& body, std::string_view key) {
  const std::string k(key);
  if (!body.is_object()) return Status::InvalidArgument("expected an object holding '" + k + "'");
  const auto it = body.find(k);
  if (it == body.end()) return Status::InvalidArgument("field '" + k + "' is missing");
  if (!it->is_boolean()) return Status::InvalidArgument("field '" + k + "' must be a boolean, got " + kind_name(*it));
  return it->get<bool>();
}

Result<std::string> get_string(const nlohmann::json& body, std::string_view key) {
  const std::string k(key);
  if (!body.is_object()) return Status::InvalidArgument("expected an object holding '" + k + "'");
  const auto it = body.find(k);
  if (it == body.end()) return Status::InvalidArgument("field '" + k + "' is missing");
  if (!it->is_string()) {
    return Status::InvalidArgument("field '" + k + "' must be a string, got " + kind_name(*it));
  }
  return it->get<std::string>();
}

void put_layout(nlohmann::json& body, const ArenaLayout& layout) {
  if (!body.is_object()) body = json::object();  // operator[] would throw on an array
  body["arena_bytes"] = layout.arena_bytes;
  body["request_ring_offset"] = layout.request_ring_offset;
  body["completion_ring_offset"] = layout.completion_ring_offset;
  body["data_offset"] = layout.data_offset;
  body["data_bytes"] = layout.data_bytes;
  body["ring_slots"] = kRingSlots;
}

Result<ArenaLayout> get_layout(const nlohmann::json& body) {
  ArenaLayout got{};
  const std::pair<const char*, uint64_t*> fields[] = {
      {"arena_bytes", &got.arena_bytes},
      {"request_ring_offset", &got.request_ring_offset},
      {"completion_ring_offset", &got.completion_ring_offset},
      {"data_offset", &got.data_offset},
      {"data_bytes", &got.data_bytes},
  };
  for (const auto& [name, dst] : fields) {
    TUTEL_ASSIGN_OR_RETURN(const int64_t v, get_int(body, name));
    if (v < 0) return Status::InvalidArgument(std::string("field '") + name + "' is negative");
    *dst = static_cast<uint64_t>(v);
  }
  TUTEL_ASSIGN_OR_RETURN(const int64_t slots, get_int(body, "ring_slots"));
  if (slots != kRingSlots) {
    return Status::InvalidArgument("the daemon's rings have " + std::to_string(slots) +
                                   " slots, this side expects " + std::to_string(kRingSlots) +
                                   "; upgrade the client or the daemon");
  }
  Result<ArenaLayout> want = arena_layout(got.arena_bytes);
  if (!want.ok()) return want.status().with_context("the daemon's arena layout");
  if (want->arena_bytes != got.arena_bytes ||
      want->request_ring_offset != got.request_ring_offset ||
      want->completion_ring_offset != got.completion_ring_offset ||
      want->data_offset != got.data_offset || want->data_bytes != got.data_bytes) {
    return Status::InvalidArgument(
        "the daemon's arena layout differs from the one this side computes for " +
        std::to_string(got.arena_bytes) + " bytes; upgrade the client or the daemon");
  }
  return got;
}

Status send_json(int fd, FrameType type, uint32_t request_id, const nlohmann::json& body,
                 const std::vector<int>& fds, std::chrono::milliseconds timeout) {
  return send_frame(fd, type, request_id, dump_body(body), fds, timeout);
}

Status send_error(int fd, uint32_t request_id, const Status& status,
                  std::chrono::milliseconds timeout) {
  return send_frame(fd, FrameType::kError, request_id, error_body(status), {}, timeout);
}

}  // namespace tutel::ipc
