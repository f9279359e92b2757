// Where a layer's parameters are in a safetensors file: under Tutel's names as they are (a
// moe_layer's own state dict, tuteld's checkpoints), or under one prefix (a whole model's state
// dict, where the layer is "layers.3.moe.": "layers.3.moe.experts.batched_fc1_w").
#pragma once

#include <string>
#include <string_view>

#include "tutel/core/safetensors.hpp"
#include "tutel/core/status.hpp"

namespace tutel {

// The names of the optimizer state tuteld saves beside each parameter: this prefix, then the
// parameter's name (SGD's momentum and AdamW's exp_avg in state 0, AdamW's exp_avg_sq in 1).
inline constexpr std::string_view kOptimizerStatePrefixes[2] = {"optimizer.state0.", "optimizer.state1."};

// What a file of a layer's parameters holds, for messages.
inline constexpr std::string_view kLayerFileLayout =
    "Tutel's state-dict names: gates.0.wg.weight [E, M], experts.batched_fc1_w [E, H, M], "
    "experts.batched_fc2_w [E, H, O], and optionally experts.batched_fc1_bias [E, H] and "
    "experts.batched_fc2_bias [E, O]";

// The prefix in front of the layer's parameter names in `file`: "" when any of the three weight
// matrices is there under its own name (then all three must be), else the one "<something>."
// under which all three are. A layer's optimizer state ("<prefix>optimizer.state0.<name>") is
// no layer of its own. NotFound naming the file and the missing tensor where some but not
// all are there, or none at all; InvalidArgument listing the prefixes where the file holds
// several layers (a file of one layer's tensors is what a layer takes).
Result<std::string> find_layer_prefix(const SafetensorsFile& file);

}  // namespace tutel
