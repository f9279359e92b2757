// libFuzzer target: what the client side does with the daemon's replies: libtutel_client's
// decoding of LayerInfo bodies (client.cpp layer_info_from), completion descriptors
// (session.cpp completion_status), region handles (region_import.cpp parse_hex), the admin
// client's re-serialisation of replies (admin_client.cpp: dump_body), and tutelctl's rendering
// of each admin reply (tools/tutelctl/main.cpp print_*).
//
// client.cpp, session.cpp and tutelctl's main.cpp are compiled into this file so their internal
// functions can be called; tutelctl's output goes to a discarded stream.
// The first byte picks what the rest is: % 8 < 6: a JSON reply body for layer_info_from and the
// printer (status, tenants, layers, plans, peers, metrics/checkpoint); 6: a CompletionDescriptor;
// 7: a hex handle.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>

#include "tutel/ipc/json_body.hpp"
#include "tutel/ipc/protocol.hpp"

#include "../../client/src/client.cpp"   // NOLINT(bugprone-suspicious-include)
#include "../../client/src/session.cpp"  // NOLINT(bugprone-suspicious-include)
#define main tutelctl_main
#include "../../tools/tutelctl/main.cpp"  // NOLINT(bugprone-suspicious-include)
#undef main

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static std::ostringstream sink;
  std::cout.rdbuf(sink.rdbuf());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const int mode = data[0] % 8;
  const std::string rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (mode == 6) {
    tutel::ipc::CompletionDescriptor c{};
    std::memcpy(&c, rest.data(), std::min(rest.size(), sizeof c));
    (void)tutel::client::internal::completion_status(c);
    return 0;
  }
  if (mode == 7) {
    (void)tutel::client::internal::parse_hex(rest, "handle");
    return 0;
  }
  // A reply frame as recv_frame hands it over; only bodies that fit a frame arrive.
  if (rest.size() > tutel::ipc::kMaxFrameBody) return 0;
  tutel::ipc::Frame frame;
  frame.header.type = static_cast<uint16_t>(tutel::ipc::FrameType::kOk);
  frame.body = rest;
  auto body = tutel::ipc::reply_body(frame, tutel::ipc::FrameType::kOk);
  if (!body.ok()) return 0;
  (void)tutel::client::layer_info_from(*body);
  // AdminClient::Impl::call hands tutelctl dump_body(reply); tutelctl parses that again.
  const std::string text = tutel::ipc::dump_body(*body);
  const json reparsed = json::parse(text, nullptr, false);
  if (reparsed.is_discarded() || !reparsed.is_object()) return 0;
  // tutelctl's main turns a json::exception from the printers (a field of another type, an
  // element that is no object) into "tuteld's reply has a field tutelctl cannot read" and exit
  // code 1 (tests/client/tutelctl_test.cpp, RepliesOfUnexpectedShapesAreErrorsNotCrashes); any
  // other exception, or a crash, is a finding.
  try {
    switch (mode) {
      case 0:
        print_status(reparsed);
        break;
      case 1:
        print_tenants(reparsed);
        break;
      case 2:
        print_layers(reparsed);
        break;
      case 3:
        print_plans(reparsed);
        break;
      case 4:
        print_peers(reparsed);
        print_sessions(reparsed);
        break;
      case 5: {
        const std::string metrics = reparsed.value("text", std::string());
        std::cout << metrics << reparsed.value("path", std::string("p")) << "\n";
        break;
      }
    }
  } catch (const json::exception&) {
  }
  return 0;
}
