#include "tutel/core/dtype.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ios>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace tutel {
namespace {

constexpr DType kAllDTypes[] = {DType::kF32, DType::kBF16, DType::kF16, DType::kF64,
                                DType::kI32, DType::kI64,  DType::kU8};

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

TEST(DTypeTest, Sizes) {
  EXPECT_EQ(dtype_size(DType::kF32), 4u);
  EXPECT_EQ(dtype_size(DType::kBF16), 2u);
  EXPECT_EQ(dtype_size(DType::kF16), 2u);
  EXPECT_EQ(dtype_size(DType::kF64), 8u);
  EXPECT_EQ(dtype_size(DType::kI32), 4u);
  EXPECT_EQ(dtype_size(DType::kI64), 8u);
  EXPECT_EQ(dtype_size(DType::kU8), 1u);
}

TEST(DTypeTest, NamesRoundTrip) {
  for (DType t : kAllDTypes) {
    SCOPED_TRACE(dtype_name(t));
    EXPECT_EQ(parse_dtype(dtype_name(t)), t);
    EXPECT_EQ(parse_safetensors_dtype(safetensors_dtype_name(t)), t);
  }
  EXPECT_EQ(dtype_name(DType::kBF16), "bf16");
  EXPECT_EQ(safetensors_dtype_name(DType::kBF16), "BF16");
  for (const char* bad : {"", "float", "f8", "F8_E4M3", "bool", "f32 "}) {
    SCOPED_TRACE(bad);
    EXPECT_FALSE(parse_dtype(bad).has_value());
    EXPECT_FALSE(parse_safetensors_dtype(bad).has_value());
  }
}

TEST(DTypeTest, IsFloating) {
  EXPECT_TRUE(is_floating(DType::kF32));
  EXPECT_TRUE(is_floating(DType::kBF16));
  EXPECT_TRUE(is_floating(DType::kF16));
  EXPECT_TRUE(is_floating(DType::kF64));
  EXPECT_FALSE(is_floating(DType::kI32));
  EXPECT_FALSE(is_floating(DType::kI64));
  EXPECT_FALSE(is_floating(DType::kU8));
}

// ---- f16, checked against the IEEE definition evaluated in double ----

bool f16_is_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

double f16_reference_value(uint16_t h) {
  const int e = (h >> 10) & 0x1f;
  const int m = h & 0x3ff;
  double v;
  if (e == 0)
    v = std::ldexp(static_cast<double>(m), -24);
  else if (e == 31)
    v = std::numeric_limits<double>::infinity();
  else
    v = std::ldexp(1.0 + m / 1024.0, e - 15);
  return (h & 0x8000u) ? -v : v;
}

// Positive halves from 0 up to the first value past the largest finite one: 0x7c00 stands
// for 2^16 here, the value rounding would reach with an unbounded exponent.
struct F16Table {
  std::vector<double> values;
  F16Table() {
    for (uint32_t h = 0; h < 0x7c00u; ++h) values.push_back(f16_reference_value(h));
    values.push_back(65536.0);
  }
};

uint16_t f16_reference_round(const F16Table& table, float x) {
  const uint16_t sign = std::signbit(x) ? 0x8000u : 0;
  const double a = std::fabs(static_cast<double>(x));
  const auto upper = std::upper_bound(table.values.begin(), table.values.end(), a);
  if (upper == table.values.end()) return sign | 0x7c00u;
  const auto hi = static_cast<uint16_t>(upper - table.values.begin());
  const auto lo = static_cast<uint16_t>(hi - 1);
  const double below = a - table.values[lo];
  const double above = table.values[hi] - a;
  uint16_t pick;
  if (below < above)
    pick = lo;
  else if (above < below)
    pick = hi;
  else
    pick = (lo % 2 == 0) ? lo : hi;
  return sign | pick;
}

TEST(F16Test, ToF32MatchesDefinitionForAllPatterns) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const auto h = static_cast<uint16_t>(i);
    const float f = f16_to_f32(h);
    if (f16_is_nan(h)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
      EXPECT_EQ(std::signbit(f), (h & 0x8000u) != 0) << std::hex << h;
    } else {
      ASSERT_EQ(static_cast<double>(f), f16_reference_value(h)) << std::hex << h;
      ASSERT_EQ(std::signbit(f), (h & 0x8000u) != 0) << std::hex << h;
    }
  }
}

