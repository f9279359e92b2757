// tutel-layer end to end: the real binary run on files in a temporary directory, its outputs
// compared with the float64 reference (reference_moe.hpp).
//
// Tolerances (|got − ref| <= atol·max|ref| + rtol·|ref|), as in tests/kernels/cpu_layer_test:
//   y:         rtol 1e-4, atol 1e-5   (f32 sums of at most a few hundred products)
//   gradients: rtol 1e-3, atol 1e-4   (sums over every token, with cancellation)
//   l_aux:     1e-5 relative
// capacity and dropped must match exactly. Inputs are redrawn until no routing decision (top-k,
// batch priority) and no relu input is within 1e-6 of a tie, where f32 and f64 may disagree.
#include <gtest/gtest.h>

#include <filesystem>

#include <cmath>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "layer_test_util.hpp"
#include "reference_moe.hpp"
#include "tool_test_util.hpp"
#include "tutel/core/safetensors.hpp"

namespace tutel::testing {
namespace {

// ---------------------------------------------------------------------------------------------
// Agreement with the reference.

struct Case {
  std::string name;
  int64_t E = 4, M = 16, H = 24, O = 16, S = 40;
  int k = 2;
  double capacity_factor = 1.0;
  Activation activation = Activation::kRelu;
  bool normalize_gate = true, batch_prioritized = false;
  bool has_fc1_bias = true, has_fc2_bias = true;
  bool backward = true;
  bool with_dl_aux = true;        // else the tool's default, 0
  // The dtype of the weights and inputs in the files: f64 holds the drawn values as they are,
  // f32 and bf16 rounded (the tool, and so the reference, sees what the file holds).
  DType file_dtype = DType::kF32;
  std::string prefix;             // in front of every parameter name
  std::vector<std::string> args;  // beyond --weights/--input/--output
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

ref::Config config_of(const Case& c) {
  ref::Config cfg{c.S, c.M, c.H, c.O, c.E, c.k};
  cfg.capacity_factor = c.capacity_factor;
  cfg.activation = to_ref(c.activation);
  cfg.normalize_gate = c.normalize_gate;
  cfg.batch_prioritized = c.batch_prioritized;
  cfg.has_fc1_bias = c.has_fc1_bias;
  cfg.has_fc2_bias = c.has_fc2_bias;
  return cfg;
}

struct Drawn {
  ref::Params raw, rounded;  // raw goes to f64 files; the tool (and so the reference) sees rounded
  std::vector<double> x_raw, x, dy_raw, dy;
  double dl_aux = 0.0;
  ref::Forward want;
};

// What the tool reads from a file of `dtype` holding `v`: FileTensor::of's rounding, then f32.
std::vector<double> as_read(const std::vector<double>& v, DType dtype) {
  if (dtype != DType::kBF16) return round_f32(v);
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = bf16_to_f32(f32_to_bf16(static_cast<float>(v[i])));
  return out;
}

ref::Params rounded(const ref::Params& p, DType dtype) {
  return {as_read(p.wg, dtype), as_read(p.fc1_w, dtype), as_read(p.fc1_b, dtype),
          as_read(p.fc2_w, dtype), as_read(p.fc2_b, dtype)};
}

std::optional<Drawn> draw(std::mt19937_64& rng, const Case& c) {
  const ref::Config cfg = config_of(c);
  for (int attempt = 0; attempt < 200; ++attempt) {
    Drawn d;
    d.raw.wg = randn(rng, c.E * c.M, 1.0 / std::sqrt(double(c.M)));
    d.raw.fc1_w = randn(rng, c.E * c.H * c.M, 1.0 / std::sqrt(double(c.M)));
    d.raw.fc2_w = randn(rng, c.E * c.H * c.O, 1.0 / std::sqrt(double(c.H)));
    if (c.has_fc1_bias) d.raw.fc1_b = randn(rng, c.E * c.H, 0.1);
    if (c.has_fc2_bias) d.raw.fc2_b = randn(rng, c.E * c.O, 0.1);
    d.rounded = rounded(d.raw, c.file_dtype);
    d.x_raw = randn(rng, c.S * c.M, 1.0);
    d.x = as_read(d.x_raw, c.file_dtype);
    d.dy_raw = randn(rng, c.S * c.O, 1.0);
    d.dy = as_read(d.dy_raw, c.file_dtype);
    if (c.with_dl_aux)
      d.dl_aux = as_read({std::uniform_real_distribution<double>(0.1, 2.0)(rng)}, c.file_dtype)[0];
    d.want = ref::forward(cfg, d.rounded, d.x, nullptr);
    const bool ties = d.want.min_order_margin < 1e-6 ||
                      (c.batch_prioritized && d.want.min_priority_margin < 1e-6) ||
                      (c.activation == Activation::kRelu && d.want.min_abs_pre < 1e-6);
    if (!ties) return d;
  }
  return std::nullopt;
}

TensorList weight_tensors(const Case& c, const ref::Params& p, DType dtype) {
  TensorList w{
      FileTensor::of(c.prefix + kGateWeightName, {c.E, c.M}, p.wg, dtype),
      FileTensor::of(c.prefix + kFc1WeightName, {c.E, c.H, c.M}, p.fc1_w, dtype),
      FileTensor::of(c.prefix + kFc2WeightName, {c.E, c.H, c.O}, p.fc2_w, dtype),
  };
  if (c.has_fc1_bias)
    w.push_back(FileTensor::of(c.prefix + kFc1BiasName, {c.E, c.H}, p.fc1_b, dtype));
  if (c.has_fc2_bias)
    w.push_back(FileTensor::of(c.prefix + kFc2BiasName, {c.E, c.O}, p.fc2_b, dtype));
  return w;
}

class TutelLayerAgainstReference : public ::testing::TestWithParam<Case> {};

TEST_P(TutelLayerAgainstReference, OutputsAndGradientsMatch) {
  const Case& c = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const std::optional<Drawn> drawn = draw(rng, c);
  ASSERT_TRUE(drawn.has_value()) << "could not draw inputs without near-ties";
  const Drawn& d = *drawn;

  TempDir dir;
  // The files hold the drawn values; FileTensor::of rounds them to the file's dtype.
  const DType dtype = c.file_dtype;
  TensorList weights = weight_tensors(c, d.raw, dtype);
  if (!c.prefix.empty())
    weights.push_back(FileTensor::of(c.prefix + "experts.local_buffer", {2}, {1, 2}));
  TensorList input{FileTensor::of("x", {c.S, c.M}, d.x_raw, dtype)};
  if (c.backward) {
    input.push_back(FileTensor::of("dy", {c.S, c.O}, d.dy_raw, dtype));
    if (c.with_dl_aux) input.push_back(FileTensor::of("dl_aux", {1}, {d.dl_aux}, dtype));
  }
  write_file(dir.file("w.safetensors"), weights);
  write_file(dir.file("i.safetensors"), input);

  std::vector<std::string> args{"--weights", dir.file("w.safetensors"),
                                "--input",   dir.file("i.safetensors"),
                                "--output",  dir.file("o.safetensors")};
  args.insert(args.end(), c.args.begin(), c.args.end());
  if (c.backward) args.push_back("--backward");
  const ToolRun run = run_tool(dir, args);
  ASSERT_EQ(run.exit_code, 0) << run.err;
  if (c.prefix.empty()) {
    EXPECT_EQ(run.err, "") << "a clean run prints nothing";
  } else {
    EXPECT_NE(run.err.find("prefix '" + c.prefix + "'"), std::string::npos) << run.err;
    EXPECT_NE(run.err.find(c.prefix + "experts.local_buffer"), std::string::npos) << run.err;
  }

  auto out = SafetensorsFile::open(dir.file("o.safetensors"));
  ASSERT_TRUE(out.ok()) << out.status();
  const ref::Forward& want = d.want;
  EXPECT_EQ(read_i64(*out, "capacity"), want.capacity);
  EXPECT_EQ(read_i64(*out, "dropped"), want.dropped);
  const std::vector<float> l_aux = read_f32(*out, "l_aux");
  ASSERT_EQ(l_aux.size(), 1u);
  EXPECT_NEAR(l_aux[0], want.l_aux, 1e-5 * std::max(1.0, std::abs(want.l_aux)));
  EXPECT_TRUE(all_close("y", read_f32(*out, "y"), want.y, 1e-4, 1e-5));
  EXPECT_EQ(out->find("y")->shape, (Shape{c.S, c.O}));

  if (!c.backward) {
    EXPECT_EQ(out->find("dx"), nullptr);
    EXPECT_EQ(out->tensors().size(), 4u);
    return;
  }
  const ref::Grads g = ref::backward(config_of(c), d.rounded, d.x, nullptr, d.dy, d.dl_aux);
  const double rtol = 1e-3, atol = 1e-4;
  EXPECT_TRUE(all_close("dx", read_f32(*out, "dx"), g.dx, rtol, atol));
  const std::string grad = "grad." + c.prefix;
  EXPECT_TRUE(all_close("d_wg", read_f32(*out, grad + kGateWeightName), g.d_wg, rtol, atol));
  EXPECT_TRUE(all_close("d_fc1_w", read_f32(*out, grad + kFc1WeightName), g.d_fc1_w, rtol, atol));
  EXPECT_TRUE(all_close("d_fc2_w", read_f32(*out, grad + kFc2WeightName), g.d_fc2_w, rtol, atol));
  if (c.has_fc1_bias) {
    EXPECT_TRUE(all_close("d_fc1_b", read_f32(*out, grad + kFc1BiasName), g.d_fc1_b, rtol, atol));
  }
  if (c.has_fc2_bias) {
    EXPECT_TRUE(all_close("d_fc2_b", read_f32(*out, grad + kFc2BiasName), g.d_fc2_b, rtol, atol));
  }
  const size_t params = 3 + c.has_fc1_bias + c.has_fc2_bias;
  EXPECT_EQ(out->tensors().size(), 5 + params)
      << "y, l_aux, capacity, dropped, dx and one grad per parameter";
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(std::move(c)); };
  add({.name = "DefaultsForwardOnly", .backward = false});
  add({.name = "Defaults", .args = {"--threads", "2"}});
  add({.name = "NoBiases",
       .has_fc1_bias = false,
       .has_fc2_bias = false,
       .args = {"--threads", "2"}});
  add({.name = "OnlyFc1BiasOutputDimDiffers",
       .O = 12,
       .has_fc2_bias = false,
       .args = {"--threads", "1"}});
  add({.name = "OnlyFc2Bias", .has_fc1_bias = false, .args = {"--threads", "2"}});
  add({.name = "TopOneWithoutDlAux", .k = 1, .with_dl_aux = false, .args = {"--k", "1"}});
  add({.name = "Dropless",
       .E = 6,
       .S = 70,
       .capacity_factor = 0.0,
       .args = {"--capacity-factor", "0"}});
  add({.name = "DroplessCapped",
       .E = 6,
       .S = 70,
       .capacity_factor = -0.6,
       .args = {"--capacity-factor", "-0.6"}});
  add({.name = "CapacityOverflow",
       .S = 96,
       .capacity_factor = 0.5,
       .args = {"--capacity-factor=0.5"}});
  add({.name = "Gelu", .activation = Activation::kGelu, .args = {"--activation", "gelu"}});
  add({.name = "SiluTopThree",
       .k = 3,
       .activation = Activation::kSilu,
       .args = {"--activation", "silu", "--k", "3"}});
  add({.name = "BatchPrioritized",
       .S = 96,
       .capacity_factor = 0.5,
       .batch_prioritized = true,
       .args = {"--batch-prioritized", "--capacity-factor", "0.5"}});
  add({.name = "NoGateNormalization", .normalize_gate = false, .args = {"--no-normalize-gate"}});
  add({.name = "F64Files", .file_dtype = DType::kF64});
  add({.name = "Bf16Files", .file_dtype = DType::kBF16});
  add({.name = "F64FilesNoBiasesGelu",
       .activation = Activation::kGelu,
       .has_fc1_bias = false,
       .has_fc2_bias = false,
       .file_dtype = DType::kF64,
       .args = {"--activation", "gelu"}});
  add({.name = "StateDictPrefix", .prefix = "layers.3.moe."});
  add({.name = "StateDictPrefixBf16", .file_dtype = DType::kBF16, .prefix = "layers.3.moe."});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Options, TutelLayerAgainstReference, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

// The README's "Running one layer in-process": the example writes its files into a directory it
// creates (it used to need one that existed), and tutel-layer runs on them.
TEST(TutelLayerReadme, TheExampleFilesRunThroughTutelLayer) {
  TempDir dir;
  const std::string out = dir.file("made/by/the/example");
  const ToolRun made = run_binary(dir, TUTEL_LAYER_EXAMPLE_BIN, {"--out", out});
  ASSERT_EQ(made.exit_code, 0) << made.err;
  const ToolRun ran = run_tool(dir, {"--weights", out + "/weights.safetensors", "--input", out + "/input.safetensors",
                                     "--output", out + "/out.safetensors", "--k", "2", "--capacity-factor", "1.0",
                                     "--backward"});
  ASSERT_EQ(ran.exit_code, 0) << ran.err;
  auto result = SafetensorsFile::open(out + "/out.safetensors");
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_NE(result->find("y"), nullptr);
}

// Sizes the example cannot make are refused before anything is allocated (the products
// overflowed, or asked for tens of GiB, and the tool aborted).
TEST(TutelLayerReadme, TheExampleRefusesSizesItCannotMake) {
  TempDir dir;
  const std::string out = dir.file("huge");
  const ToolRun over = run_binary(dir, TUTEL_LAYER_EXAMPLE_BIN,
                                  {"--out", out, "--experts", "4000000000", "--model-dim", "4000000000"});
  EXPECT_EQ(over.exit_code, 2) << over.err;
  EXPECT_NE(over.err.find("--experts 4000000000 is over"), std::string::npos) << over.err;
  const ToolRun large = run_binary(dir, TUTEL_LAYER_EXAMPLE_BIN,
                                   {"--out", out, "--experts", "100000", "--model-dim", "100000"});
  EXPECT_EQ(large.exit_code, 2) << large.err;
  EXPECT_NE(large.err.find("at most 16 GiB"), std::string::npos) << large.err;
  EXPECT_FALSE(std::filesystem::exists(out));
}

// The example's files for a small layer (E = 4, M = H = 8) and 4 tokens, in `out`.
void write_small_example(const TempDir& dir, const std::string& out) {
  const ToolRun made = run_binary(
      dir, TUTEL_LAYER_EXAMPLE_BIN, {"--out", out, "--experts", "4", "--model-dim", "8", "--hidden", "8", "--tokens", "4"});
  ASSERT_EQ(made.exit_code, 0) << made.err;
}

// Finite inputs that overflow f32 inside the layer: a non-finite output is refused, not written
// with exit 0 as if it were a result.
TEST(TutelLayerReadme, OutputsThatOverflowAreRefusedNotWritten) {
  TempDir dir;
  const std::string out = dir.file("example");
  ASSERT_NO_FATAL_FAILURE(write_small_example(dir, out));
  write_file(dir.file("big.safetensors"), {FileTensor::of("x", {4, 8}, std::vector<double>(32, 3e38))});
  const ToolRun ran = run_tool(dir, {"--weights", out + "/weights.safetensors", "--input", dir.file("big.safetensors"),
                                     "--output", dir.file("o.safetensors"), "--k", "2"});
  EXPECT_EQ(ran.exit_code, 2) << ran.err;
  EXPECT_NE(ran.err.find("not finite"), std::string::npos) << ran.err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("o.safetensors")));
}

// A file name may be any bytes; the output's metadata (UTF-8) names it with the bytes that are
// not UTF-8 escaped (the run used to fail only when it wrote its output).
TEST(TutelLayerMetadata, PathsThatAreNotUtf8AreEscaped) {
  TempDir dir;
  const std::string out = dir.file("example");
  ASSERT_NO_FATAL_FAILURE(write_small_example(dir, out));
  const std::string odd = dir.file("w\xff.safetensors");
  std::filesystem::copy_file(out + "/weights.safetensors", odd);
  const ToolRun ran = run_tool(dir, {"--weights", odd, "--input", out + "/input.safetensors", "--output",
                                     dir.file("o.safetensors"), "--k", "2"});
  ASSERT_EQ(ran.exit_code, 0) << ran.err;
  auto result = SafetensorsFile::open(dir.file("o.safetensors"));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->metadata().at("weights"), dir.file("w\\xff.safetensors"));
}

