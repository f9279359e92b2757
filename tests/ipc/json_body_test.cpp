#include "tutel/ipc/json_body.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>

namespace tutel::ipc {
namespace {

using nlohmann::json;

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

Frame make_frame(FrameType type, std::string body, uint32_t request_id = 5) {
  Frame f;
  f.header.type = static_cast<uint16_t>(type);
  f.header.body_length = static_cast<uint32_t>(body.size());
  f.header.request_id = request_id;
  f.body = std::move(body);
  return f;
}

TEST(JsonBodyTest, ParsesAnObject) {
  Result<json> r = parse_body(make_frame(FrameType::kHello, R"({"client":"t","pid":12})"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)["client"], "t");
  EXPECT_EQ((*r)["pid"], 12);
}

TEST(JsonBodyTest, EmptyBodyIsAnEmptyObject) {
  Result<json> r = parse_body(make_frame(FrameType::kAdminStatus, ""));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->is_object());
  EXPECT_TRUE(r->empty());
}

TEST(JsonBodyTest, RefusesMalformedJsonAndNamesTheFrame) {
  Result<json> r = parse_body(make_frame(FrameType::kCreateLayer, R"({"spec": )", 41));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(r.status().message(), "CreateLayer")) << r.status();
  EXPECT_TRUE(contains(r.status().message(), "request 41")) << r.status();
  EXPECT_TRUE(contains(r.status().message(), "not valid JSON")) << r.status();

  Result<json> bad_utf8 = parse_body(make_frame(FrameType::kHello, "{\"client\":\"\xff\xfe\"}"));
  EXPECT_FALSE(bad_utf8.ok());
}

// Copying or printing a parsed document recurses once per level: a body nested 400 000 deep
// (it fits in one frame) would overflow the daemon's stack when a handler copies it, so nesting
// past 32 is refused before parsing, with the frame named. Brackets inside strings are text.
TEST(JsonBodyTest, DeepNestingIsRefusedBeforeParsing) {
  const size_t depth = 400000;
  const std::string balanced = "{\"a\":" + std::string(depth, '[') + std::string(depth, ']') + "}";
  ASSERT_LE(balanced.size(), kMaxFrameBody);
  Result<json> deep = parse_body(make_frame(FrameType::kStep, balanced, 9));
  ASSERT_FALSE(deep.ok());
  EXPECT_EQ(deep.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(deep.status().message(), "request 9")) << deep.status();
  EXPECT_TRUE(contains(deep.status().message(), "32 deep")) << deep.status();
  const std::string unbalanced = "{\"a\":" + std::string(depth, '[') + "}";
  EXPECT_FALSE(parse_body(make_frame(FrameType::kCreateLayer, unbalanced)).ok());

  // 32 levels (the object itself and 31 arrays) parse; 33 do not.
  auto nested = [](size_t arrays) {
    return "{\"a\":" + std::string(arrays, '[') + std::string(arrays, ']') + "}";
  };
  EXPECT_TRUE(parse_body(make_frame(FrameType::kStep, nested(31))).ok());
  EXPECT_FALSE(parse_body(make_frame(FrameType::kStep, nested(32))).ok());
  // Brackets and escaped quotes inside strings do not count.
  const std::string text = "{\"spec\":\"" + std::string(1000, '[') + "\\\"" +
                           std::string(1000, '{') + "\"}";
  Result<json> flat = parse_body(make_frame(FrameType::kCreateLayer, text));
  ASSERT_TRUE(flat.ok()) << flat.status();
  EXPECT_EQ((*flat)["spec"].get<std::string>().size(), 2001u);
}

TEST(JsonBodyTest, RefusesNonObjects) {
  for (const char* body : {"[1,2]", "17", "\"text\"", "null"}) {
    SCOPED_TRACE(body);
    Result<json> r = parse_body(make_frame(FrameType::kStep, body));
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(contains(r.status().message(), "must be a JSON object")) << r.status();
  }
}

TEST(JsonBodyTest, ErrorBodyRoundTripsEveryCode) {
  for (int c = 1; c <= static_cast<int>(StatusCode::kAborted); ++c) {
    const Status original(static_cast<StatusCode>(c), "layer 'moe3' belongs to tenant 'a'");
    Result<json> body = parse_body(make_frame(FrameType::kError, error_body(original)));
    ASSERT_TRUE(body.ok()) << body.status();
    EXPECT_EQ((*body)["code_name"], std::string(status_code_name(original.code())));
    const Status back = status_from_error_body(*body);
    EXPECT_EQ(back.code(), original.code());
    EXPECT_EQ(back.message(), original.message());
  }
}

TEST(JsonBodyTest, ErrorBodyNeverThrowsOnBadUtf8AndCutsHugeMessages) {
  const std::string bad = error_body(Status::NotFound("no file '\xff\xfe.safetensors'"));
  Result<json> body = parse_body(make_frame(FrameType::kError, bad));
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_EQ(status_from_error_body(*body).code(), StatusCode::kNotFound);

  const std::string huge = error_body(Status::Internal(std::string(4u << 20, 'x')));
  EXPECT_LT(huge.size(), kMaxFrameBody);
}

