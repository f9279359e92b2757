// tutel-bench: benchmarks that print their result beside a ceiling measured in the same run.
// Not tests: nothing here asserts; read the ratios.
#include <CLI/CLI.hpp>
#include <sched.h>

#include <cstdio>

#include "a2a_bench.hpp"
#include "daemon_bench.hpp"
#include "ep_bench.hpp"
#include "grads_bench.hpp"
#include "layer_bench.hpp"
#include "state_bench.hpp"
#include "tutel/kernels/openmp_spin.hpp"

int main(int argc, char** argv) {
  // Measures what the daemon runs: the same bound on OpenMP's idle spin (it may execute itself
  // again; tutel/kernels/openmp_spin.hpp).
  if (tutel::Status spin = tutel::bound_openmp_spin(argv); !spin.ok())
    std::fprintf(stderr, "tutel-bench: warning: %s\n", std::string(spin.message()).c_str());
  CLI::App app{"tutel-bench: tuteld benchmarks, each next to its measured ceiling"};
  app.require_subcommand(1);

  tutel::bench::LayerBenchOptions layer;
  CLI::App* layer_cmd = app.add_subcommand("layer", "one MoE layer: forward and forward+backward vs the expert-GEMM floor");
  layer_cmd->add_option("--shape", layer.shapes,
                        "small | large | gpu (S=16384 M=4096 H=14336) | all (cpu: small, large; cuda: large, gpu)")
      ->capture_default_str();
  layer_cmd->add_option("--backend", layer.backend,
                        "cpu | cuda (exit code 3 where cuda cannot run: no CUDA device, or a build without CUDA)")
      ->check(CLI::IsMember({"cpu", "cuda"}))  // checked before anything is printed
      ->capture_default_str();
  layer_cmd->add_option("--matmul-dtype", layer.matmul_dtype, "f32 | bf16 (default: f32 on cpu, bf16 on cuda)")
      ->check(CLI::IsMember({"f32", "bf16"}));
  layer_cmd
      ->add_option(
          "--weights-bf16", layer.weights_bf16,
          "bf16 matmuls: on = read bf16 copies of the expert weights, made once and refreshed by "
          "the optimizer step; off = convert the f32 weights on every matmul")
      ->check(CLI::IsMember({"on", "off"}))
      ->capture_default_str();
  layer_cmd
      ->add_option("--epilogues", layer.epilogues,
                   "cuda: fused = the expert GEMMs add their bias (and ReLU) in cuBLASLt's "
                   "epilogue; separate = in passes of their own (to compare)")
      ->check(CLI::IsMember({"fused", "separate"}))
      ->capture_default_str();
  layer_cmd->add_flag("--graph", layer.graph,
                      "cuda: also a decode-sized step (S=128) launched op by op vs replayed as a CUDA graph");
  layer_cmd->add_flag(
      "--phases", layer.phases,
      "cuda: instead, the GPU time of each op of an inference step (at each shape's S and at "
      "S=128), the ops run back to back behind a held stream, beside the same ops as one graph");
  layer_cmd->add_option("--threads", layer.threads, "CPU threads (0 = all cores)")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  layer_cmd->add_option("--repeats", layer.repeats, "timed runs per measurement")->check(CLI::PositiveNumber)->capture_default_str();

  bool via_daemon = false;
  layer_cmd->add_flag("--via-daemon", via_daemon,
                      "cpu: the large shape's forward through a tuteld started for the run vs in-process, "
                      "through the arena and in a device region, then decode-sized inferences (S=1..128) "
                      "with the daemon's context switches per request; cuda: through the arena vs in a device "
                      "region (CUDA IPC) at S=128 and 4096");

  int ipc_repeats = 5;
  CLI::App* ipc_cmd = app.add_subcommand("ipc", "round trip and bulk transfer through tuteld vs memcpy");
  ipc_cmd->add_option("--repeats", ipc_repeats, "scale of the run")->check(CLI::PositiveNumber)->capture_default_str();
  int spin_us = -1;
  ipc_cmd->add_option("--spin-us", spin_us, "the daemon's and the client's spin before sleeping (default: 50)");

  tutel::bench::A2aBenchOptions a2a;
  CLI::App* a2a_cmd = app.add_subcommand("a2a", "all-to-all (linear, 2DH): forked ranks over UCX on loopback vs UCX point-to-point; threads of one process (memory) vs memcpy");
  a2a_cmd->add_option("--ranks", a2a.ranks, "group sizes, comma-separated")->capture_default_str();
  a2a_cmd->add_option("--transports", a2a.transports, "memory (threads of one process, LocalExchange) | peer (tcp + process_vm_readv for large messages) | shm (UCX_TLS=posix,self) | sm (sm,self) | tcp (tcp,self), comma-separated")->capture_default_str();
  a2a_cmd->add_option("--sizes", a2a.sizes, "per-rank send buffer sizes (all chunks), comma-separated")->capture_default_str();
  a2a_cmd->add_option("--repeats", a2a.repeats, "timed runs per point (at least 3; fewer when a run takes over 2 s / repeats)")->check(CLI::PositiveNumber)->capture_default_str();
  a2a_cmd->add_option("--spin-us", a2a.spin_us, "the communicator's busy-poll before it sleeps (default: 50)");

  tutel::bench::EpBenchOptions ep;
  CLI::App* ep_cmd =
      app.add_subcommand("ep",
                         "the expert-parallel layer on forked ranks at each pipeline degree d, and "
                         "the tuner's choice, vs its GEMM and all-to-all floors");
  ep_cmd->add_option("--ranks", ep.ranks, "group size (forked ranks)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  ep_cmd
      ->add_option("--shapes", ep.shapes,
                   "comm (H=256: the exchange weighs) | compute (H=2048), comma-separated")
      ->capture_default_str();
  ep_cmd->add_option("--pipelines", ep.pipelines, "pipeline degrees d to time, comma-separated")
      ->capture_default_str();
  ep_cmd->add_option("--repeats", ep.repeats, "timed runs per measurement")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  ep_cmd
      ->add_option("--matmul-dtype", ep.matmul_dtype,
                   "f32 | bf16 (bf16: the weights' bf16 copies, the dispatched tokens exchanged "
                   "in bf16)")
      ->check(CLI::IsMember({"f32", "bf16"}))
      ->capture_default_str();
  ep_cmd->add_option("--experts", ep.experts, "E for every shape (0: the shapes' own, 8; k is capped at E); --experts 2 --ranks 2 is one expert per rank, --experts 1 --ranks 2 shards it (r = 1 and r = 2 run)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();

  tutel::bench::GradsBenchOptions grads;
  CLI::App* grads_cmd = app.add_subcommand(
      "grads", "the gradient norm's and scale's CPU kernels (add_sum_squares, scale) vs a read and an in-place rewrite of the same bytes");
  grads_cmd->add_option("--floats", grads.floats, "gradient floats (default: E=8 M=1024 H=4096's)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  grads_cmd->add_option("--threads", grads.threads, "CPU threads (0 = all cores)")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  grads_cmd->add_option("--repeats", grads.repeats, "timed runs per measurement")->check(CLI::PositiveNumber)->capture_default_str();

  tutel::bench::StateBenchOptions state;
  CLI::App* state_cmd = app.add_subcommand(
      "state", "a layer's state through memory (export_state, import_state) and the daemon's disk (save, load) vs memcpy");
  state_cmd->add_option("--experts", state.experts, "E")->check(CLI::PositiveNumber)->capture_default_str();
  state_cmd->add_option("--model-dim", state.model_dim, "M")->check(CLI::PositiveNumber)->capture_default_str();
  state_cmd->add_option("--hidden", state.hidden, "H")->check(CLI::PositiveNumber)->capture_default_str();
  state_cmd->add_option("--repeats", state.repeats, "timed runs per measurement")->check(CLI::PositiveNumber)->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // 2 for a usage error, as the benchmarks document (CLI11's own codes are 100 and up).
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  // More threads than CPUs is allowed (oversubscription is a thing to measure too), but said:
  // such numbers measure the threads' sharing of cores, not the kernels.
  // The CPUs this process may run on (its affinity: a container's cpuset), not those online.
  cpu_set_t allowed;
  const int cpus = ::sched_getaffinity(0, sizeof allowed, &allowed) == 0 ? CPU_COUNT(&allowed) : 0;
  const int threads = layer_cmd->parsed() ? layer.threads : grads_cmd->parsed() ? grads.threads : 0;
  if (cpus > 0 && threads > cpus)
    std::fprintf(stderr, "tutel-bench: --threads %d is more than the %d CPUs this process may use: the threads share cores, "
                 "and the numbers measure that\n", threads, cpus);
  if (state_cmd->parsed()) return tutel::bench::run_state_bench(argv[0], state);
  if (ep_cmd->parsed()) return tutel::bench::run_ep_bench(ep);
  if (grads_cmd->parsed()) return tutel::bench::run_grads_bench(grads);
  if (layer_cmd->parsed() && via_daemon && layer.backend == "cuda") {
#if defined(TUTEL_HAVE_CUDA)
    return tutel::bench::run_cuda_layer_via_daemon_bench(argv[0], layer.repeats);
#else
    std::fprintf(stderr, "tutel-bench layer: --backend cuda: this tutel-bench was built without CUDA\n");
    return tutel::bench::kExitNoCuda;
#endif
  }
  if (layer_cmd->parsed())
    return via_daemon ? tutel::bench::run_layer_via_daemon_bench(argv[0], layer.threads, layer.repeats)
                      : tutel::bench::run_layer_bench(layer);
  if (ipc_cmd->parsed()) return tutel::bench::run_ipc_bench(argv[0], ipc_repeats, spin_us);
  if (a2a_cmd->parsed()) return tutel::bench::run_a2a_bench(a2a);
  return 2;
}
