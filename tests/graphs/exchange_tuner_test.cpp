// The tuner's dictionary and schedule (exchange_tuner.hpp), without a group: "ranks" are several
// tuners fed different times, and the group's agreement is the MAX the layer would all-reduce.
#include "tutel/graphs/exchange_tuner.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <random>

namespace tutel::graphs {
namespace {

using comm::AllToAllAlgo;

}  // namespace
void PrintTo(const ExchangeConfig& c, std::ostream* os) { *os << c.to_string(); }
namespace {

TunerOptions three_candidates(int warmups, int trials) {
  TunerOptions o;
  o.candidates = {{AllToAllAlgo::kLinear, 1}, {AllToAllAlgo::kLinear, 2}, {AllToAllAlgo::k2DH, 1}};
  o.warmups = warmups;
  o.trials = trials;
  return o;
}

TEST(ExchangeTuner, RefusesOptionsItCannotRun) {
  TunerOptions none;
  EXPECT_EQ(ExchangeTuner::create(none).status().code(), StatusCode::kInvalidArgument);
  for (int d : {0, -1, kMaxPipeline + 1}) {
    TunerOptions o = three_candidates(1, 2);
    o.candidates[1].pipeline = d;
    auto t = ExchangeTuner::create(o);
    ASSERT_FALSE(t.ok()) << d;
    EXPECT_NE(t.status().message().find("pipeline degree"), std::string::npos) << t.status();
  }
  {
    TunerOptions o = three_candidates(1, 2);
    o.candidates[2].r = -1;
    auto t = ExchangeTuner::create(o);
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("r = -1 is negative"), std::string::npos) << t.status();
    // Whether an r >= 1 fits (it must divide the ranks per expert) is the layer's to check.
    o.candidates[2].r = 2;
    EXPECT_TRUE(ExchangeTuner::create(o).ok());
  }
  TunerOptions many;
  many.candidates.assign(TunerOptions::kMaxCandidates + 1, {});
  EXPECT_EQ(ExchangeTuner::create(many).status().code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(ExchangeTuner::create(three_candidates(1, 0)).ok());
  EXPECT_FALSE(ExchangeTuner::create(three_candidates(-1, 1)).ok());
  EXPECT_TRUE(ExchangeTuner::create(three_candidates(0, 1)).ok());
}

TEST(ExchangeTuner, BucketsArePowersOfTwo) {
  EXPECT_EQ(ExchangeTuner::bucket_for(0), 1);
  EXPECT_EQ(ExchangeTuner::bucket_for(1), 1);
  EXPECT_EQ(ExchangeTuner::bucket_for(2), 2);
  EXPECT_EQ(ExchangeTuner::bucket_for(3), 4);
  EXPECT_EQ(ExchangeTuner::bucket_for(128), 128);
  EXPECT_EQ(ExchangeTuner::bucket_for(129), 256);
}

// Round-robin over the candidates, the warm-up round uncounted, the last trial reported once;
// then the decision runs every time and nothing more is recorded.
TEST(ExchangeTuner, MeasuresEachCandidateInTurnThenKeepsTheFastest) {
  auto tuner = ExchangeTuner::create(three_candidates(/*warmups=*/1, /*trials=*/2));
  ASSERT_TRUE(tuner.ok()) << tuner.status();
  const int64_t bucket = 64;
  const int64_t warmup_ns[3] = {1, 1000000, 1};  // would make candidate 0 or 2 win if counted
  const int64_t trial_ns[3] = {500, 300, 400};
  for (int round = 0; round < 3; ++round)
    for (int c = 0; c < 3; ++c) {
      EXPECT_TRUE(tuner->measuring(bucket));
      EXPECT_EQ(tuner->next(bucket), tuner->candidates()[c]) << round << " " << c;
      const bool last = tuner->record(bucket, round == 0 ? warmup_ns[c] : trial_ns[c]);
      EXPECT_EQ(last, round == 2 && c == 2);
    }
  EXPECT_EQ(tuner->totals(bucket), (std::vector<int64_t>{1000, 600, 800}));
  ASSERT_TRUE(tuner->decide(bucket, tuner->totals(bucket)).ok());
  EXPECT_FALSE(tuner->measuring(bucket));
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(tuner->next(bucket), (ExchangeConfig{AllToAllAlgo::kLinear, 2}));
    EXPECT_FALSE(tuner->record(bucket, 1));
  }
  // Another bucket starts from scratch.
  EXPECT_TRUE(tuner->measuring(128));
  EXPECT_EQ(tuner->next(128), tuner->candidates()[0]);

