// libFuzzer target: tuteld.toml and layer specs (daemon/src/config.cpp, toml_reader.cpp and the
// toml++ parser compiled in toml_impl.cpp).
//
// First byte even: the rest is a layer spec, as a client's kCreateLayer request or a checkpoint's
// 'tuteld.spec' metadata carries it: parse_layer_spec(text, "spec"). When it parses, the daemon
// stores format_layer_spec(def) and parses it back on restart, so that text must parse again
// and format to itself (the contract config.hpp states).
// First byte odd: the rest is a daemon config: parse_config(text, "/etc/tuteld/fuzz.toml"),
// with the same round trip for each [[layer]] it holds.
// Every error must be InvalidArgument and name the source (config.hpp: "<source>:...").
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "tutel/daemon/config.hpp"

using namespace tutel;
using namespace tutel::daemon;

namespace {

[[noreturn]] void fail(const char* what, const std::string& a, const std::string& b = "") {
  std::fprintf(stderr, "FUZZ_CHECK failed: %s\n--- 1 ---\n%s\n--- 2 ---\n%s\n", what, a.c_str(), b.c_str());
  std::abort();
}

void check_error(const Status& st, std::string_view source) {
  if (st.code() != StatusCode::kInvalidArgument) fail("error is not InvalidArgument", std::string(st.message()));
  if (st.message().substr(0, source.size()) != source) fail("error does not start with the source", std::string(st.message()));
}

void round_trip(const LayerDefinition& def) {
  const std::string text = format_layer_spec(def);
  Result<LayerDefinition> back = parse_layer_spec(text, "formatted");
  if (!back.ok()) fail("format_layer_spec output does not parse", text, std::string(back.status().message()));
  const std::string again = format_layer_spec(*back);
  if (again != text) fail("format_layer_spec is not a fixed point", text, again);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0) {
    Result<LayerDefinition> def = parse_layer_spec(text, "spec");
    if (!def.ok()) {
      check_error(def.status(), "spec");
      return 0;
    }
    round_trip(*def);
  } else {
    Result<Config> config = parse_config(text, "/etc/tuteld/fuzz.toml");
    if (!config.ok()) {
      check_error(config.status(), "/etc/tuteld/fuzz.toml");
      return 0;
    }
    for (const LayerDefinition& def : config->layers) round_trip(def);
  }
  return 0;
}
