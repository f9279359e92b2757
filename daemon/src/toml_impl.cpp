// toml++'s implementation, compiled once for the whole program. Every TU that includes
// <toml++/toml.h> is built with TOML_HEADER_ONLY=0 and TOML_EXCEPTIONS=0 (see
// daemon/CMakeLists.txt): parse errors come back as values, never as exceptions.
//
// toml++ 3.3's parser asserts a precondition that malformed table headers break ("[[=",
// "[[[a]]", "[\x7f"; fixed upstream by marzer/tomlplusplus#301); past it, the parser reports an
// ordinary parse error. So its internal assertions must neither abort a debug build on bad
// input nor become optimiser assumptions in a release build (TOML_ASSERT_ASSUME turns into
// __builtin_assume under NDEBUG with clang): here they are no-ops in every build type. The
// fuzz tests in tests/daemon/config_test.cpp cover this.
#undef NDEBUG
#define TOML_ASSERT(expr) static_assert(true)
#define TOML_IMPLEMENTATION
#include <toml++/toml.h>
