// tuteld --config FILE: serves MoE layers to the trainers on this node until SIGTERM/SIGINT.
#include <malloc.h>
#include <signal.h>
#include <sys/resource.h>
#include <stdlib.h>

#include <CLI/CLI.hpp>
#include <cstring>
#include <iostream>

#include "tutel/core/logging.hpp"
#include "tutel/daemon/config.hpp"
#include "tutel/daemon/daemon.hpp"
#include "tutel/kernels/openmp_spin.hpp"

int main(int argc, char** argv) {
  // First: it may execute the daemon again, with an environment that keeps a busy node's cores
  // from the CPU ranks' idle OpenMP threads (tutel/kernels/openmp_spin.hpp).
  if (tutel::Status spin = tutel::bound_openmp_spin(argv); !spin.ok()) TUTEL_LOG(WARN) << spin.message();
  // Before anything starts a thread: every thread inherits the mask, and one thread of the
  // daemon's takes SIGTERM and SIGINT (daemon/src/signal_watcher.hpp says why).
  tutel::daemon::block_termination_signals();
  std::string config_path;
  CLI::App app{"tuteld: serves Mixture-of-Experts layers to the training processes on this node", "tuteld"};
  app.set_version_flag("--version", "tuteld " TUTEL_VERSION);
  app.add_option("--config", config_path, "the daemon's TOML config (see docs/config.md)")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::cerr << "tuteld: " << e.what() << "\nRun 'tuteld --help' for the usage.\n";
    return 2;
  }
  // A client that disappears mid-write must not kill the daemon, nor a file past RLIMIT_FSIZE (a
  // save fails with EFBIG instead, and the other layers' exit checkpoints are still written).
  ::signal(SIGPIPE, SIG_IGN);
  ::signal(SIGXFSZ, SIG_IGN);
  // Every session holds a socket and its arena, every group layer its transports: the soft
  // limit on descriptors (often 1024) goes up to what the hard limit allows.
  if (rlimit files{}; ::getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &files);
  }
  // Control operations run on libuv's thread pool (4 threads by default); a group layer's
  // create blocks there until its peers arrive, so a few pending groups must not starve the
  // session tear-downs and checkpoints queued behind them.
  // Creations may hold half of it (DaemonImpl::creation_slots_): 32 groups meeting at once on
  // one daemon. Other control frames of one layer wait for each other on the loop, not here
  // (DaemonImpl::layer_work_).
  ::setenv("UV_THREADPOOL_SIZE", "64", /*overwrite=*/0);
  // Tensors (weights, optimizer state, plans' buffers, staging) are blocks of megabytes that come
  // and go with layers and plans. glibc raises its mmap threshold to the size of each mmapped
  // block freed (up to 32 MiB), and blocks below it then come from its heaps, where freed ones
  // stay resident: a daemon whose layers had all come and gone held 1.7 GB (docs/decisions.md).
  // A fixed threshold keeps every block of 1 MiB or more mmapped, given back when freed. An
  // operator's own setting (MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES) is left to stand.
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") == nullptr &&
      (tunables == nullptr || std::strstr(tunables, "mmap_threshold") == nullptr))
    (void)::mallopt(M_MMAP_THRESHOLD, 1 << 20);

  auto config = tutel::daemon::load_config(config_path);
  if (!config.ok()) {
    std::cerr << "tuteld: " << config.status().message() << "\n";
    return 2;
  }
  tutel::set_log_level(config->server.log_level);
  auto daemon = tutel::daemon::Daemon::create(std::move(config).value());
  if (!daemon.ok()) {
    std::cerr << "tuteld: cannot start: " << daemon.status() << "\n";
    return 1;
  }
  return (*daemon)->run();
}
