// Timing helpers for tutel-bench: medians of repeated runs, wall clock.
#pragma once

#include <algorithm>
#include <chrono>
#include <functional>
#include <vector>

namespace tutel::bench {

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Runs `fn` `warmup` times untimed, then `repeats` times; returns the median seconds.
inline double median_seconds(int warmup, int repeats, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    const double t0 = now_seconds();
    fn();
    t.push_back(now_seconds() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace tutel::bench