TEST(JsonBodyTest, MalformedErrorBodiesBecomeInternal) {
  const json cases[] = {
      json::array(),
      json{{"message", "m"}},
      json{{"code", "5"}, {"message", "m"}},
      json{{"code", 5}},
      json{{"code", 0}, {"message", "m"}},
  };
  for (const json& c : cases) {
    SCOPED_TRACE(c.dump());
    const Status s = status_from_error_body(c);
    EXPECT_EQ(s.code(), StatusCode::kInternal);
    EXPECT_FALSE(s.message().empty());
  }
  const Status future =
      status_from_error_body(json{{"code", 99}, {"code_name", "Future"}, {"message", "m"}});
  EXPECT_EQ(future.code(), StatusCode::kInternal);
  EXPECT_TRUE(contains(future.message(), "Future")) << future;
}

TEST(JsonBodyTest, ReplyBodyMapsErrorsAndChecksTheType) {
  Result<json> err = reply_body(make_frame(FrameType::kError, error_body(Status::NotFound("gone"))),
                                FrameType::kLayerInfo);
  ASSERT_FALSE(err.ok());
  EXPECT_EQ(err.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(err.status().message(), "gone");

  Result<json> wrong = reply_body(make_frame(FrameType::kOk, "{}"), FrameType::kLayerInfo);
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.status().code(), StatusCode::kCorruption);
  EXPECT_TRUE(contains(wrong.status().message(), "LayerInfo")) << wrong.status();

  Result<json> ok = reply_body(make_frame(FrameType::kOk, R"({"step":3})"), FrameType::kOk);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)["step"], 3);
}

TEST(JsonBodyTest, TypedFieldsNameWhatIsWrong) {
  const json body = {{"handle", 12}, {"name", "moe"},
                     {"neg", -3},    {"big", std::numeric_limits<uint64_t>::max()},
                     {"float", 1.5}, {"text_number", "12"}};
  EXPECT_EQ(*get_int(body, "handle"), 12);
  EXPECT_EQ(*get_int(body, "neg"), -3);
  EXPECT_EQ(*get_string(body, "name"), "moe");

  Result<int64_t> missing = get_int(body, "layer");
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(contains(missing.status().message(), "'layer' is missing")) << missing.status();
  Result<int64_t> text = get_int(body, "text_number");
  ASSERT_FALSE(text.ok());
  EXPECT_TRUE(contains(text.status().message(), "must be an integer, got string")) << text.status();
  EXPECT_FALSE(get_int(body, "float").ok());
  EXPECT_FALSE(get_int(body, "big").ok());
  Result<std::string> not_string = get_string(body, "handle");
  ASSERT_FALSE(not_string.ok());
  EXPECT_TRUE(contains(not_string.status().message(), "must be a string")) << not_string.status();
  EXPECT_FALSE(get_int(json::array(), "handle").ok());

  // Numbers: integers and not.
  EXPECT_EQ(*get_number(body, "float"), 1.5);
  EXPECT_EQ(*get_number(body, "neg"), -3.0);
  Result<double> text_number = get_number(body, "text_number");
  ASSERT_FALSE(text_number.ok());
  EXPECT_TRUE(contains(text_number.status().message(), "must be a number, got string")) << text_number.status();
  EXPECT_TRUE(contains(get_number(body, "layer").status().message(), "'layer' is missing"));
  EXPECT_FALSE(get_number(json{{"x", nullptr}}, "x").ok());
  EXPECT_FALSE(get_number(json{{"x", true}}, "x").ok());
  EXPECT_FALSE(get_number(json::array(), "x").ok());

  // Booleans: true or false, nothing that converts to one.
  EXPECT_EQ(*get_bool(json{{"x", false}}, "x"), false);
  EXPECT_EQ(*get_bool(json{{"x", true}}, "x"), true);
  Result<bool> one = get_bool(json{{"x", 1}}, "x");
  ASSERT_FALSE(one.ok());
  EXPECT_TRUE(contains(one.status().message(), "'x' must be a boolean, got")) << one.status();
  EXPECT_TRUE(contains(get_bool(body, "layer").status().message(), "'layer' is missing"));
  EXPECT_FALSE(get_bool(json{{"x", "true"}}, "x").ok());
  EXPECT_FALSE(get_bool(json::array(), "x").ok());
}

TEST(JsonBodyTest, LayoutRoundTripsAndMismatchesAreRefused) {
  Result<ArenaLayout> l = arena_layout(1 << 20);
  ASSERT_TRUE(l.ok());
  json body = {{"session", 1}, {"tenant", "a"}};
  put_layout(body, *l);
  Result<ArenaLayout> back = get_layout(json::parse(dump_body(body)));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->arena_bytes, l->arena_bytes);
  EXPECT_EQ(back->request_ring_offset, l->request_ring_offset);
  EXPECT_EQ(back->completion_ring_offset, l->completion_ring_offset);
  EXPECT_EQ(back->data_offset, l->data_offset);
  EXPECT_EQ(back->data_bytes, l->data_bytes);

  json moved = body;
  moved["data_offset"] = l->data_offset + 4096;
  Result<ArenaLayout> r = get_layout(moved);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(contains(r.status().message(), "upgrade")) << r.status();

  json slots = body;
  slots["ring_slots"] = 128;
  EXPECT_FALSE(get_layout(slots).ok());

  json missing = body;
  missing.erase("data_bytes");
  EXPECT_FALSE(get_layout(missing).ok());
}

}  // namespace
}  // namespace tutel::ipc
