// tutel-layer-example: writes a random layer in Tutel's state-dict layout and matching inputs,
// so tutel-layer (and users converting checkpoints) have files to start from.
//   weights.safetensors: gates.0.wg.weight, experts.batched_fc1_w/_bias, experts.batched_fc2_w/_bias
//   input.safetensors:   x [S, M], dy [S, M], dl_aux [1]
#include <CLI/CLI.hpp>

#include <cmath>
#include <filesystem>
#include <iostream>
#include <random>
#include <vector>

#include "tutel/core/safetensors.hpp"
#include "tutel/kernels/moe_layer.hpp"

namespace {

std::vector<float> randn(std::mt19937_64& rng, int64_t n, double scale) {
  std::normal_distribution<float> d(0.f, static_cast<float>(scale));
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::string out_dir;
  int64_t E = 8, M = 256, H = 512, S = 512;
  uint64_t seed = 1;
  CLI::App app{"Writes a random Tutel-layout MoE layer and inputs", "tutel-layer-example"};
  app.add_option("--out", out_dir, "directory to write weights.safetensors and input.safetensors")->required();
  app.add_option("--experts", E, "E")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--model-dim", M, "M")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--hidden", H, "H")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--tokens", S, "S")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--seed", seed, "random seed")->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::cerr << "tutel-layer-example: error: " << e.what() << "\n";
    return 2;
  }

  // Each dimension within what a layer spec takes, and the files within reason: the products
  // below would overflow, or allocate tens of GiB on a shared machine, before anything failed.
  constexpr int64_t kMaxDim = int64_t{1} << 24;
  constexpr double kMaxBytes = 16.0 * (1ull << 30);
  for (const auto& [name, v] : {std::pair{"--experts", E}, {"--model-dim", M}, {"--hidden", H}, {"--tokens", S}})
    if (v > kMaxDim) {
      std::cerr << "tutel-layer-example: error: " << name << " " << v << " is over " << kMaxDim << "\n";
      return 2;
    }
  const double bytes = 4.0 * (double(E) * M + 2.0 * double(E) * H * M + double(E) * H + double(E) * M + 2.0 * double(S) * M);
  if (bytes > kMaxBytes) {
    std::cerr << "tutel-layer-example: error: the files would hold " << bytes / double(1ull << 30)
              << " GiB (at most 16 GiB): lower --experts, --model-dim, --hidden or --tokens\n";
    return 2;
  }

  std::mt19937_64 rng(seed);
  const auto wg = randn(rng, E * M, 1.0 / std::sqrt(double(M)));
  const auto w1 = randn(rng, E * H * M, 1.0 / std::sqrt(double(M)));
  const auto b1 = randn(rng, E * H, 0.1);
  const auto w2 = randn(rng, E * H * M, 1.0 / std::sqrt(double(H)));
  const auto b2 = randn(rng, E * M, 0.1);
  const auto x = randn(rng, S * M, 1.0);
  const auto dy = randn(rng, S * M, 1.0);
  const float dl_aux = 0.01f;
  using tutel::DType;
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) {
    std::cerr << "tutel-layer-example: cannot create " << out_dir << ": " << ec.message() << "\n";
    return 2;
  }
  tutel::Status st = tutel::write_safetensors(
      out_dir + "/weights.safetensors",
      {{tutel::kGateWeightName, DType::kF32, {E, M}, wg.data()},
       {tutel::kFc1WeightName, DType::kF32, {E, H, M}, w1.data()},
       {tutel::kFc1BiasName, DType::kF32, {E, H}, b1.data()},
       {tutel::kFc2WeightName, DType::kF32, {E, H, M}, w2.data()},
       {tutel::kFc2BiasName, DType::kF32, {E, M}, b2.data()}});
  if (st.ok())
    st = tutel::write_safetensors(out_dir + "/input.safetensors",
                                  {{"x", DType::kF32, {S, M}, x.data()},
                                   {"dy", DType::kF32, {S, M}, dy.data()},
                                   {"dl_aux", DType::kF32, {1}, &dl_aux}});
  if (!st.ok()) {
    std::cerr << "tutel-layer-example: " << st << "\n";
    return 2;
  }
  std::cout << "wrote " << out_dir << "/weights.safetensors (E=" << E << " M=" << M << " H=" << H
            << ") and input.safetensors (S=" << S << ")\n";
  return 0;
}