  const std::vector<TunerEntry> entries = tuner->entries();
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].capacity_bucket, 64);
  EXPECT_TRUE(entries[0].decided);
  EXPECT_EQ(entries[0].chosen, (ExchangeConfig{AllToAllAlgo::kLinear, 2}));
  EXPECT_EQ(entries[0].total_ns, (std::vector<int64_t>{1000, 600, 800}));
  EXPECT_EQ(entries[1].capacity_bucket, 128);
  EXPECT_FALSE(entries[1].decided);
  EXPECT_EQ(entries[1].rounds_done, 0);
}

TEST(ExchangeTuner, TiesGoToTheLowestCandidateAndBadTotalsAreRefused) {
  auto tuner = ExchangeTuner::create(three_candidates(0, 1));
  ASSERT_TRUE(tuner.ok());
  EXPECT_EQ(tuner->decide(8, {5, 7}).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(tuner->measuring(8));
  ASSERT_TRUE(tuner->decide(8, {9, 4, 4}).ok());
  EXPECT_EQ(tuner->next(8), tuner->candidates()[1]);
}

// A candidate the group refused is excluded from its bucket: the rounds restart over the
// others (an excluded candidate is never offered, and its totals never win), a decided bucket
// takes the next best of its agreed totals, the last candidate left is never excluded, and
// other buckets are untouched.
TEST(ExchangeTuner, ACandidateTheGroupRefusedIsNeverOfferedAgainInItsBucket) {
  auto tuner = ExchangeTuner::create(three_candidates(/*warmups=*/0, /*trials=*/2));
  ASSERT_TRUE(tuner.ok()) << tuner.status();
  const std::vector<ExchangeConfig>& c = tuner->candidates();
  const int64_t bucket = 16;
  // Part way through the first round: candidate 0 ran, candidate 1 is refused.
  EXPECT_EQ(tuner->next(bucket), c[0]);
  EXPECT_FALSE(tuner->record(bucket, 100));
  EXPECT_EQ(tuner->next(bucket), c[1]);
  EXPECT_TRUE(tuner->exclude(bucket, c[1]));
  EXPECT_FALSE(tuner->exclude(bucket, c[1])) << "already excluded";
  EXPECT_FALSE(tuner->exclude(bucket, ExchangeConfig{AllToAllAlgo::kLinear, 7})) << "no such";
  EXPECT_TRUE(tuner->measuring(bucket));
  // Two rounds over candidates 0 and 2, from the start.
  const int64_t ns[3] = {500, 1, 400};
  for (int round = 0; round < 2; ++round)
    for (int i : {0, 2}) {
      EXPECT_EQ(tuner->next(bucket), c[i]) << round << " " << i;
      const bool last = tuner->record(bucket, ns[i]);
      EXPECT_EQ(last, round == 1 && i == 2);
    }
  EXPECT_EQ(tuner->totals(bucket), (std::vector<int64_t>{1000, 0, 800}));
  // Its zero total (never measured) does not make the excluded candidate win.
  ASSERT_TRUE(tuner->decide(bucket, tuner->totals(bucket)).ok());
  EXPECT_EQ(tuner->next(bucket), c[2]);
  // Decided: refusing the choice falls back to the next best agreed total; the last one stays.
  EXPECT_TRUE(tuner->exclude(bucket, c[2]));
  EXPECT_EQ(tuner->next(bucket), c[0]);
  EXPECT_FALSE(tuner->exclude(bucket, c[0])) << "the last candidate left";
  EXPECT_EQ(tuner->next(bucket), c[0]);
  std::vector<TunerEntry> entries = tuner->entries();
  ASSERT_EQ(entries.size(), 1u);
  EXPECT_EQ(entries[0].excluded, (std::vector<bool>{false, true, true}));
  // Another bucket still measures all three.
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(tuner->next(32), c[i]);
    tuner->record(32, 1);
  }
}

