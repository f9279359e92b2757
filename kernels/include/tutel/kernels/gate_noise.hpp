// The gate-noise generator shared by every backend: counter-based, so element i of draw
// (seed, counter) is the same number on CPU and GPU, whatever the thread layout.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TUTEL_HOST_DEVICE __host__ __device__
#else
#define TUTEL_HOST_DEVICE
#endif

namespace tutel {

TUTEL_HOST_DEVICE inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Standard normal for element `i` of draw (seed, counter): Box-Muller over one 64-bit hash.
TUTEL_HOST_DEVICE inline float gate_noise_at(uint64_t seed, uint64_t counter, uint64_t i) {
  const uint64_t h = splitmix64(splitmix64(seed ^ splitmix64(counter)) + (i >> 1));
  // Two uniforms in (0, 1]: 24-bit mantissas, offset by one ulp so log() stays finite.
  const float u1 = (static_cast<float>(h >> 40) + 1.0f) * (1.0f / 16777216.0f);
  const float u2 = (static_cast<float>((h >> 8) & 0xffffffu) + 1.0f) * (1.0f / 16777216.0f);
  const float r = sqrtf(-2.0f * logf(u1));
  const float theta = 6.283185307179586f * u2;
  return (i & 1) ? r * sinf(theta) : r * cosf(theta);
}

}  // namespace tutel