TEST(TutelLayerMetadata, RecordsTheOptionsUsed) {
  TempDir dir;
  std::mt19937_64 rng(7);
  Case c;
  const std::optional<Drawn> d = draw(rng, c);
  ASSERT_TRUE(d.has_value());
  write_file(dir.file("w.safetensors"), weight_tensors(c, d->rounded, DType::kF32));
  write_file(dir.file("i.safetensors"), {FileTensor::of("x", {c.S, c.M}, d->x)});
  const ToolRun run =
      run_tool(dir, {"--weights", dir.file("w.safetensors"), "--input", dir.file("i.safetensors"),
                     "--output", dir.file("o.safetensors"), "--capacity-factor", "1.25",
                     "--activation", "gelu", "--no-normalize-gate", "--k", "1"});
  ASSERT_EQ(run.exit_code, 0) << run.err;
  auto out = SafetensorsFile::open(dir.file("o.safetensors"));
  ASSERT_TRUE(out.ok()) << out.status();
  const std::map<std::string, std::string>& m = out->metadata();
  const std::map<std::string, std::string> expected{
      {"k", "1"},
      {"capacity_factor", "1.25"},
      {"activation", "gelu"},
      {"normalize_gate", "false"},
      {"batch_prioritized", "false"},
      {"backward", "false"},
      {"gate_noise", "0"},
      {"weights", dir.file("w.safetensors")},
      {"input", dir.file("i.safetensors")},
  };
  for (const auto& [key, value] : expected) {
    auto it = m.find(key);
    ASSERT_NE(it, m.end()) << "metadata has no '" << key << "'";
    EXPECT_EQ(it->second, value) << key;
  }
}

}  // namespace
}  // namespace tutel::testing