TEST(F16Test, RoundTripsEveryPattern) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const auto h = static_cast<uint16_t>(i);
    const uint16_t back = f32_to_f16(f16_to_f32(h));
    if (f16_is_nan(h)) {
      EXPECT_TRUE(f16_is_nan(back)) << std::hex << h;
    } else {
      ASSERT_EQ(back, h) << std::hex << h;
    }
  }
}

// Every tie between neighbouring halves (exact in f32: a half has 11 significant bits), and
// the f32 values just either side of it.
TEST(F16Test, RoundsToNearestEvenAtEveryMidpoint) {
  const F16Table table;
  for (uint32_t lo = 0; lo < 0x7c00u; ++lo) {
    const uint32_t hi = lo + 1;
    const auto mid = static_cast<float>((table.values[lo] + table.values[hi]) / 2);
    ASSERT_EQ(static_cast<double>(mid), (table.values[lo] + table.values[hi]) / 2);
    const uint16_t even = (lo % 2 == 0) ? lo : hi;
    for (const uint16_t sign : {uint16_t{0}, uint16_t{0x8000}}) {
      const float s = sign ? -1.0f : 1.0f;
      ASSERT_EQ(f32_to_f16(s * mid), sign | even) << std::hex << lo;
      ASSERT_EQ(f32_to_f16(s * std::nextafter(mid, 0.0f)), sign | lo) << std::hex << lo;
      ASSERT_EQ(f32_to_f16(s * std::nextafter(mid, 1e30f)), sign | hi) << std::hex << lo;
    }
  }
}

TEST(F16Test, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f32_to_f16(0.0f), 0x0000u);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000u);
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00u);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xc000u);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bffu);
  EXPECT_EQ(f32_to_f16(65519.99f), 0x7bffu);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00u);
  EXPECT_EQ(f32_to_f16(1e10f), 0x7c00u);
  EXPECT_EQ(f32_to_f16(inf), 0x7c00u);
  EXPECT_EQ(f32_to_f16(-inf), 0xfc00u);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001u);  // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000u);  // tie with zero: even
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002u);  // tie between 1 and 2: even
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -26)), 0x0000u);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::denorm_min()), 0x0000u);
  EXPECT_TRUE(f16_is_nan(f32_to_f16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(f16_is_nan(f32_to_f16(float_of(0x7f800001u))));  // signalling NaN stays NaN
}

TEST(F16Test, RandomFloatsMatchReference) {
  const F16Table table;
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::uniform_int_distribution<uint32_t> any_bits;
  std::uniform_int_distribution<int> exponent(-27, 17);  // the f16 range and a little beyond
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  for (int i = 0; i < 200000; ++i) {
    float x;
    if (i % 2 == 0) {
      x = float_of(any_bits(rng));
      if (std::isnan(x)) continue;
    } else {
      x = std::ldexp(mantissa(rng), exponent(rng)) * (rng() % 2 ? 1.0f : -1.0f);
    }
    ASSERT_EQ(f32_to_f16(x), f16_reference_round(table, x)) << std::hexfloat << x;
  }
}

// ---- bf16: the top half of an f32, so the reference works on f32 neighbours ----

bool bf16_is_nan(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0; }

double bf16_reference_value(uint16_t h) {
  const int e = (h >> 7) & 0xff;
  const int m = h & 0x7f;
  double v;
  if (e == 0)
    v = std::ldexp(static_cast<double>(m), -133);
  else if (e == 255)
    v = std::numeric_limits<double>::infinity();
  else
    v = std::ldexp(1.0 + m / 128.0, e - 127);
  return (h & 0x8000u) ? -v : v;
}

// Round-to-nearest-even from the definition: the two bf16 magnitudes around |x|, compared
// in double (exact for these operands), ties to the even pattern; past the largest finite
// bf16 the upper neighbour is 2^128, which rounds to infinity.
uint16_t bf16_reference_round(float x) {
  const uint16_t sign = std::signbit(x) ? 0x8000u : 0;
  if (std::isinf(x)) return sign | 0x7f80u;
  const double a = std::fabs(static_cast<double>(x));
  const auto lo = static_cast<uint16_t>((bits_of(x) & 0x7fffffffu) >> 16);
  const auto hi = static_cast<uint16_t>(lo + 1);
  const double lo_value = bf16_reference_value(lo);
  const double hi_value = hi == 0x7f80u ? std::ldexp(1.0, 128) : bf16_reference_value(hi);
  const double below = a - lo_value;
  const double above = hi_value - a;
  uint16_t pick;
  if (below < above)
    pick = lo;
  else if (above < below)
    pick = hi;
  else
    pick = (lo % 2 == 0) ? lo : hi;
  return sign | pick;
}

TEST(BF16Test, ToF32MatchesDefinitionAndRoundTripsEveryPattern) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const auto h = static_cast<uint16_t>(i);
    const float f = bf16_to_f32(h);
    if (bf16_is_nan(h)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
      EXPECT_TRUE(bf16_is_nan(f32_to_bf16(f))) << std::hex << h;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), bf16_reference_value(h)) << std::hex << h;
    ASSERT_EQ(f32_to_bf16(f), h) << std::hex << h;
  }
}

