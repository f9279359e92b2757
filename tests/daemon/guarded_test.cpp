// guarded(): an exception out of a request's work becomes that request's error, never the
// daemon's end (std::terminate on a pool thread or a session's worker).
#include "guarded.hpp"

#include <gtest/gtest.h>

#include <new>
#include <stdexcept>

namespace tutel::daemon {
namespace {

TEST(Guarded, PassesResultsThrough) {
  EXPECT_TRUE(guarded([] { return Status::OK(); }).ok());
  const Result<int> r = guarded([]() -> Result<int> { return 7; });
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 7);
  EXPECT_EQ(guarded([] { return Status::NotFound("x"); }).code(), StatusCode::kNotFound);
}

TEST(Guarded, OutOfHostMemoryIsResourceExhausted) {
  // Thrown rather than provoked: an allocation too large to make is a sanitizer's error, not an
  // exception, under AddressSanitizer.
  const Status thrown = guarded([]() -> Status { throw std::bad_alloc(); });
  EXPECT_EQ(thrown.code(), StatusCode::kResourceExhausted) << thrown;
  EXPECT_NE(thrown.message().find("out of host memory"), std::string_view::npos) << thrown;
}

TEST(Guarded, AnyOtherExceptionIsInternalAndSaysWhat) {
  const Status st = guarded([]() -> Status { throw std::runtime_error("boom"); });
  EXPECT_EQ(st.code(), StatusCode::kInternal) << st;
  EXPECT_NE(st.message().find("boom"), std::string_view::npos) << st;
}

}  // namespace
}  // namespace tutel::daemon
