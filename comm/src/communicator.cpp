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

GraphRelease::GraphRelease(Communicator& comm, std::function<void()> release)
    : comm_(&comm), id_(comm.add_graph_release(std::move(release))) {}

GraphRelease& GraphRelease::operator=(GraphRelease&& other) noexcept {
  if (this != &other) {
    reset();
    comm_ = std::exchange(other.comm_, nullptr);
    id_ = other.id_;
  }
  return *this;
}

void GraphRelease::reset() {
  if (comm_ != nullptr) std::exchange(comm_, nullptr)->remove_graph_release(id_);
}

}  // namespace tutel::comm
