// find_layer_prefix: where a layer's tensors are in a file of its own, of a whole model, of
// several layers, or of none.
#include "tutel/kernels/layer_file.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "tutel/core/safetensors.hpp"
#include "tutel/kernels/moe_layer.hpp"

namespace tutel {
namespace {

class LayerFile : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/tutel-layer-file-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // A file holding one small f32 tensor for each name; the result of find_layer_prefix on it.
  Result<std::string> prefix_of(const std::vector<std::string>& names) {
    static const float values[2] = {1.f, 2.f};
    std::vector<SafetensorsEntry> entries;
    for (const std::string& n : names) entries.push_back({n, DType::kF32, Shape{2}, values});
    const std::string path = dir_ + "/w" + std::to_string(files_++) + ".safetensors";
    const Status written = write_safetensors(path, entries);
    EXPECT_TRUE(written.ok()) << written;
    Result<SafetensorsFile> file = SafetensorsFile::open(path);
    EXPECT_TRUE(file.ok()) << file.status();
    if (!file.ok()) return file.status();
    return find_layer_prefix(*file);
  }

  std::string dir_;
  int files_ = 0;
};

std::vector<std::string> layer(const std::string& prefix, bool biases = true) {
  std::vector<std::string> names = {prefix + kGateWeightName, prefix + kFc1WeightName, prefix + kFc2WeightName};
  if (biases) {
    names.push_back(prefix + kFc1BiasName);
    names.push_back(prefix + kFc2BiasName);
  }
  return names;
}

std::vector<std::string> operator+(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

TEST_F(LayerFile, TheNamesAsTheyAreNeedNoPrefix) {
  auto p = prefix_of(layer(""));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, "");
  // Without biases, and beside other tensors (a prefixed copy among them: the names as they are
  // come first).
  p = prefix_of(layer("", false) + layer("other.") + std::vector<std::string>{"step"});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, "");
}

TEST_F(LayerFile, AModelsStateDictHasTheLayerUnderOnePrefix) {
  auto p = prefix_of(layer("layers.3.moe.") + std::vector<std::string>{"layers.3.moe.experts.local_buffer",
                                                                       "embed.weight", "layers.3.attn.q.weight"});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, "layers.3.moe.");
  // Its optimizer state, as tuteld names it under the layer's prefix, is no second layer.
  p = prefix_of(layer("layers.3.moe.") + layer("layers.3.moe.optimizer.state0.") +
                layer("layers.3.moe.optimizer.state1."));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, "layers.3.moe.");
  // An incomplete second prefix does not make it ambiguous.
  p = prefix_of(layer("a.") + std::vector<std::string>{"b." + std::string(kGateWeightName)});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, "a.");
}

TEST_F(LayerFile, SeveralLayersAreListedNotGuessed) {
  auto p = prefix_of(layer("layers.0.moe.") + layer("layers.1.moe."));
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument) << p.status();
  EXPECT_TRUE(contains(p.status().message(), "2 layers") && contains(p.status().message(), "'layers.0.moe.'") &&
              contains(p.status().message(), "'layers.1.moe.'") && contains(p.status().message(), "a file of their own"))
      << p.status();
  // A whole model's worth: the first eight, and a count of the rest.
  std::vector<std::string> many;
  for (int i = 0; i < 11; ++i) many = many + layer("l" + std::to_string(i) + ".", false);
  p = prefix_of(many);
  ASSERT_FALSE(p.ok());
  EXPECT_TRUE(contains(p.status().message(), "11 layers") && contains(p.status().message(), "and 3 more") &&
              !contains(p.status().message(), "'l9.'"))
      << p.status();
}

TEST_F(LayerFile, AnIncompleteLayerNamesWhatItHasAndWhatIsMissing) {
  auto p = prefix_of({kGateWeightName, kFc2WeightName, std::string("x.") + kFc1WeightName});
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kNotFound) << p.status();
  EXPECT_TRUE(contains(p.status().message(), std::string("no tensor '") + kFc1WeightName + "'")) << p.status();
  p = prefix_of({std::string("moe.") + kGateWeightName, std::string("moe.") + kFc1WeightName});
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kNotFound) << p.status();
  EXPECT_TRUE(contains(p.status().message(), std::string("no tensor 'moe.") + kFc2WeightName + "'")) << p.status();
}

TEST_F(LayerFile, AFileWithoutTheLayerSaysWhatALayerFileHolds) {
  // A name that only ends in a parameter's name, not after a '.', is not one; optimizer state
  // alone is not the layer's parameters (its momentum was once taken for its weights).
  for (const std::vector<std::string>& names :
       {std::vector<std::string>{"something.else"},
        {std::string("x") + kGateWeightName, std::string("x") + kFc1WeightName, std::string("x") + kFc2WeightName},
        layer("optimizer.state0."), layer("optimizer.state0.") + layer("optimizer.state1."),
        layer("moe.optimizer.state1.")}) {
    auto p = prefix_of(names);
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.status().code(), StatusCode::kNotFound) << p.status();
    EXPECT_TRUE(contains(p.status().message(), "has no tensor 'gates.0.wg.weight'") &&
                contains(p.status().message(), "experts.batched_fc1_w [E, H, M]"))
        << p.status();
  }
}

}  // namespace
}  // namespace tutel
