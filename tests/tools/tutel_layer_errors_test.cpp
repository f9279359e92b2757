// tutel-layer refuses every kind of bad input with exit code 2 and a message on stderr that
// names the file, tensor or option at fault, and writes no output.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "layer_test_util.hpp"
#include "tool_test_util.hpp"

namespace tutel::testing {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Refusals: exit code 2, and a message that names what is wrong.

class TutelLayerErrors : public ::testing::Test {
 protected:
  static constexpr int64_t E = 4, M = 8, H = 12, O = 8, S = 10;

  void SetUp() override {
    std::mt19937_64 rng(11);
    weights_ = {
        FileTensor::of(kGateWeightName, {E, M}, randn(rng, E * M, 0.3)),
        FileTensor::of(kFc1WeightName, {E, H, M}, randn(rng, E * H * M, 0.3)),
        FileTensor::of(kFc2WeightName, {E, H, O}, randn(rng, E * H * O, 0.3)),
        FileTensor::of(kFc1BiasName, {E, H}, randn(rng, E * H, 0.1)),
        FileTensor::of(kFc2BiasName, {E, O}, randn(rng, E * O, 0.1)),
    };
    input_ = {FileTensor::of("x", {S, M}, randn(rng, S * M, 1.0)),
              FileTensor::of("dy", {S, O}, randn(rng, S * O, 1.0)),
              FileTensor::of("dl_aux", {1}, {0.5})};
  }

  std::string w_path() const { return dir_.file("w.safetensors"); }
  std::string i_path() const { return dir_.file("i.safetensors"); }
  std::string o_path() const { return dir_.file("o.safetensors"); }

  // Writes the (edited) files, runs the tool with `extra` arguments and expects a refusal
  // whose message contains every one of `needles`; no output file may appear.
  void expect_refused(const std::vector<std::string>& extra,
                      const std::vector<std::string>& needles, bool write_files = true) {
    if (write_files) {
      write_file(w_path(), weights_);
      write_file(i_path(), input_);
    }
    std::vector<std::string> args{"--weights", w_path(), "--input", i_path(), "--output", o_path()};
    args.insert(args.end(), extra.begin(), extra.end());
    const ToolRun run = run_tool(dir_, args);
    EXPECT_EQ(run.exit_code, 2) << run.err;
    EXPECT_NE(run.err.find("error"), std::string::npos) << run.err;
    for (const std::string& n : needles)
      EXPECT_NE(run.err.find(n), std::string::npos) << "'" << n << "' in: " << run.err;
    EXPECT_FALSE(fs::exists(o_path())) << "a refused run wrote its output";
  }

  void replace(TensorList& list, FileTensor t) {
    auto it = find_tensor(list, t.name);
    ASSERT_NE(it, list.end()) << t.name;
    *it = std::move(t);
  }
  void remove(TensorList& list, const std::string& name) {
    auto it = find_tensor(list, name);
    ASSERT_NE(it, list.end()) << name;
    list.erase(it);
  }

