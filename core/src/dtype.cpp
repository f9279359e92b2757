#include "tutel/core/dtype.hpp"

#include <cassert>
#include <cmath>

namespace tutel {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kF16: return 2;
    case DType::kF64: return 8;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    case DType::kU8: return 1;
  }
  assert(false && "unknown dtype");
  return 0;
}

namespace {
struct DTypeNames {
  DType type;
  std::string_view name;
  std::string_view safetensors;
};
constexpr DTypeNames kNames[] = {
    {DType::kF32, "f32", "F32"}, {DType::kBF16, "bf16", "BF16"}, {DType::kF16, "f16", "F16"},
    {DType::kF64, "f64", "F64"}, {DType::kI32, "i32", "I32"},    {DType::kI64, "i64", "I64"},
    {DType::kU8, "u8", "U8"},
};
}  // namespace

std::string_view dtype_name(DType t) {
  for (const auto& n : kNames)
    if (n.type == t) return n.name;
  return "?";
}

std::optional<DType> parse_dtype(std::string_view name) {
  for (const auto& n : kNames)
    if (n.name == name) return n.type;
  return std::nullopt;
}

std::string_view safetensors_dtype_name(DType t) {
  for (const auto& n : kNames)
    if (n.type == t) return n.safetensors;
  return "?";
}

std::optional<DType> parse_safetensors_dtype(std::string_view name) {
  for (const auto& n : kNames)
    if (n.safetensors == name) return n.type;
  return std::nullopt;
}

bool is_floating(DType t) {
  return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16 || t == DType::kF64;
}

uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u); // overflow -> inf
  if (abs < 0x38800000u) {                                              // subnormal or zero
    // Scale into the subnormal range with float arithmetic, which rounds to nearest even.
    float a;
    std::memcpy(&a, &abs, 4);
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(a * 16777216.0f));  // a / 2^-24
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t e = ((abs >> 23) - 112) << 10;
  uint32_t m = (abs >> 13) & 0x3ffu;
  uint32_t h = e | m;
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  float out;
  if (e == 0) {
    out = std::ldexp(static_cast<float>(m), -24);
    if (sign) out = -out;
    return out;
  }
  uint32_t bits;
  if (e == 31) bits = sign | 0x7f800000u | (m << 13);
  else bits = sign | ((e + 112) << 23) | (m << 13);
  std::memcpy(&out, &bits, 4);
  return out;
}

}  // namespace tutel