TEST(BF16Test, HandPickedRounding) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80u);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000u);
  // bf16 keeps 7 fraction bits: around 1.0 its step is 2^-7, so 2^-8 is half a step.
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80u);  // tie, 0x3f80 even
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(3.0f, -8)), 0x3f82u);  // tie, 0x3f82 even
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -23)), 0x3f81u);
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8) - std::ldexp(1.0f, -23)), 0x3f80u);
  EXPECT_EQ(f32_to_bf16(-(1.0f + std::ldexp(3.0f, -8))), 0xbf82u);
  EXPECT_EQ(f32_to_bf16(3.140625f), 0x4049u);                          // exactly representable
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80u);  // rounds past the top
  EXPECT_EQ(f32_to_bf16(bf16_to_f32(0x7f7fu)), 0x7f7fu);               // largest finite bf16 stays
  EXPECT_EQ(f32_to_bf16(inf), 0x7f80u);
  EXPECT_EQ(f32_to_bf16(-inf), 0xff80u);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::denorm_min()), 0x0000u);
  EXPECT_EQ(f32_to_bf16(float_of(0x00008000u)), 0x0000u);  // subnormal tie: even
  EXPECT_EQ(f32_to_bf16(float_of(0x00018000u)), 0x0002u);  // subnormal tie: even
  const uint16_t nan = f32_to_bf16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(bf16_is_nan(nan));
  // A NaN whose payload sits only in the low 16 bits must not truncate to infinity.
  const uint16_t low_payload_nan = f32_to_bf16(float_of(0x7f800001u));
  EXPECT_TRUE(bf16_is_nan(low_payload_nan));
  EXPECT_TRUE(low_payload_nan & 0x40u);  // quiet
}

TEST(BF16Test, RandomFloatsMatchReference) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 500000; ++i) {
    uint32_t b = any_bits(rng);
    // Every eighth draw lands exactly on a tie, which uniform bits almost never hit.
    if (i % 8 == 0) b = (b & 0xffff0000u) | 0x8000u;
    const float x = float_of(b);
    if (std::isnan(x)) continue;
    ASSERT_EQ(f32_to_bf16(x), bf16_reference_round(x)) << std::hex << b;
  }
}

}  // namespace
}  // namespace tutel
