#include "tutel/core/status.hpp"

#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace tutel {
namespace {

TEST(StatusTest, DefaultAndOkAreOk) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_TRUE(s.message().empty());
  EXPECT_EQ(s.to_string(), "OK");
  EXPECT_TRUE(Status::OK().ok());
}

TEST(StatusTest, FactoriesSetCodeAndMessage) {
  struct Case {
    std::function<Status(std::string)> make;
    StatusCode code;
    const char* name;
  };
  const std::vector<Case> cases = {
      {Status::InvalidArgument, StatusCode::kInvalidArgument, "InvalidArgument"},
      {Status::NotFound, StatusCode::kNotFound, "NotFound"},
      {Status::AlreadyExists, StatusCode::kAlreadyExists, "AlreadyExists"},
      {Status::OutOfRange, StatusCode::kOutOfRange, "OutOfRange"},
      {Status::Corruption, StatusCode::kCorruption, "Corruption"},
      {Status::IOError, StatusCode::kIOError, "IOError"},
      {Status::Unavailable, StatusCode::kUnavailable, "Unavailable"},
      {Status::PermissionDenied, StatusCode::kPermissionDenied, "PermissionDenied"},
      {Status::ResourceExhausted, StatusCode::kResourceExhausted, "ResourceExhausted"},
      {Status::Unimplemented, StatusCode::kUnimplemented, "Unimplemented"},
      {Status::Internal, StatusCode::kInternal, "Internal"},
      {Status::Timeout, StatusCode::kTimeout, "Timeout"},
      {Status::Aborted, StatusCode::kAborted, "Aborted"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const Status s = c.make("layer 'moe3' is busy");
    EXPECT_FALSE(s.ok());
    EXPECT_EQ(s.code(), c.code);
    EXPECT_EQ(s.message(), "layer 'moe3' is busy");
    EXPECT_EQ(status_code_name(c.code), c.name);
    EXPECT_EQ(s.to_string(), std::string(c.name) + ": layer 'moe3' is busy");
    std::ostringstream os;
    os << s;
    EXPECT_EQ(os.str(), s.to_string());
  }
  EXPECT_EQ(status_code_name(StatusCode::kOk), "OK");
}

TEST(StatusTest, WithContextPrefixesMessageAndKeepsCode) {
  const Status base = Status::NotFound("no layer 'moe3'");
  const Status s = base.with_context("registering tenant 'a'");
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_EQ(s.message(), "registering tenant 'a': no layer 'moe3'");
  EXPECT_EQ(base.message(), "no layer 'moe3'");
  EXPECT_EQ(s.with_context("outer").message(), "outer: registering tenant 'a': no layer 'moe3'");
  EXPECT_TRUE(Status::OK().with_context("anything").ok());
}

TEST(StatusTest, CopyIsDeepAndIndependent) {
  Status a = Status::IOError("disk full");
  Status b = a;
  EXPECT_EQ(b.code(), StatusCode::kIOError);
  EXPECT_EQ(b.message(), "disk full");
  a = Status::Timeout("slow peer");
  EXPECT_EQ(b.message(), "disk full");
  EXPECT_EQ(a.message(), "slow peer");

  Status ok;
  b = ok;
  EXPECT_TRUE(b.ok());
  b = a;
  EXPECT_EQ(b.code(), StatusCode::kTimeout);
  const Status& same = b;
  b = same;
  EXPECT_EQ(b.message(), "slow peer");
}

TEST(StatusTest, MoveTransfersTheError) {
  Status a = Status::Aborted("peer died");
  Status b = std::move(a);
  EXPECT_EQ(b.code(), StatusCode::kAborted);
  EXPECT_EQ(b.message(), "peer died");
  Status c;
  c = std::move(b);
  EXPECT_EQ(c.code(), StatusCode::kAborted);
  EXPECT_EQ(c.message(), "peer died");
}

TEST(ResultTest, HoldsValue) {
  Result<std::string> r(std::string("expert"));
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r.status().ok());
  EXPECT_EQ(r.value(), "expert");
  EXPECT_EQ(*r, "expert");
  EXPECT_EQ(r->size(), 6u);
  r.value() += "s";
  EXPECT_EQ(*r, "experts");
  const Result<std::string>& cr = r;
  EXPECT_EQ(cr.value(), "experts");
  EXPECT_EQ(cr->size(), 7u);
  EXPECT_EQ(std::move(r).value(), "experts");
}

