#include "tutel/comm/communicator.hpp"

#include <string>

namespace tutel::comm {

std::string_view to_string(ReduceOp op) { return op == ReduceOp::kSum ? "sum" : "max"; }

std::string_view to_string(AllToAllAlgo algo) {
  return algo == AllToAllAlgo::kLinear ? "linear" : "2dh";
}

std::optional<AllToAllAlgo> parse_all_to_all_algo(std::string_view name) {
  std::string lower(name);
  for (char& c : lower)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  if (lower == "linear") return AllToAllAlgo::kLinear;
  if (lower == "2dh") return AllToAllAlgo::k2DH;
  return std::nullopt;
}

}  // namespace tutel::comm
