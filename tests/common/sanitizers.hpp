// What the tests need to know about the sanitizer builds (tools/sanitize.sh).
#pragma once

namespace tutel::testing {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool kUnderSanitizer = true;
// ThreadSanitizer runs the forked rank groups about ten times slower than a plain build (the
// 8-rank UCX collectives took 77-84 s alone where they take 5-8 s); guards against hangs stretch
// by this factor so that only a hang trips them.
inline constexpr unsigned kSanitizerSlowdown = 4;
#else
inline constexpr bool kUnderSanitizer = false;
inline constexpr unsigned kSanitizerSlowdown = 1;
#endif

}  // namespace tutel::testing
