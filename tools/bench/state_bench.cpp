#include "state_bench.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "bench_daemon.hpp"
#include "bench_util.hpp"
#include "tutel/client.hpp"

namespace tutel::bench {

int run_state_bench(const std::string& self, const StateBenchOptions& o) {
  BenchDaemon daemon(self, "cpu", 1, "64MiB", /*spin_us=*/-1, /*state_dir=*/true);
  if (!daemon.running()) {
    std::fprintf(stderr, "tutel-bench state: could not start tuteld next to %s\n", self.c_str());
    return 1;
  }
  auto client = client::Client::connect(daemon.socket());
  if (!client.ok()) {
    std::fprintf(stderr, "tutel-bench state: %s\n", client.status().to_string().c_str());
    return 1;
  }
  auto layer = client->create_layer("name = \"state\"\nexperts = " + std::to_string(o.experts) +
                                    "\nmodel_dim = " + std::to_string(o.model_dim) + "\nhidden = " +
                                    std::to_string(o.hidden) + "\nk = 2\ninit_seed = 1\n"
                                    "[optimizer]\nkind = \"adamw\"\nlr = 0.001\n");
  if (!layer.ok()) {
    std::fprintf(stderr, "tutel-bench state: %s\n", layer.status().to_string().c_str());
    return 1;
  }
  bool failed = false;
  auto check = [&](const Status& st, const char* what) {
    if (!st.ok() && !failed) std::fprintf(stderr, "tutel-bench state: %s: %s\n", what, st.to_string().c_str());
    failed = failed || !st.ok();
  };
  uint64_t bytes = 0;
  const double export_s = median_seconds(1, o.repeats, [&] {
    Result<client::ExportedState> state = layer->export_state();
    check(state.status(), "export_state");
    if (state.ok()) bytes = state->size();
  });
  Result<client::ExportedState> kept = layer->export_state();
  check(kept.status(), "export_state");
  if (failed) return 1;
  const int fd = kept->dup_fd();
  const double import_s = median_seconds(1, o.repeats, [&] { check(layer->import_state(fd), "import_state"); });
  ::close(fd);
  // The same bytes in a memfd sealed against writing, as the Python module sends them: mapped.
  const int sealed = ::memfd_create("bench state", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (::pwrite(sealed, kept->data(), bytes, 0) != static_cast<ssize_t>(bytes) ||
      ::fcntl(sealed, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE) != 0)
    check(Status::IOError("cannot make a sealed copy of the state"), "memfd");
  if (failed) return 1;
  const double import_sealed_s =
      median_seconds(1, o.repeats, [&] { check(layer->import_state(sealed), "import_state"); });
  ::close(sealed);
  const double save_s = median_seconds(1, o.repeats, [&] { check(layer->save("bench.safetensors").status(), "save"); });
  const double load_s = median_seconds(1, o.repeats, [&] { check(layer->load("bench.safetensors"), "load"); });
  if (failed) return 1;

  // The ceilings, on the same bytes: a memcpy into memory touched before, and one into fresh
  // pages (mapped and faulted in by the copy, then unmapped).
  const uint8_t* src = kept->data();
  std::vector<uint8_t> touched(bytes, 1);
  const double warm_s = median_seconds(1, o.repeats, [&] { std::memcpy(touched.data(), src, bytes); });
  const double fresh_s = median_seconds(1, o.repeats, [&] {
    void* fresh = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fresh == MAP_FAILED) return;
    std::memcpy(fresh, src, bytes);
    ::munmap(fresh, bytes);
  });

  std::printf("tutel-bench state: E=%lld M=%lld H=%lld, AdamW: %.1f MB of state (parameters and both moments), "
              "one tuteld on the CPU backend, median of %d\n",
              static_cast<long long>(o.experts), static_cast<long long>(o.model_dim),
              static_cast<long long>(o.hidden), bytes / 1e6, o.repeats);
  auto row = [&](const char* what, double s) {
    std::printf("  %-44s %8.1f ms  %6.2f GB/s  %5.2f x memcpy into fresh pages\n", what, s * 1e3, bytes / s / 1e9,
                s / fresh_s);
  };
  row("export_state (into the client's memfd)", export_s);
  row("import_state, an export's memfd (copied)", import_s);
  row("import_state, a write-sealed memfd (mapped)", import_sealed_s);
  row("save (to the daemon's state_dir)", save_s);
  row("load (from it)", load_s);
  row("ceiling: memcpy into fresh pages", fresh_s);
  row("ceiling: memcpy into touched memory", warm_s);
  return 0;
}

}  // namespace tutel::bench
