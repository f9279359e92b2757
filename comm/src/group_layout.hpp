// How a sub-group's ranks sit on nodes, shared by the implementations' split().
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

namespace tutel::comm::detail {

// Ranks per node of a group whose members are world ranks (world rank w is on node
// w / world_local_size): the common run length when the members come node by node, in runs of
// equal length, each node once; 1 otherwise (2DH then degenerates to linear).
inline int derive_local_size(const std::vector<int>& members, int world_local_size) {
  auto node = [&](int w) { return w / world_local_size; };
  std::vector<int> seen;
  int run = 0;
  size_t start = 0;
  while (start < members.size()) {
    size_t end = start;
    while (end < members.size() && node(members[end]) == node(members[start])) ++end;
    const int len = static_cast<int>(end - start);
    if (run == 0) run = len;
    if (len != run || std::find(seen.begin(), seen.end(), node(members[start])) != seen.end())
      return 1;
    seen.push_back(node(members[start]));
    start = end;
  }
  return std::max(run, 1);
}

}  // namespace tutel::comm::detail
