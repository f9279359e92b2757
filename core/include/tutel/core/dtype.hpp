// Element types the layer and its files use. bf16/f16 are storage types here: CPU math
// widens them to f32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace tutel {

enum class DType : uint8_t { kF32, kBF16, kF16, kF64, kI32, kI64, kU8 };

// Bytes per element.
size_t dtype_size(DType t);
// Lower-case name used in specs and messages: "f32", "bf16", ...
std::string_view dtype_name(DType t);
// Parses "f32" | "bf16" | "f16" | "f64" | "i32" | "i64" | "u8".
std::optional<DType> parse_dtype(std::string_view name);
// The safetensors spelling: "F32", "BF16", "F16", "F64", "I32", "I64", "U8".
std::string_view safetensors_dtype_name(DType t);
std::optional<DType> parse_safetensors_dtype(std::string_view name);
bool is_floating(DType t);

// bf16 <-> f32 with round-to-nearest-even, NaN kept quiet.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
// IEEE half <-> f32.
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

}  // namespace tutel
