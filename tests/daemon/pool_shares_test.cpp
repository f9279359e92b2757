// PoolShares: the arithmetic of the creation slots' fair shares, on its own. (The daemon-level
// behaviour is in the protocol-abuse tests: ATenantsGroupsWaitingForPeersLeaveOtherTenants...)
#include "pool_shares.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace tutel::daemon {
namespace {

TEST(PoolShares, ATenantAloneMayTakeEverySlot) {
  PoolShares slots(4);
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(slots.may_take("a", {})) << i;
    slots.take("a");
  }
  EXPECT_FALSE(slots.may_take("a", {}));
  EXPECT_EQ(slots.in_use(), 4);
  EXPECT_EQ(slots.in_use("a"), 4);
  // Full: nobody may take one, whatever their share.
  EXPECT_FALSE(slots.may_take("b", {"a"}));
  slots.give_back("a");
  EXPECT_TRUE(slots.may_take("b", {"a"}));
}

TEST(PoolShares, BeyondItsShareATenantLeavesTheOthersReservationsFree) {
  PoolShares slots(6);
  const std::vector<std::string> b_and_c{"b", "c"};
  EXPECT_EQ(slots.share(3), 2);
  // Its share of 2, then nothing more: 6 - 2 = 4 are the others' reservations.
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(slots.may_take("a", b_and_c));
    slots.take("a");
  }
  EXPECT_FALSE(slots.may_take("a", b_and_c));
  // b uses one of its two: a still may not take the one b does not use.
  slots.take("b");
  EXPECT_FALSE(slots.may_take("a", b_and_c));
  // Once c is no longer active, c's reservation is free for a (and b keeps a spare one).
  const std::vector<std::string> b_only{"b"};
  EXPECT_EQ(slots.share(2), 3);
  EXPECT_TRUE(slots.may_take("a", b_only));
  slots.take("a");
  EXPECT_FALSE(slots.may_take("a", b_only)) << "b's share of 3 holds 1 and keeps 2 reserved";
  EXPECT_TRUE(slots.may_take("b", {"a"}));
}

TEST(PoolShares, EveryTenantHasAtLeastOneSlotReservedAndGivingBackFreesIt) {
  PoolShares slots(2);
  const std::vector<std::string> many{"b", "c", "d", "e"};
  EXPECT_EQ(slots.share(5), 1);
  ASSERT_TRUE(slots.may_take("a", many));
  slots.take("a");
  EXPECT_FALSE(slots.may_take("a", many));
  slots.give_back("a");
  EXPECT_EQ(slots.in_use("a"), 0);
  EXPECT_EQ(slots.in_use(), 0);
  // A capacity below one is one.
  EXPECT_EQ(PoolShares(0).capacity(), 1);
}

}  // namespace
}  // namespace tutel::daemon
