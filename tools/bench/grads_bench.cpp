#include "grads_bench.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <thread>

#include "bench_util.hpp"
#include "tutel/kernels/backend.hpp"

namespace tutel::bench {

int run_grads_bench(const GradsBenchOptions& o) {
  const int threads = o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  auto backend = make_backend("cpu", BackendOptions{.threads = threads});
  if (!backend.ok()) {
    std::fprintf(stderr, "tutel-bench grads: %s\n", backend.status().to_string().c_str());
    return 1;
  }
  Backend& b = **backend;
  const size_t bytes = static_cast<size_t>(o.floats) * 4;
  auto src = b.allocate(bytes), dst = b.allocate(bytes), sum = b.allocate(4);
  if (!src.ok() || !dst.ok() || !sum.ok()) {
    std::fprintf(stderr, "tutel-bench grads: cannot allocate 2 x %zu bytes\n", bytes);
    return 1;
  }
  float* s = static_cast<float*>(src->data());
  char* d = static_cast<char*>(dst->data());
  // First touch by the threads that will read them, as the backend's own buffers are.
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < o.floats; ++i) {
    s[i] = static_cast<float>(i % 1021) * 1e-3f;
    reinterpret_cast<float*>(d)[i] = 0.f;
  }
  const TensorView grads(s, DType::kF32, {o.floats}, b.device()), total(sum->data(), DType::kF32, {1}, b.device());
  Status failed;
  auto note = [&](Status st) {
    if (failed.ok() && !st.ok()) failed = std::move(st);
  };
  const double norm_s = median_seconds(1, o.repeats, [&] {
    note(b.fill_zero(total));
    note(b.add_sum_squares(grads, total));
  });
  const double scale_s = median_seconds(1, o.repeats, [&] { note(b.scale(grads, 1.0f)); });
  // The ceiling: the same bytes copied by the same threads, each its own contiguous part.
  const double copy_s = median_seconds(1, o.repeats, [&] {
#pragma omp parallel num_threads(threads)
    {
      const size_t parts = static_cast<size_t>(omp_get_num_threads()), part = static_cast<size_t>(omp_get_thread_num());
      const size_t begin = bytes / parts * part, end = part + 1 == parts ? bytes : bytes / parts * (part + 1);
      std::memcpy(d + begin, reinterpret_cast<const char*>(s) + begin, end - begin);
    }
  });
  if (!failed.ok()) {
    std::fprintf(stderr, "tutel-bench grads: %s\n", failed.to_string().c_str());
    return 1;
  }
  const double gb = static_cast<double>(bytes) / 1e9;
  std::printf("grads: %lld floats (%.0f MB), %d threads, median of %d\n", static_cast<long long>(o.floats),
              gb * 1e3, threads, o.repeats);
  std::printf("  memcpy (ceiling)     %8.2f ms  %6.1f GB/s read, %6.1f GB/s read+write\n", copy_s * 1e3,
              gb / copy_s, 2 * gb / copy_s);
  std::printf("  add_sum_squares      %8.2f ms  %6.1f GB/s read              %.2f x the copy's time\n",
              norm_s * 1e3, gb / norm_s, norm_s / copy_s);
  std::printf("  scale (in place)     %8.2f ms  %6.1f GB/s read+write        %.2f x the copy's time\n",
              scale_s * 1e3, 2 * gb / scale_s, scale_s / copy_s);
  return 0;
}

}  // namespace tutel::bench