// Excluding while measuring until one candidate is left decides the bucket on it.
TEST(ExchangeTuner, ExcludingAllButOneDecidesOnIt) {
  auto tuner = ExchangeTuner::create(three_candidates(1, 1));
  ASSERT_TRUE(tuner.ok()) << tuner.status();
  const std::vector<ExchangeConfig>& c = tuner->candidates();
  EXPECT_TRUE(tuner->exclude(8, c[0]));
  EXPECT_TRUE(tuner->measuring(8));
  EXPECT_EQ(tuner->next(8), c[1]);
  EXPECT_TRUE(tuner->exclude(8, c[1]));
  EXPECT_FALSE(tuner->measuring(8));
  EXPECT_EQ(tuner->next(8), c[2]);
  EXPECT_FALSE(tuner->record(8, 5)) << "a decided bucket records nothing";
}

// A parallelism refused for want of its own buffers is excluded whole, only while a candidate of
// another parallelism is left to run instead.
TEST(ExchangeTuner, ExcludingAParallelismDropsAllItsWaysWhileAnotherIsLeft) {
  TunerOptions o;
  o.candidates = {{AllToAllAlgo::kLinear, 1, 1}, {AllToAllAlgo::kLinear, 2, 1}, kDataParallel};
  o.warmups = 0;
  o.trials = 1;
  auto tuner = ExchangeTuner::create(o);
  ASSERT_TRUE(tuner.ok()) << tuner.status();
  const std::vector<ExchangeConfig>& c = tuner->candidates();
  EXPECT_TRUE(tuner->exclude_parallelism(8, 1));
  EXPECT_EQ(tuner->entries().at(0).excluded, (std::vector<bool>{true, true, false}));
  EXPECT_FALSE(tuner->measuring(8));
  EXPECT_EQ(tuner->next(8), c[2]);
  EXPECT_FALSE(tuner->exclude_parallelism(8, 0)) << "r = 0 is all that is left";
  // Without a candidate of another parallelism nothing is excluded.
  EXPECT_TRUE(tuner->exclude_parallelism(16, 0));
  EXPECT_FALSE(tuner->exclude_parallelism(16, 1)) << "only r = 1 is left";
  for (const TunerEntry& e : tuner->entries()) {
    if (e.capacity_bucket == 16) {
      EXPECT_EQ(e.excluded, (std::vector<bool>{false, false, true}));
    }
  }
  EXPECT_TRUE(tuner->measuring(16));
}

// The exchange's buffers are every r >= 1's: refused for want of them, the bucket drops every
// r >= 1 at once (not one r per step, leaving whichever came last) while r = 0 is left.
TEST(ExchangeTuner, ExcludingARangeOfParallelismsDropsThemTogether) {
  TunerOptions o;
  o.candidates = {kDataParallel, {AllToAllAlgo::kLinear, 1, 1}, {AllToAllAlgo::kLinear, 1, 2},
                  {AllToAllAlgo::kLinear, 2, 4}};
  o.warmups = 0;
  o.trials = 1;
  auto tuner = ExchangeTuner::create(o);
  ASSERT_TRUE(tuner.ok()) << tuner.status();
  EXPECT_TRUE(tuner->exclude_parallelism(8, 2, 4));
  EXPECT_EQ(tuner->entries().at(0).excluded, (std::vector<bool>{false, false, true, true}));
  EXPECT_TRUE(tuner->exclude_parallelism(8, 1, std::numeric_limits<int>::max()));
  EXPECT_EQ(tuner->entries().at(0).excluded, (std::vector<bool>{false, true, true, true}));
  EXPECT_EQ(tuner->next(8), kDataParallel);
  // Every r >= 1 with nothing else left: the refusal is the step's.
  o.candidates.erase(o.candidates.begin());
  auto without_r0 = ExchangeTuner::create(o);
  ASSERT_TRUE(without_r0.ok()) << without_r0.status();
  EXPECT_FALSE(without_r0->exclude_parallelism(8, 1, std::numeric_limits<int>::max()));
  EXPECT_TRUE(without_r0->measuring(8));
}

