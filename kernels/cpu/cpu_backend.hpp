// The CPU backend: oneDNN for every matmul, OpenMP for the rest, over both cores.
//
// The reductions written here run over fixed blocks of tokens combined in a fixed order, so they
// do not depend on the thread count. oneDNN's GEMMs are repeatable at one thread count, but may
// split a long summed dimension over the threads (decisions.md, "Determinism").
#pragma once

#include <memory>

#include "tutel/kernels/backend.hpp"

namespace tutel::cpu {

Result<std::unique_ptr<Backend>> make_cpu_backend(const BackendOptions& options);

}  // namespace tutel::cpu