  TempDir dir_;
  TensorList weights_, input_;
};

TEST_F(TutelLayerErrors, TheFixtureItselfRuns) {
  write_file(w_path(), weights_);
  write_file(i_path(), input_);
  const ToolRun run = run_tool(
      dir_, {"--weights", w_path(), "--input", i_path(), "--output", o_path(), "--backward"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
}

TEST_F(TutelLayerErrors, MissingWeightsFile) {
  write_file(i_path(), input_);
  const std::string missing = dir_.file("nope.safetensors");
  const ToolRun run =
      run_tool(dir_, {"--weights", missing, "--input", i_path(), "--output", o_path()});
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_NE(run.err.find(missing), std::string::npos) << run.err;
}

TEST_F(TutelLayerErrors, MissingInputFile) {
  write_file(w_path(), weights_);
  const std::string missing = dir_.file("nope.safetensors");
  const ToolRun run =
      run_tool(dir_, {"--weights", w_path(), "--input", missing, "--output", o_path()});
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_NE(run.err.find(missing), std::string::npos) << run.err;
}

// --output naming an input's file (its path, another spelling of it, a symbolic link to it) is
// refused before anything is written: the input stays as it was. A hard link is another entry:
// the output replaces that entry alone, and the input is untouched.
TEST_F(TutelLayerErrors, OutputNamingAnInputIsRefusedAndTheInputKept) {
  write_file(w_path(), weights_);
  write_file(i_path(), input_);
  const std::string sub = dir_.file("sub"), link = dir_.file("link.safetensors");
  fs::create_directory(sub);
  fs::create_symlink(i_path(), link);
  const auto input_before = fs::file_size(i_path()), weights_before = fs::file_size(w_path());
  for (const auto& [output, option] : std::vector<std::pair<std::string, std::string>>{
           {i_path(), "--input"}, {w_path(), "--weights"}, {sub + "/../w.safetensors", "--weights"},
           {link, "--input"}}) {
    const ToolRun run = run_tool(dir_, {"--weights", w_path(), "--input", i_path(), "--output", output});
    EXPECT_EQ(run.exit_code, 2) << run.err;
    EXPECT_NE(run.err.find("names the file " + option + " reads"), std::string::npos) << output << ": " << run.err;
    EXPECT_NE(run.err.find("choose another output path"), std::string::npos) << run.err;
  }
  EXPECT_EQ(fs::file_size(i_path()), input_before);
  EXPECT_EQ(fs::file_size(w_path()), weights_before);
  const std::string hard = dir_.file("hard.safetensors");
  fs::create_hard_link(i_path(), hard);
  ToolRun run = run_tool(dir_, {"--weights", w_path(), "--input", i_path(), "--output", hard});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(fs::file_size(i_path()), input_before) << "the input changed through its hard link";
  run = run_tool(dir_, {"--weights", w_path(), "--input", i_path(), "--output", o_path(), "--backward"});
  EXPECT_EQ(run.exit_code, 0) << "the inputs were damaged: " << run.err;
}

TEST_F(TutelLayerErrors, TruncatedWeightsFile) {
  write_file(w_path(), weights_);
  write_file(i_path(), input_);
  fs::resize_file(w_path(), fs::file_size(w_path()) - 100);
  expect_refused({}, {w_path()}, /*write_files=*/false);
}

TEST_F(TutelLayerErrors, CorruptInputFile) {
  write_file(w_path(), weights_);
  std::ofstream(i_path()) << "this is not a safetensors file, not even close";
  expect_refused({}, {i_path()}, /*write_files=*/false);
}

TEST_F(TutelLayerErrors, MissingParameter) {
  remove(weights_, kFc2WeightName);
  expect_refused({}, {kFc2WeightName, w_path()});
}

TEST_F(TutelLayerErrors, NoParametersAtAll) {
  weights_ = {FileTensor::of("something.else", {2}, {1, 2})};
  expect_refused({}, {kGateWeightName});
}

TEST_F(TutelLayerErrors, PrefixedParameterMissing) {
  for (FileTensor& t : weights_) t.name = "moe." + t.name;
  remove(weights_, std::string("moe.") + kFc1WeightName);
  expect_refused({}, {std::string("moe.") + kFc1WeightName});
}

TEST_F(TutelLayerErrors, SeveralLayersInOneFile) {
  TensorList two;
  for (const std::string prefix : {"layers.0.moe.", "layers.1.moe."})
    for (FileTensor t : weights_) {
      t.name = prefix + t.name;
      two.push_back(std::move(t));
    }
  weights_ = two;
  expect_refused({}, {"layers.0.moe.", "layers.1.moe."});
}

TEST_F(TutelLayerErrors, ExpertCountMismatch) {
  replace(weights_,
          FileTensor::of(kFc1WeightName, {E + 1, H, M}, std::vector<double>((E + 1) * H * M, 0.1)));
  expect_refused({}, {kFc1WeightName, kGateWeightName, "experts"});
}

TEST_F(TutelLayerErrors, ModelDimMismatch) {
  replace(weights_,
          FileTensor::of(kFc1WeightName, {E, H, M + 2}, std::vector<double>(E * H * (M + 2), 0.1)));
  expect_refused({}, {kFc1WeightName, kGateWeightName});
}

TEST_F(TutelLayerErrors, HiddenMismatch) {
  replace(weights_,
          FileTensor::of(kFc2WeightName, {E, H + 1, O}, std::vector<double>(E * (H + 1) * O, 0.1)));
  expect_refused({}, {kFc2WeightName, kFc1WeightName});
}

TEST_F(TutelLayerErrors, BiasMismatch) {
  replace(weights_,
          FileTensor::of(kFc2BiasName, {E, O + 1}, std::vector<double>(E * (O + 1), 0.1)));
  expect_refused({}, {kFc2BiasName, kFc2WeightName});
}

TEST_F(TutelLayerErrors, WrongRank) {
  replace(weights_, FileTensor::of(kGateWeightName, {E * M}, std::vector<double>(E * M, 0.1)));
  expect_refused({}, {kGateWeightName, "[E, M]"});
}

TEST_F(TutelLayerErrors, IntegerWeight) {
  replace(weights_, FileTensor::of(kFc1WeightName, {E, H, M}, std::vector<double>(E * H * M, 1),
                                   DType::kI32));
  expect_refused({}, {kFc1WeightName, "i32", "f32, f64, bf16 or f16"});
}

TEST_F(TutelLayerErrors, IntegerInput) {
  replace(input_, FileTensor::of("x", {S, M}, std::vector<double>(S * M, 1), DType::kI32));
  expect_refused({}, {"'x'", "i32"});
}

TEST_F(TutelLayerErrors, NonFiniteInput) {
  std::vector<double> x(S * M, 0.5);
  x[17] = std::numeric_limits<double>::quiet_NaN();
  replace(input_, FileTensor::of("x", {S, M}, x));
  expect_refused({}, {"'x'", "element 17"});
}

TEST_F(TutelLayerErrors, F64OutOfF32Range) {
  std::vector<double> wg(E * M, 0.5);
  wg[3] = 1e300;
  replace(weights_, FileTensor::of(kGateWeightName, {E, M}, wg, DType::kF64));
  expect_refused({}, {kGateWeightName, "element 3"});
}

TEST_F(TutelLayerErrors, MissingX) {
  remove(input_, "x");
  expect_refused({}, {"'x'", i_path()});
}

TEST_F(TutelLayerErrors, XHasTheWrongWidth) {
  replace(input_, FileTensor::of("x", {S, M + 1}, std::vector<double>(S * (M + 1), 0.5)));
  expect_refused({}, {"'x'", "[10, 9]"});
}

TEST_F(TutelLayerErrors, MissingDyForBackward) {
  remove(input_, "dy");
  expect_refused({"--backward"}, {"'dy'", "--backward"});
}

TEST_F(TutelLayerErrors, DyHasTheWrongShape) {
  replace(input_, FileTensor::of("dy", {S + 1, O}, std::vector<double>((S + 1) * O, 0.5)));
  expect_refused({"--backward"}, {"'dy'", "[11, 8]"});
}

TEST_F(TutelLayerErrors, DlAuxHasTheWrongShape) {
  replace(input_, FileTensor::of("dl_aux", {2}, {0.5, 0.5}));
  expect_refused({"--backward"}, {"'dl_aux'"});
}

TEST_F(TutelLayerErrors, KBelowOne) { expect_refused({"--k", "0"}, {"--k 0"}); }

TEST_F(TutelLayerErrors, KAboveExperts) { expect_refused({"--k", "5"}, {"--k 5", "E = 4"}); }

TEST_F(TutelLayerErrors, KNotANumber) { expect_refused({"--k", "two"}, {"--k"}); }

TEST_F(TutelLayerErrors, UnknownActivation) { expect_refused({"--activation", "tanh"}, {"tanh"}); }

TEST_F(TutelLayerErrors, NegativeThreads) { expect_refused({"--threads", "-1"}, {"--threads"}); }

TEST_F(TutelLayerErrors, NanCapacityFactor) {
  expect_refused({"--capacity-factor", "nan"}, {"--capacity-factor"});
}

TEST_F(TutelLayerErrors, InfiniteCapacityFactor) {
  expect_refused({"--capacity-factor", "-inf"}, {"--capacity-factor"});
}

TEST_F(TutelLayerErrors, CapacityFactorTooLargeToAllocate) {
  expect_refused({"--capacity-factor", "1e300"}, {"capacity_factor"});
  expect_refused({"--capacity-factor", "-1e300"}, {"capacity_factor"});
}

TEST_F(TutelLayerErrors, UnknownOption) { expect_refused({"--frobnicate"}, {"--frobnicate"}); }

TEST_F(TutelLayerErrors, MissingRequiredOption) {
  write_file(w_path(), weights_);
  write_file(i_path(), input_);
  const ToolRun run = run_tool(dir_, {"--weights", w_path(), "--input", i_path()});
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_NE(run.err.find("--output"), std::string::npos) << run.err;
}

TEST_F(TutelLayerErrors, UnwritableOutput) {
  write_file(w_path(), weights_);
  write_file(i_path(), input_);
  const std::string out = dir_.file("no/such/dir/o.safetensors");
  const ToolRun run = run_tool(dir_, {"--weights", w_path(), "--input", i_path(), "--output", out});
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_NE(run.err.find(out), std::string::npos) << run.err;
}

TEST_F(TutelLayerErrors, IgnoredTensorsAreReportedNotRefused) {
  weights_.push_back(FileTensor::of("experts.some_buffer", {3}, {1, 2, 3}));
  input_.push_back(FileTensor::of("mask", {S}, std::vector<double>(S, 1)));
  write_file(w_path(), weights_);
  write_file(i_path(), input_);
  const ToolRun run =
      run_tool(dir_, {"--weights", w_path(), "--input", i_path(), "--output", o_path()});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_NE(run.err.find("experts.some_buffer"), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("mask"), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("dl_aux"), std::string::npos)
      << "dy and dl_aux are unused without --backward: " << run.err;
}

TEST_F(TutelLayerErrors, HelpSucceeds) {
  const ToolRun run = run_tool(dir_, {"--help"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_NE(slurp(dir_.file("stdout.txt")).find("--capacity-factor"), std::string::npos);
}

}  // namespace
}  // namespace tutel::testing