TEST(ExchangeTuner, OneCandidateIsDecidedWithoutMeasuring) {
  TunerOptions o;
  o.candidates = {{AllToAllAlgo::k2DH, 4}};
  auto tuner = ExchangeTuner::create(o);
  ASSERT_TRUE(tuner.ok());
  EXPECT_EQ(tuner->next(16), (ExchangeConfig{AllToAllAlgo::k2DH, 4}));
  EXPECT_FALSE(tuner->measuring(16));
  EXPECT_FALSE(tuner->record(16, 10));
}

TEST(ExchangeTuner, AutoMeasuresWhatCanDifferOnTheGroup) {
  using V = std::vector<ExchangeConfig>;
  const auto L = AllToAllAlgo::kLinear, D = AllToAllAlgo::k2DH;
  const ExchangeConfig R0 = kDataParallel;
  // Two nodes of four ranks, chunks overlapping: r = 0, and r = 1 with both algorithms and
  // d = 1, 2, 4.
  EXPECT_EQ(auto_candidates({}, {}, {}, 8, 4, true),
            (V{R0, {L, 1, 1}, {L, 2, 1}, {L, 4, 1}, {D, 1, 1}, {D, 2, 1}, {D, 4, 1}}));
  // One node, or one rank per node: 2DH is the linear exchange there; not overlapping: d = 1.
  EXPECT_EQ(auto_candidates(1, {}, {}, 4, 4, false), (V{{L, 1, 1}}));
  EXPECT_EQ(auto_candidates(1, {}, {}, 4, 1, true), (V{{L, 1, 1}, {L, 2, 1}, {L, 4, 1}}));
  // local_size not dividing the size: no 2DH.
  EXPECT_EQ(auto_candidates(1, {}, {}, 6, 4, false), (V{{L, 1, 1}}));
  // A set dimension keeps its value.
  EXPECT_EQ(auto_candidates(1, D, {}, 8, 2, true), (V{{D, 1, 1}, {D, 2, 1}, {D, 4, 1}}));
  EXPECT_EQ(auto_candidates(1, {}, 3, 8, 2, false), (V{{L, 3, 1}, {D, 3, 1}}));
  EXPECT_EQ(auto_candidates({}, L, 2, 8, 2, true), (V{R0, {L, 2, 1}}));
  // r = 0 alone has nothing else to choose; one rank has nothing to gather.
  EXPECT_EQ(auto_candidates(0, {}, {}, 8, 2, true), (V{R0}));
  EXPECT_EQ(auto_candidates({}, {}, 1, 1, 1, false), (V{{L, 1, 1}}));
  // s = W / E ranks per expert: every divisor of s is a way (r = 1 gathers the whole expert,
  // r = s splits its H over all of them); a set r keeps its value.
  EXPECT_EQ(auto_candidates({}, {}, 1, 8, 1, false, 4), (V{R0, {L, 1, 1}, {L, 1, 2}, {L, 1, 4}}));
  EXPECT_EQ(auto_candidates(2, {}, 1, 8, 1, false, 4), (V{{L, 1, 2}}));
  EXPECT_EQ(auto_candidates({}, {}, 2, 4, 1, false, 2), (V{R0, {L, 2, 1}, {L, 2, 2}}));
  // Where every divisor would make more than kMaxCandidates, only 1 and s.
  EXPECT_EQ(auto_candidates({}, {}, {}, 64, 8, true, 8).size(), 1 + 2 * 2 * 3u);
  EXPECT_EQ(R0.to_string(), "r=0");
  EXPECT_EQ((ExchangeConfig{D, 4, 1}).to_string(), "r=1 a=2dh d=4");
}

