// The tuner record a group layer's checkpoint carries (tuning_record.hpp): it reads back what it
// wrote, refuses every malformed record with what is wrong, and gives decisions back only to a
// rank on the same hardware with the same candidates.
#include "tuning_record.hpp"

#include <gtest/gtest.h>

#include <functional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace tutel::daemon {
namespace {

using graphs::ExchangeConfig;
using graphs::TunerDecision;
using nlohmann::json;

const std::vector<ExchangeConfig> kCandidates = {
    graphs::kDataParallel, {comm::AllToAllAlgo::kLinear, 1, 1}, {comm::AllToAllAlgo::kLinear, 2, 1}};
const char* kMachine = "cpu: 2 threads, Test Processor @ 1.00GHz";

// Random decisions for distinct buckets, each with one candidate left at least.
std::vector<TunerDecision> random_decisions(std::mt19937_64& rng, size_t count) {
  std::vector<TunerDecision> out;
  std::vector<int64_t> buckets;
  for (int64_t b = 1; b <= graphs::TunerOptions::kMaxBucket; b *= 2) buckets.push_back(b);
  std::shuffle(buckets.begin(), buckets.end(), rng);
  for (size_t i = 0; i < count; ++i) {
    TunerDecision d;
    d.capacity_bucket = buckets[i];
    for (size_t c = 0; c < kCandidates.size(); ++c) {
      d.total_ns.push_back(static_cast<int64_t>(rng() >> 1));  // the whole int64 range
      d.excluded.push_back(rng() % 3 == 0);
    }
    d.chosen = rng() % kCandidates.size();
    d.excluded[d.chosen] = false;
    out.push_back(std::move(d));
  }
  return out;
}

TuningRecord record_of(std::vector<TunerDecision> decisions) {
  TuningRecord r;
  r.measured_on = kMachine;
  for (const ExchangeConfig& c : kCandidates) r.candidates.push_back(c.to_string());
  r.decisions = std::move(decisions);
  return r;
}

TEST(TuningRecord, ReadsBackWhatItWrote) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (size_t count : {size_t{0}, size_t{1}, size_t{41}}) {
    SCOPED_TRACE(std::to_string(count) + " decisions");
    const TuningRecord written = record_of(random_decisions(rng, count));
    const std::string text = format_tuning_record(written);
    EXPECT_LE(text.size(), kMaxTuningRecordBytes);
    Result<TuningRecord> read = parse_tuning_record(text, "file.safetensors");
    ASSERT_TRUE(read.ok()) << read.status() << "\n" << text;
    EXPECT_EQ(read->measured_on, written.measured_on);
    EXPECT_EQ(read->candidates, written.candidates);
    EXPECT_EQ(read->decisions, written.decisions);
    Result<std::vector<TunerDecision>> restored = restorable_decisions(*read, kMachine, kCandidates);
    ASSERT_TRUE(restored.ok()) << restored.status();
    EXPECT_EQ(*restored, written.decisions);
  }
}

