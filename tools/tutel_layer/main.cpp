// tutel-layer: runs one Tutel MoE layer on the CPU from safetensors files. Exit status 0 on
// success, 2 on any error (bad option, missing or malformed file or tensor).
#include <CLI/CLI.hpp>
#include <exception>
#include <iostream>

#include "layer_files.hpp"
#include "tutel/kernels/openmp_spin.hpp"

namespace {

constexpr int kExitError = 2;

constexpr const char* kDescription =
    "Runs one MoE layer with Tutel's semantics on the CPU.\n"
    "  weights: gates.0.wg.weight [E, M], experts.batched_fc1_w [E, H, M], experts.batched_fc2_w "
    "[E, H, O],\n"
    "           optional experts.batched_fc1_bias [E, H] and experts.batched_fc2_bias [E, O]\n"
    "           (a single common prefix such as 'layers.3.moe.' is accepted; other tensors are "
    "ignored)\n"
    "  input:   x [S, M]; with --backward also dy [S, O] and optionally dl_aux [1]\n"
    "  dtypes:  f32, f64, bf16 or f16 in both files (f64 rounded to f32; the layer computes in f32)\n"
    "  output:  y [S, O], l_aux [1], capacity [1] (i64), dropped [1] (i64);\n"
    "           with --backward also dx [S, M] and grad.<parameter name> for each parameter\n"
    "Gate noise is never applied.";

}  // namespace

int main(int argc, char** argv) {
  // It may execute itself again (tutel/kernels/openmp_spin.hpp).
  if (tutel::Status spin = tutel::bound_openmp_spin(argv); !spin.ok())
    std::cerr << "tutel-layer: warning: " << spin.message() << "\n";
  tutel::tools::LayerFilesRequest request;
  tutel::tools::LayerRunOptions& o = request.options;
  bool no_normalize_gate = false;

  CLI::App app{kDescription, "tutel-layer"};
  app.add_option("--weights", request.weights_path, "safetensors file with the layer's parameters")
      ->required();
  app.add_option("--input", request.input_path, "safetensors file with x (and dy, dl_aux)")
      ->required();
  app.add_option("--output", request.output_path, "safetensors file to write (atomically)")
      ->required();
  app.add_option("--k", o.k, "experts per token (top-k)")->capture_default_str();
  app.add_option("--capacity-factor", o.capacity_factor,
                 "> 0 fixed capacity, 0 dropless, < 0 dropless up to the limit -f")
      ->capture_default_str();
  app.add_option("--activation", o.activation, "relu, gelu or silu")->capture_default_str();
  app.add_flag("--no-normalize-gate", no_normalize_gate,
               "keep the top-k gate values as they are (k > 1)");
  app.add_flag("--batch-prioritized", o.batch_prioritized,
               "fill expert slots by decreasing top score");
  app.add_flag("--backward", o.backward, "also compute dx and the parameter gradients from dy");
  app.add_option("--threads", o.threads, "worker threads (0 = all cores)")->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success))
      return app.exit(e);  // --help
    std::cerr << "tutel-layer: error: " << e.what()
              << "\nRun 'tutel-layer --help' for the usage.\n";
    return kExitError;
  }
  o.normalize_gate = !no_normalize_gate;

  // Nothing here should throw; a failure that does (memory) still gets a message and the
  // tool's error status rather than an abort.
  try {
    const tutel::Status s = tutel::tools::run_layer_files(request, std::cerr);
    if (!s.ok()) {
      std::cerr << "tutel-layer: error: " << s.message() << "\n";
      return kExitError;
    }
  } catch (const std::exception& e) {
    std::cerr << "tutel-layer: error: " << e.what() << "\n";
    return kExitError;
  }
  return 0;
}
