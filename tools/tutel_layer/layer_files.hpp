// The body of tutel-layer: one MoE layer run from safetensors files (weights in Tutel's
// state-dict names, inputs), with its outputs and gradients written to another.
//
// Every tensor read is copied into f32 host memory (f64 converted) and checked finite, so
// nothing downstream depends on the file's alignment or trusts its values. Every failure is a
// Status naming the file and tensor (or option) at fault; the tool turns it into exit code 2.
// Notes that are not failures (ignored tensors, a state-dict prefix) go to a caller's stream.
//
// Thread-safety: the functions are reentrant; the notes stream is the caller's to share.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "tutel/core/status.hpp"
#include "tutel/core/tensor.hpp"
#include "tutel/kernels/backend.hpp"
#include "tutel/kernels/moe_layer.hpp"

namespace tutel::tools {

// A tensor in f32 host memory, under the name it had (or will have) in a file.
struct HostTensor {
  std::string name;
  Shape shape;
  std::vector<float> data;
};

// A layer's parameters as found in a weights file. Names keep the file's prefix.
struct LayerFileWeights {
  std::string path;
  std::string prefix;  // "" or e.g. "layers.3.moe.", shared by every parameter
  int64_t experts = 0, model_dim = 0, hidden = 0, output_dim = 0;
  HostTensor gate_weight, fc1_weight, fc2_weight;
  std::optional<HostTensor> fc1_bias, fc2_bias;
};

// Reads the parameters (see the tool's --help for the layout). Tensors with other names are
// ignored with one warning line on `notes`; a prefix is reported there too.
Result<LayerFileWeights> read_layer_weights(const std::string& path, std::ostream& notes);

struct LayerFileInputs {
  std::string path;
  HostTensor x;                  // [S, M]
  std::optional<HostTensor> dy;  // [S, O], read only for backward
  float dl_aux = 0.f;
};

// Reads x (and for backward dy and the optional dl_aux), checked against the weights' shapes.
Result<LayerFileInputs> read_layer_inputs(const std::string& path, const LayerFileWeights& weights,
                                          bool backward, std::ostream& notes);

// The tool's options, unparsed where the tool parses them, so every check lives here.
struct LayerRunOptions {
  int k = 2;
  double capacity_factor = 1.0;
  std::string activation = "relu";
  bool normalize_gate = true;
  bool batch_prioritized = false;
  bool backward = false;
  int threads = 0;  // 0 = all cores
  std::string backend = "cpu";
};

// Checks what can be checked without the files; messages name the command-line option.
Status validate_options(const LayerRunOptions& options);

// The layer spec for these weights and options (k, capacity and the rest), checked against
// the weights (k > experts is an error naming --k and the file).
Result<LayerSpec> layer_spec_for(const LayerFileWeights& weights, const LayerRunOptions& options);

struct LayerRunResult {
  HostTensor y;  // [S, O]
  float l_aux = 0.f;
  int64_t capacity = 0, dropped = 0;
  std::optional<HostTensor> dx;   // [S, M], backward only
  std::vector<HostTensor> grads;  // "grad.<parameter name>", backward only
};

// Forward (a training forward when options.backward, without gate noise) and backward.
Result<LayerRunResult> run_layer(const LayerFileWeights& weights, const LayerFileInputs& inputs,
                                 const LayerRunOptions& options);

// The metadata written with the outputs: the options used, as strings.
std::map<std::string, std::string> output_metadata(const LayerFileWeights& weights,
                                                   const LayerFileInputs& inputs,
                                                   const LayerRunOptions& options);

// Writes y, l_aux, capacity, dropped (and dx, grad.*) atomically.
Status write_layer_outputs(const std::string& path, const LayerRunResult& result,
                           const std::map<std::string, std::string>& metadata);

struct LayerFilesRequest {
  std::string weights_path, input_path, output_path;
  LayerRunOptions options;
};

// The whole tool from parsed arguments: validate, read, run, write.
Status run_layer_files(const LayerFilesRequest& request, std::ostream& notes);

}  // namespace tutel::tools
