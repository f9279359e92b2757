// The CPU backend's small f32 ops (Backend::add, add_row_bias, add_column_sums): checked like
// every backend's (check_add, check_column_slice), then run on the calling thread's OpenMP team,
// whose size the backend sets. Results never depend on the thread count.
#pragma once

#include <cstdint>

#include "tutel/kernels/backend.hpp"

namespace tutel::cpu {

Status add(TensorView dst, TensorView src);
Status add_row_bias(TensorView out, TensorView bias, int64_t column);
// A running sum per column, starting from dst[c], over the rows in increasing order.
Status add_column_sums(TensorView src, int64_t column, TensorView dst);
Status add_sum_squares(TensorView src, TensorView dst);
Status scale(TensorView t, float factor);

}  // namespace tutel::cpu