// Every malformed record is refused as Corruption naming the file, the key and what is wrong.
TEST(TuningRecord, RefusesMalformedRecordsSayingWhatIsWrong) {
  const json good = json::parse(format_tuning_record(record_of({{16, 1, {30, 10, 20}, {false, false, true}}})));
  struct Bad {
    const char* name;
    std::function<std::string()> text;
    const char* says;
  };
  auto edited = [&](std::function<void(json&)> edit) {
    return [good, edit] {
      json j = good;
      edit(j);
      return j.dump();
    };
  };
  auto plain = [](std::string t) { return [t] { return t; }; };
  const std::vector<Bad> bad = {
      {"empty", plain(""), "is not JSON"},
      {"truncated", [&] { const std::string t = good.dump(); return t.substr(0, t.size() / 2); }, "is not JSON"},
      {"an array", plain("[1, 2]"), "is not a JSON object"},
      {"too long", [] { return std::string(kMaxTuningRecordBytes + 1, ' '); }, "more than a tuner record's"},
      {"unknown key", edited([](json& j) { j["extra"] = 1; }), "unknown key 'extra'"},
      {"no version", edited([](json& j) { j.erase("version"); }), "has no 'version'"},
      {"no decisions", edited([](json& j) { j.erase("decisions"); }), "has no 'decisions'"},
      {"version 2", edited([](json& j) { j["version"] = 2; }), "is not of version 1"},
      {"version text", edited([](json& j) { j["version"] = "1"; }), "is not of version 1"},
      {"machine a number", edited([](json& j) { j["measured_on"] = 5; }), "'measured_on' is not a string"},
      {"machine too long", edited([](json& j) { j["measured_on"] = std::string(513, 'x'); }), "'measured_on' is not a string"},
      {"one candidate", edited([](json& j) { j["candidates"] = {"r=0"}; }), "'candidates' is not an array of 2 to 16"},
      {"17 candidates", edited([](json& j) { j["candidates"] = std::vector<std::string>(17, "r=0"); }), "'candidates' is not an array"},
      {"candidate a number", edited([](json& j) { j["candidates"][1] = 1; }), "other than a candidate's name"},
      {"decisions an object", edited([](json& j) { j["decisions"] = json::object(); }), "'decisions' is not an array"},
      {"65 decisions", edited([](json& j) { j["decisions"] = std::vector<json>(65, j["decisions"][0]); }), "at most 64"},
      {"decision a number", edited([](json& j) { j["decisions"][0] = 3; }), "decision 0 is not an object"},
      {"decision extra key", edited([](json& j) { j["decisions"][0]["x"] = 1; }), "decision 0 is not an object of exactly"},
      {"no chosen", edited([](json& j) { j["decisions"][0].erase("chosen"); }), "decision 0 is not an object of exactly"},
      {"bucket 0", edited([](json& j) { j["decisions"][0]["capacity_bucket"] = 0; }), "'capacity_bucket' is not an integer in [1, 2^40]"},
      {"bucket 2^41", edited([](json& j) { j["decisions"][0]["capacity_bucket"] = int64_t{1} << 41; }), "'capacity_bucket' is not"},
      {"bucket 1.5", edited([](json& j) { j["decisions"][0]["capacity_bucket"] = 1.5; }), "'capacity_bucket' is not"},
      {"chosen 3", edited([](json& j) { j["decisions"][0]["chosen"] = 3; }), "'chosen' is not the index of one of the 3"},
      {"chosen -1", edited([](json& j) { j["decisions"][0]["chosen"] = -1; }), "'chosen' is not the index"},
      {"chosen true", edited([](json& j) { j["decisions"][0]["chosen"] = true; }), "'chosen' is not the index"},
      {"two totals", edited([](json& j) { j["decisions"][0]["total_ns"] = {1, 2}; }), "'total_ns' is not an array of 3"},
      {"negative total", edited([](json& j) { j["decisions"][0]["total_ns"][1] = -5; }), "other than a count of nanoseconds"},
      {"total 2^64-1", edited([](json& j) { j["decisions"][0]["total_ns"][1] = UINT64_MAX; }), "other than a count of nanoseconds"},
      {"total a float", edited([](json& j) { j["decisions"][0]["total_ns"][1] = 1e3; }), "other than a count of nanoseconds"},
      {"excluded a number", edited([](json& j) { j["decisions"][0]["excluded"][0] = 0; }), "other than a boolean"},
      {"four exclusions", edited([](json& j) { j["decisions"][0]["excluded"].push_back(false); }), "'excluded' is not an array of 3"},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.name);
    const Result<TuningRecord> read = parse_tuning_record(b.text(), "state/t/moe.safetensors");
    ASSERT_FALSE(read.ok());
    EXPECT_EQ(read.status().code(), StatusCode::kCorruption);
    EXPECT_EQ(read.status().message().rfind("state/t/moe.safetensors: metadata 'tuteld.tuning' ", 0), 0u) << read.status();
    EXPECT_NE(read.status().message().find(b.says), std::string::npos) << read.status();
  }
}

// A record reads, but its decisions do not hold here: another machine, other candidates (fewer,
// or the same in another order), or decisions the tuner itself refuses.
TEST(TuningRecord, GivesDecisionsBackOnlyWhereTheyWereMeasured) {
  const TuningRecord record = record_of({{16, 1, {30, 10, 20}, {false, false, true}}});
  ASSERT_TRUE(restorable_decisions(record, kMachine, kCandidates).ok());
  const Result<std::vector<TunerDecision>> elsewhere =
      restorable_decisions(record, "cuda: NVIDIA H200, sm_90, 132 SMs", kCandidates);
  ASSERT_FALSE(elsewhere.ok());
  EXPECT_EQ(elsewhere.status().message(),
            std::string("they were measured on \"") + kMachine + "\", this rank runs on \"cuda: NVIDIA H200, sm_90, 132 SMs\"");
  std::vector<ExchangeConfig> reordered = kCandidates;
  std::swap(reordered[0], reordered[1]);
  const Result<std::vector<TunerDecision>> other = restorable_decisions(record, kMachine, reordered);
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().message(),
            "they chose among [r=0, r=1 a=linear d=1, r=1 a=linear d=2], this layer among "
            "[r=1 a=linear d=1, r=0, r=1 a=linear d=2]");
  const std::vector<ExchangeConfig> fewer(kCandidates.begin(), kCandidates.begin() + 2);
  EXPECT_FALSE(restorable_decisions(record, kMachine, fewer).ok());
  // Parsed fine, refused by the tuner: a bucket that is no power of two, the same bucket twice,
  // a chosen candidate the decision excludes.
  for (const auto& decisions : std::vector<std::vector<TunerDecision>>{
           {{12, 1, {30, 10, 20}, {false, false, false}}},
           {{16, 1, {30, 10, 20}, {false, false, false}}, {16, 0, {30, 10, 20}, {false, false, false}}},
           {{16, 2, {30, 10, 20}, {false, false, true}}}}) {
    const Result<TuningRecord> read = parse_tuning_record(format_tuning_record(record_of(decisions)), "f");
    ASSERT_TRUE(read.ok()) << read.status();
    const Result<std::vector<TunerDecision>> restored = restorable_decisions(*read, kMachine, kCandidates);
    EXPECT_EQ(restored.status().code(), StatusCode::kInvalidArgument) << restored.status();
  }
}

}  // namespace
}  // namespace tutel::daemon