// Ranks time their runs differently (noise, unequal loads): each would pick another candidate
// alone, but from the agreed totals (MAX over ranks) they all pick the same one, the candidate
// whose slowest rank is fastest.
TEST(ExchangeTuner, RanksWithDifferentTimesDecideTheSameFromTheAgreedTotals) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  constexpr int kRanks = 4;
  std::vector<ExchangeTuner> ranks;
  for (int r = 0; r < kRanks; ++r) {
    auto tuner = ExchangeTuner::create(three_candidates(1, 3));
    ASSERT_TRUE(tuner.ok()) << tuner.status();
    ranks.push_back(std::move(*tuner));
  }
  std::uniform_int_distribution<int64_t> time(1000, 9000);
  const int64_t bucket = 32;
  std::vector<bool> last(kRanks);
  for (int run = 0; run < 4 * 3; ++run) {
    const ExchangeConfig turn = ranks[0].next(bucket);
    for (int r = 0; r < kRanks; ++r) {
      EXPECT_EQ(ranks[r].next(bucket), turn);
      last[r] = ranks[r].record(bucket, time(rng));
    }
  }
  for (int r = 0; r < kRanks; ++r) EXPECT_TRUE(last[r]);  // every rank at the same run
  std::vector<int64_t> agreed(3, 0);
  for (int r = 0; r < kRanks; ++r) {
    const std::vector<int64_t> mine = ranks[r].totals(bucket);
    for (size_t c = 0; c < 3; ++c) agreed[c] = std::max(agreed[c], mine[c]);
  }
  const size_t want = std::min_element(agreed.begin(), agreed.end()) - agreed.begin();
  for (int r = 0; r < kRanks; ++r) {
    ASSERT_TRUE(ranks[r].decide(bucket, agreed).ok());
    EXPECT_EQ(ranks[r].next(bucket), ranks[r].candidates()[want]) << "rank " << r;
  }
}

