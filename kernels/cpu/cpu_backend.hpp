// The CPU backend: oneDNN for every matmul, OpenMP for the rest, over both cores.
//
// Reductions run over fixed blocks of tokens and are combined in a fixed order, so results do
// not depend on the thread count (oneDNN's f32 GEMMs split work without splitting K).
#pragma once

#include <memory>

#include "tutel/kernels/backend.hpp"

namespace tutel::cpu {

Result<std::unique_ptr<Backend>> make_cpu_backend(const BackendOptions& options);

}  // namespace tutel::cpu
