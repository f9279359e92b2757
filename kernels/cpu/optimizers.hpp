// The CPU backend's optimizers (Backend::sgd_step, adamw_step), PyTorch's update rules, in one
// pass over memory that also refreshes the parameter's bf16 copy when there is one. They run on
// the calling thread's OpenMP team, whose size the backend sets; results never depend on it.
#pragma once

#include "tutel/kernels/backend.hpp"

namespace tutel::cpu {

Status sgd_step(const SgdArgs& a);
Status adamw_step(const AdamWArgs& a);

}  // namespace tutel::cpu