TEST(ResultTest, HoldsError) {
  Result<int> r(Status::OutOfRange("index 9 of 4"));
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kOutOfRange);
  EXPECT_EQ(r.status().message(), "index 9 of 4");
  const Status moved = std::move(r).status();
  EXPECT_EQ(moved.code(), StatusCode::kOutOfRange);
}

// The invariants hold in release builds too, where the asserts that catch these misuses are
// compiled out: an OK Result always holds a value, an error Status never reads as kOk.
TEST(ResultTest, MisuseStaysConsistentWithoutAsserts) {
#ifndef NDEBUG
  GTEST_SKIP() << "asserts are on: they stop these misuses at the call";
#else
  Result<int> from_ok = Status::OK();
  EXPECT_FALSE(from_ok.ok());
  EXPECT_EQ(from_ok.status().code(), StatusCode::kInternal);
  const Status ok_with_message(StatusCode::kOk, "nothing wrong");
  EXPECT_TRUE(ok_with_message.ok());
  EXPECT_EQ(ok_with_message.code(), StatusCode::kOk);
#endif
}

TEST(ResultTest, MoveOnlyValue) {
  Result<std::unique_ptr<int>> r(std::make_unique<int>(42));
  ASSERT_TRUE(r.ok());
  std::unique_ptr<int> p = std::move(r).value();
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(*p, 42);

  Result<std::unique_ptr<int>> source(std::make_unique<int>(7));
  Result<std::unique_ptr<int>> moved = std::move(source);
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(**moved, 7);
}

Status fail_if(bool fail, int* calls) {
  ++*calls;
  return fail ? Status::Unavailable("not yet") : Status::OK();
}

Status two_steps(bool fail_first, bool fail_second, int* calls, bool* reached_end) {
  TUTEL_RETURN_IF_ERROR(fail_if(fail_first, calls));
  TUTEL_RETURN_IF_ERROR(fail_if(fail_second, calls));
  *reached_end = true;
  return Status::OK();
}

TEST(StatusMacrosTest, ReturnIfErrorStopsAtTheFirstError) {
  int calls = 0;
  bool reached_end = false;
  EXPECT_TRUE(two_steps(false, false, &calls, &reached_end).ok());
  EXPECT_EQ(calls, 2);
  EXPECT_TRUE(reached_end);

  calls = 0;
  reached_end = false;
  const Status s = two_steps(true, false, &calls, &reached_end);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_EQ(calls, 1);  // the failing expression is evaluated once and nothing after it
  EXPECT_FALSE(reached_end);

  calls = 0;
  EXPECT_EQ(two_steps(false, true, &calls, &reached_end).code(), StatusCode::kUnavailable);
  EXPECT_EQ(calls, 2);
  EXPECT_FALSE(reached_end);
}

Result<int> parse_positive(int x) {
  if (x <= 0) return Status::InvalidArgument("not positive: " + std::to_string(x));
  return x;
}

Result<std::unique_ptr<int>> boxed(int x) {
  if (x < 0) return Status::InvalidArgument("negative");
  return std::make_unique<int>(x);
}

Result<int> sum_positive(int a, int b) {
  TUTEL_ASSIGN_OR_RETURN(const int x, parse_positive(a));
  TUTEL_ASSIGN_OR_RETURN(auto y, parse_positive(b));
  return x + y;
}

Status assign_existing(int a, int* out) {
  int value = 0;
  TUTEL_ASSIGN_OR_RETURN(value, parse_positive(a));
  *out = value;
  return Status::OK();
}

Result<int> unbox(int x) {
  TUTEL_ASSIGN_OR_RETURN(std::unique_ptr<int> p, boxed(x));
  return *p + 1;
}

TEST(StatusMacrosTest, AssignOrReturnBindsOrPropagates) {
  const Result<int> ok = sum_positive(2, 3);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, 5);

  const Result<int> first_bad = sum_positive(-1, 3);
  EXPECT_EQ(first_bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(first_bad.status().message(), "not positive: -1");
  EXPECT_EQ(sum_positive(1, 0).status().message(), "not positive: 0");

  int out = 0;
  EXPECT_TRUE(assign_existing(9, &out).ok());
  EXPECT_EQ(out, 9);
  EXPECT_EQ(assign_existing(0, &out).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(out, 9);

  ASSERT_TRUE(unbox(4).ok());
  EXPECT_EQ(*unbox(4), 5);
  EXPECT_EQ(unbox(-4).status().message(), "negative");
}

}  // namespace
}  // namespace tutel
