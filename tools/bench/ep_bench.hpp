#pragma once

#include <string>

namespace tutel::bench {

struct EpBenchOptions {
  int ranks = 2;  // W: forked ranks, each its own process (two daemons' ranks)
  std::string shapes = "comm,compute";  // comm (H = 256: the exchange weighs) | compute (H = 2048)
  std::string pipelines = "1,2,4";      // the d values timed
  int repeats = 5;                      // timed runs per measurement (median)
  // f32, or bf16 (expert GEMM inputs in bf16, the weights' bf16 copies made once, the dispatched
  // tokens exchanged in bf16).
  std::string matmul_dtype = "f32";
  // E: experts of every shape; 0 = the shapes' own (8). E = ranks is Tutel's one expert per rank.
  int experts = 0;
};

// The expert-parallel layer across forked ranks (UCX over tcp/lo with peer memory, as two daemons
// of one host exchange) at each pipeline degree d, next to its floors measured in the same run by
// the same ranks at the same time: the expert GEMMs alone, and the all-to-alls alone (there and
// back). d = 1 can at best reach their sum; overlapped chunks can at best reach the larger.
// r = 0 (weights gathered, tokens stay) is timed beside them. Then the tuner (r, a and d "auto")
// measures the candidates and reports its choice. Returns an exit code.
int run_ep_bench(const EpBenchOptions& options);

}  // namespace tutel::bench
