// PlanKey values, bucket policies, capacity buckets and which keys W = 1 can build.
#include "tutel/graphs/plan_key.hpp"

#include <gtest/gtest.h>

#include <set>
#include <unordered_set>

#include "graphs_test_util.hpp"

namespace tutel::graphs::testing {
namespace {

TEST(PlanKey, NamesItself) {
  PlanKey k{1, 1, AllToAll::kLinear, 256, 128, true};
  EXPECT_EQ(k.to_string(), "r=1 d=1 a=linear tokens=256 capacity=128 training");
  k.a = AllToAll::k2DH;
  k.training = false;
  EXPECT_EQ(k.to_string(), "r=1 d=1 a=2dh tokens=256 capacity=128 inference");
  EXPECT_EQ(parse_all_to_all("2dh"), AllToAll::k2DH);
  EXPECT_EQ(parse_all_to_all("linear"), AllToAll::kLinear);
  EXPECT_FALSE(parse_all_to_all("ring").has_value());
}

TEST(PlanKey, HashesAndOrdersByEveryField) {
  const PlanKey base{1, 1, AllToAll::kLinear, 64, 32, false};
  std::vector<PlanKey> keys{base};
  auto vary = [&](auto&& change) {
    PlanKey k = base;
    change(k);
    keys.push_back(k);
  };
  vary([](PlanKey& k) { k.r = 2; });
  vary([](PlanKey& k) { k.d = 2; });
  vary([](PlanKey& k) { k.a = AllToAll::k2DH; });
  vary([](PlanKey& k) { k.token_bucket = 128; });
  vary([](PlanKey& k) { k.capacity_bucket = 64; });
  vary([](PlanKey& k) { k.training = true; });
  std::unordered_set<PlanKey, PlanKeyHash> hashed(keys.begin(), keys.end());
  std::set<PlanKey> ordered(keys.begin(), keys.end());
  EXPECT_EQ(hashed.size(), keys.size());
  EXPECT_EQ(ordered.size(), keys.size());
  EXPECT_TRUE(hashed.contains(PlanKey{1, 1, AllToAll::kLinear, 64, 32, false}));
  EXPECT_EQ(PlanKeyHash{}(base), PlanKeyHash{}(PlanKey(base)));
}

TEST(BucketPolicy, PowersOfTwo) {
  const BucketPolicy p = BucketPolicy::powers_of_two(64);
  EXPECT_EQ(p.bucket_for(1), 64);
  EXPECT_EQ(p.bucket_for(64), 64);
  EXPECT_EQ(p.bucket_for(65), 128);
  EXPECT_EQ(p.bucket_for(1000), 1024);
  EXPECT_EQ(p.bucket_for(4096), 4096);
  EXPECT_EQ(p.listed(), std::vector<int64_t>{64});
}

TEST(BucketPolicy, ConfiguredListThenDoubling) {
  auto p = BucketPolicy::from_list({100, 300, 1000});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->bucket_for(1), 100);
  EXPECT_EQ(p->bucket_for(100), 100);
  EXPECT_EQ(p->bucket_for(101), 300);
  EXPECT_EQ(p->bucket_for(1000), 1000);
  EXPECT_EQ(p->bucket_for(1001), 2000);
  EXPECT_EQ(p->bucket_for(4500), 8000);
  EXPECT_EQ(p->to_string(), "[100, 300, 1000, then x2]");

  auto unsorted = BucketPolicy::from_list({64, 32});
  ASSERT_FALSE(unsorted.ok());
  EXPECT_NE(unsorted.status().message().find("strictly ascending"), std::string::npos);
  EXPECT_FALSE(BucketPolicy::from_list({}).ok());
  EXPECT_FALSE(BucketPolicy::from_list({0, 8}).ok());
}

TEST(CapacityBuckets, StaticCapacityIsTheFullBucketsCapacity) {
  const LayerSpec s = base_spec(4, 16, 16, 2, 1.25);  // C = 2·floor(1.25·ceil(S/4))
  const BucketConfig buckets;
  EXPECT_EQ(capacity_bound(s, 64), 2 * 20);
  // Every S of the bucket fits: C is monotone in S.
  for (int64_t S = 1; S <= 64; ++S) EXPECT_LE(layer_capacity(s, S, 0), capacity_bound(s, 64));
  EXPECT_EQ(capacity_bucket_for(s, buckets, 64, 3), 40);  // the requested capacity is irrelevant
  EXPECT_EQ(balanced_capacity(s, 64), 40);
}

TEST(CapacityBuckets, DynamicCapacityUsesThePolicyUnderTheBound) {
  LayerSpec s = base_spec(4, 16, 16, 2, 0.0);
  BucketConfig buckets;
  buckets.capacity = BucketPolicy::powers_of_two(8);
  EXPECT_EQ(capacity_bound(s, 64), 64);  // dropless: one expert may get every token
  EXPECT_EQ(capacity_bucket_for(s, buckets, 64, 5), 8);
  EXPECT_EQ(capacity_bucket_for(s, buckets, 64, 33), 64);
  EXPECT_EQ(capacity_bucket_for(s, buckets, 64, 64), 64);
  EXPECT_EQ(balanced_capacity(s, 64), 32);  // 64·2/4
  s.capacity_factor = -0.5;                 // at most 2·floor(0.5·16) = 16
  EXPECT_EQ(capacity_bound(s, 64), 16);
  EXPECT_EQ(capacity_bucket_for(s, buckets, 64, 12), 16);
  s.capacity_factor = 0.0;
  s.alignment = 24;  // capacity rounds up to multiples of 24
  EXPECT_EQ(capacity_bound(s, 64), 72);
}

TEST(CheckBuildable, OnlyTheOneRankConfigurationForNow) {
  const LayerSpec s = base_spec(4, 16, 16, 2, 0.0);
  const PlanKey good{1, 1, AllToAll::kLinear, 64, 16, true};
  EXPECT_TRUE(check_buildable(good, s).ok());
  auto refused = [&](PlanKey k, int world, const std::string& words) {
    Status st = check_buildable(k, s, world);
    EXPECT_EQ(st.code(), StatusCode::kUnimplemented) << st;
    EXPECT_NE(st.message().find(words), std::string::npos) << st;
    EXPECT_NE(st.message().find(k.to_string()), std::string::npos) << st;
  };
  PlanKey k = good;
  k.r = 0;
  refused(k, 1, "r = 0 is not buildable with W = 1");
  k.r = 4;
  refused(k, 1, "use r = 1");
  k = good;
  k.d = 2;
  refused(k, 1, "d = 2 is not buildable with W = 1");
  k = good;
  k.a = AllToAll::k2DH;
  refused(k, 1, "a = 2dh is not buildable");
  refused(good, 4, "W = 4");
  k = good;
  k.capacity_bucket = -1;
  EXPECT_EQ(check_buildable(k, s).code(), StatusCode::kInvalidArgument);
  k = good;
  k.capacity_bucket = int64_t{1} << 30;
  EXPECT_EQ(check_buildable(k, s).code(), StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace tutel::graphs::testing
