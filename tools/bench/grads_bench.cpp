#include "grads_bench.hpp"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cstdio>
#include <cstdint>
#include <thread>
#include <utility>

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
  auto src = b.allocate(bytes), sum = b.allocate(4);
  if (!src.ok() || !sum.ok()) {
    std::fprintf(stderr, "tutel-bench grads: cannot allocate %zu bytes\n", bytes);
    return 1;
  }
  float* s = static_cast<float*>(src->data());
  // First touch by the threads that will read them, as the backend's own buffers are.
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < o.floats; ++i) s[i] = static_cast<float>(i % 1021) * 1e-3f;
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
  // The ceilings, on the same threads, each its own contiguous part (whole cache lines): a read
  // of the same bytes (the norm only reads), and a rewrite of them in place (scale reads and
  // writes each byte where it is: a copy to a second buffer moved twice the cache lines, and
  // scale beat that "ceiling" at sizes that fit the caches).
  auto part_of = [&](size_t parts, size_t part) {
    const size_t lines = bytes / 64, begin = lines / parts * part * 64;
    return std::pair{begin, part + 1 == parts ? bytes : lines / parts * (part + 1) * 64};
  };
  uint64_t read_check = 0;
  const double read_s = median_seconds(1, o.repeats, [&] {
    uint64_t all = 0;
#pragma omp parallel num_threads(threads) reduction(^ : all)
    {
      const auto [begin, end] = part_of(static_cast<size_t>(omp_get_num_threads()), static_cast<size_t>(omp_get_thread_num()));
      const uint64_t* words = reinterpret_cast<const uint64_t*>(reinterpret_cast<const char*>(s) + begin);
      uint64_t x = 0;
#pragma omp simd reduction(^ : x)
      for (size_t i = 0; i < (end - begin) / 8; ++i) x ^= words[i];
      all ^= x;
    }
    read_check = all;  // used, so the reads stay
  });
  // Each float's bits XORed with a key the compiler cannot know is 0: every float read and written
  // back unchanged.
  volatile uint32_t zero_key = 0;
  const uint32_t key = zero_key;
  const double rewrite_s = median_seconds(1, o.repeats, [&] {
#pragma omp parallel num_threads(threads)
    {
      const auto [begin, end] = part_of(static_cast<size_t>(omp_get_num_threads()), static_cast<size_t>(omp_get_thread_num()));
      float* part = s + begin / sizeof(float);
#pragma omp simd
      for (size_t i = 0; i < (end - begin) / sizeof(float); ++i)
        part[i] = std::bit_cast<float>(std::bit_cast<uint32_t>(part[i]) ^ key);
    }
  });
  float norm_squares = 0;
  note(b.copy(&norm_squares, sum->data(), 4, CopyKind::kDeviceToHost));
  if (!failed.ok()) {
    std::fprintf(stderr, "tutel-bench grads: %s\n", failed.to_string().c_str());
    return 1;
  }
  const double gb = static_cast<double>(bytes) / 1e9;
  std::printf("grads: %lld floats (%.0f MB), %d threads, median of %d (sum of squares %.6g, read check %llx)\n",
              static_cast<long long>(o.floats), gb * 1e3, threads, o.repeats, double(norm_squares),
              static_cast<unsigned long long>(read_check));
  std::printf("  read (ceiling of the norm)    %8.2f ms  %6.1f GB/s read\n", read_s * 1e3, gb / read_s);
  std::printf("  add_sum_squares               %8.2f ms  %6.1f GB/s read         %.2f x the read's time\n",
              norm_s * 1e3, gb / norm_s, norm_s / read_s);
  std::printf("  rewrite (ceiling of scale)    %8.2f ms  %6.1f GB/s read+write   \n", rewrite_s * 1e3,
              2 * gb / rewrite_s);
  std::printf("  scale (in place)              %8.2f ms  %6.1f GB/s read+write   %.2f x the rewrite's time\n",
              scale_s * 1e3, 2 * gb / scale_s, scale_s / rewrite_s);
  return 0;
}

}  // namespace tutel::bench