// A tuner handed another's decisions (decisions() into TunerOptions::decided) starts with those
// buckets decided: they run their choice from the first forward and are never timed, an
// exclusion there falls back on the restored totals, and the other buckets measure as ever.
// forget_restored() drops only the restored buckets.
TEST(ExchangeTuner, RestoredDecisionsRunTheirChoiceWithoutMeasuring) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> time(1, 1'000'000);
  auto first = ExchangeTuner::create(three_candidates(/*warmups=*/1, /*trials=*/1));
  ASSERT_TRUE(first.ok()) << first.status();
  const std::vector<ExchangeConfig>& c = first->candidates();
  // Bucket 8: decided by measuring; bucket 64: decided after excluding candidate 1; bucket 16:
  // still measuring, so not handed on.
  for (int run = 0; run < 6; ++run) (void)first->record(8, time(rng));
  ASSERT_TRUE(first->decide(8, first->totals(8)).ok());
  EXPECT_TRUE(first->exclude(64, c[1]));
  for (int run = 0; run < 4; ++run) (void)first->record(64, time(rng));
  ASSERT_TRUE(first->decide(64, first->totals(64)).ok());
  (void)first->record(16, 5);
  const std::vector<TunerDecision> decided = first->decisions();
  ASSERT_EQ(decided.size(), 2u);
  EXPECT_EQ(decided[0].capacity_bucket, 8);
  EXPECT_EQ(decided[1].capacity_bucket, 64);
  EXPECT_EQ(decided[1].excluded, (std::vector<bool>{false, true, false}));
  EXPECT_EQ(decided[0].total_ns, first->totals(8));

  TunerOptions options = three_candidates(1, 1);
  options.decided = decided;
  auto second = ExchangeTuner::create(options);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->decisions(), decided);
  for (const TunerDecision& d : decided) {
    EXPECT_FALSE(second->measuring(d.capacity_bucket));
    EXPECT_EQ(second->next(d.capacity_bucket), c[d.chosen]);
    EXPECT_FALSE(second->record(d.capacity_bucket, 1));
  }
  for (const TunerEntry& e : second->entries()) {
    EXPECT_TRUE(e.decided && e.restored) << e.capacity_bucket;
    EXPECT_EQ(e.rounds_done, 0);
  }
  // Excluding the restored choice takes the next best restored total, never candidate 1: a
  // choice of this process's, no longer marked restored.
  const TunerDecision& d64 = decided[1];
  const size_t other = d64.chosen == 0 ? 2 : 0;
  EXPECT_TRUE(second->exclude(64, c[d64.chosen]));
  EXPECT_EQ(second->next(64), c[other]);
  ASSERT_EQ(second->entries().size(), 2u);
  EXPECT_EQ(second->entries()[1].capacity_bucket, 64);
  EXPECT_FALSE(second->entries()[1].restored);
  // A bucket nobody decided measures from its first forward, and is not restored.
  EXPECT_TRUE(second->measuring(16));
  EXPECT_EQ(second->next(16), c[0]);
  (void)second->record(32, 1);
  second->forget_restored();
  const std::vector<TunerEntry> left = second->entries();
  ASSERT_EQ(left.size(), 3u);
  EXPECT_EQ(left[0].capacity_bucket, 16);
  EXPECT_EQ(left[1].capacity_bucket, 32);
  EXPECT_EQ(left[2].capacity_bucket, 64);
  EXPECT_TRUE(left[2].decided);
  EXPECT_FALSE(left[0].restored || left[1].restored || left[2].restored);
  EXPECT_TRUE(second->measuring(8));
  EXPECT_EQ(second->next(8), c[0]);
}

// Decisions that do not fit the candidates are refused, each with what is wrong.
TEST(ExchangeTuner, RefusesRestoredDecisionsThatDoNotFitItsCandidates) {
  const TunerDecision good{16, 1, {30, 10, 20}, {false, false, false}};
  TunerOptions ok = three_candidates(1, 1);
  ok.decided = {good};
  EXPECT_TRUE(ExchangeTuner::create(ok).ok());
  struct Bad {
    const char* why;
    std::function<void(std::vector<TunerDecision>&)> change;
    const char* says;
  };
  const std::vector<Bad> bad = {
      {"bucket 0", [](auto& d) { d[0].capacity_bucket = 0; }, "power of two"},
      {"bucket 12", [](auto& d) { d[0].capacity_bucket = 12; }, "power of two"},
      {"bucket -16", [](auto& d) { d[0].capacity_bucket = -16; }, "power of two"},
      {"bucket 2^41", [](auto& d) { d[0].capacity_bucket = int64_t{1} << 41; }, "power of two"},
      {"twice", [](auto& d) { d.push_back(d[0]); }, "given twice"},
      {"two totals", [](auto& d) { d[0].total_ns.pop_back(); }, "2 totals and 3 exclusions for 3 candidates"},
      {"four exclusions", [](auto& d) { d[0].excluded.push_back(false); }, "3 totals and 4 exclusions"},
      {"chosen 3", [](auto& d) { d[0].chosen = 3; }, "chooses candidate 3"},
      {"chosen excluded", [](auto& d) { d[0].excluded[1] = true; }, "chooses candidate 1"},
      {"negative total", [](auto& d) { d[0].total_ns[2] = -1; }, "negative total"},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.why);
    TunerOptions o = three_candidates(1, 1);
    o.decided = {good};
    b.change(o.decided);
    auto t = ExchangeTuner::create(o);
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(t.status().message().find(b.says), std::string::npos) << t.status();
  }
}

}  // namespace
}  // namespace tutel::graphs
