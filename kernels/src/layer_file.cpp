#include "tutel/kernels/layer_file.hpp"

#include <optional>
#include <set>
#include <vector>

#include "tutel/core/logging.hpp"
#include "tutel/kernels/moe_layer.hpp"

namespace tutel {
namespace {

// A whole model's file can hold hundreds of layers: the message lists this many prefixes.
constexpr size_t kMaxListedPrefixes = 8;

// The file's path, which the caller chose (tensor names, read from the file, go through
// quote_text: escaped, cut short).
std::string quoted(std::string_view s) {
  std::string out(1, '\'');
  out += s;
  out += '\'';
  return out;
}

}  // namespace

Result<std::string> find_layer_prefix(const SafetensorsFile& file) {
  const std::string& path = file.path();
  const std::string_view required[] = {kGateWeightName, kFc1WeightName, kFc2WeightName};
  // The first of the three that `prefix` lacks, if any.
  auto absent_under = [&](const std::string& prefix) -> std::optional<std::string_view> {
    for (std::string_view r : required)
      if (!file.find(prefix + std::string(r))) return r;
    return std::nullopt;
  };
  auto incomplete = [&](const std::string& prefix, std::string_view absent) {
    for (std::string_view r : required)
      if (file.find(prefix + std::string(r)))
        return Status::NotFound("weights file " + quoted(path) + " has " + quote_text(prefix + std::string(r)) +
                                " but no tensor " + quote_text(prefix + std::string(absent)) + "; expected " +
                                std::string(kLayerFileLayout));
    return Status::Internal("no parameter found under prefix " + quote_text(prefix));
  };

  bool any_exact = false;
  for (std::string_view r : required) any_exact |= file.find(r) != nullptr;
  if (any_exact) {
    if (auto absent = absent_under("")) return incomplete("", *absent);
    return std::string();
  }
  std::set<std::string> candidates;
  auto is_optimizer_state = [](std::string_view prefix) {
    for (std::string_view s : kOptimizerStatePrefixes)
      if (prefix.ends_with(s)) return true;
    return false;
  };
  for (const SafetensorsTensor& t : file.tensors())
    for (std::string_view r : required)
      if (t.name.size() > r.size() + 1 && t.name.ends_with(r) && t.name[t.name.size() - r.size() - 1] == '.') {
        std::string prefix = t.name.substr(0, t.name.size() - r.size());
        if (!is_optimizer_state(prefix)) candidates.insert(std::move(prefix));
      }
  std::vector<std::string> complete;
  for (const std::string& p : candidates)
    if (!absent_under(p)) complete.push_back(p);
  if (complete.size() == 1) return complete.front();
  if (complete.size() > 1) {
    std::string listed;
    for (size_t i = 0; i < complete.size() && i < kMaxListedPrefixes; ++i)
      listed += (i ? ", " : "") + quote_text(complete[i]);
    if (complete.size() > kMaxListedPrefixes)
      listed += " and " + std::to_string(complete.size() - kMaxListedPrefixes) + " more";
    return Status::InvalidArgument("weights file " + quoted(path) + " holds the parameters of " +
                                   std::to_string(complete.size()) + " layers (prefixes " + listed +
                                   "); a layer takes one: save that layer's tensors to a file of their own");
  }
  if (!candidates.empty()) return incomplete(*candidates.begin(), *absent_under(*candidates.begin()));
  return Status::NotFound("weights file " + quoted(path) + " has no tensor " + quoted(kGateWeightName) +
                          " (nor one ending in ." + std::string(kGateWeightName) + "); expected " +
                          std::string(kLayerFileLayout));
}

}  // namespace tutel
