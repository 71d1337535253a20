// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";
import {Base} from "./Base.t.sol";
import {Tokenomics} from "../src/Tokenomics.sol";

/// Reward-per-share accounting of the staking pools, to the wei. Settlement is configured to send
/// 100 % of every payment to the node's pool, so each settled amount is exactly one pool income.
contract StakingRewardsTest is Base {
    address internal node = makeAddr("node");
    address internal payer = makeAddr("payer");
    address[3] internal stakers = [makeAddr("staker0"), makeAddr("staker1"), makeAddr("staker2")];

    uint256 internal batchCount;
    uint256 internal totalIncome;
    uint256[3] internal claimed;

    function setUp() public override {
        super.setUp();
        vm.prank(admin);
        tokenomics.setSplit(0, 10_000, 0);
    }

    // ------------------------------------------------------------------ helpers

    function _stake(address who, uint256 amount) internal {
        _fund(who, amount);
        vm.startPrank(who);
        token.approve(address(tokenomics), amount);
        tokenomics.stake(node, amount);
        vm.stopPrank();
    }

    function _unstake(address who, uint256 amount) internal {
        vm.prank(who);
        tokenomics.unstake(node, amount);
    }

    /// One pool income of exactly `amount` wei.
    function _income(uint256 amount) internal {
        _deposit(payer, amount);
        // With nobody staked the pool's share goes to the node instead.
        if (_pool().staked != 0) totalIncome += amount;
        _settleOne(bytes32(++batchCount), payer, node, amount);
    }

    function _claim(uint256 i) internal returns (uint256 paid) {
        vm.prank(stakers[i]);
        paid = tokenomics.claim(node);
        claimed[i] += paid;
    }

    function _pool() internal view returns (Tokenomics.Pool memory p) {
        (p.staked, p.accPerShare, p.unclaimed, p.carry) = tokenomics.pools(node);
    }

    function _totalClaimed() internal view returns (uint256) {
        return claimed[0] + claimed[1] + claimed[2];
    }

    /// Σ claimed + what the pool still holds == Σ income, to the wei.
    function _assertConserved() internal view {
        assertEq(_totalClaimed() + _pool().unclaimed, totalIncome, "claimed + unclaimed != income");
        assertEq(tokenomics.totalPoolUnclaimed(), _pool().unclaimed);
    }

    /// What is still owed to stakers never exceeds what the pool holds.
    function _assertSolvent() internal view {
        uint256 pending;
        for (uint256 i; i < 3; ++i) {
            pending += tokenomics.pendingReward(node, stakers[i]);
        }
        assertLe(pending, _pool().unclaimed, "pool owes more than it holds");
    }

    // ------------------------------------------------------------------ exact shares

    function test_Rewards_TwoStakersExactShares() public {
        _stake(stakers[0], 1e18);
        _stake(stakers[1], 3e18);

        _income(4e18);
        assertEq(_claim(0), 1e18);
        assertEq(_claim(1), 3e18);

        _income(8);
        assertEq(_claim(0), 2);
        assertEq(_claim(1), 6);

        assertEq(_pool().unclaimed, 0);
        assertEq(token.balanceOf(stakers[0]), 1e18 + 2);
        assertEq(token.balanceOf(stakers[1]), 3e18 + 6);
        _assertConserved();
    }

    function test_Rewards_LateStakerEarnsOnlyLaterIncome() public {
        _stake(stakers[0], 1e18);
        _income(100);
        _stake(stakers[1], 1e18);
        assertEq(tokenomics.pendingReward(node, stakers[1]), 0);

        _income(100);
        assertEq(_claim(0), 150);
        assertEq(_claim(1), 50);
        _assertConserved();
    }

    function test_Rewards_UnstakedStakerStopsEarning() public {
        _stake(stakers[0], 1e18);
        _stake(stakers[1], 1e18);
        _income(100);
        _unstake(stakers[1], 1e18);
        _income(100);

        assertEq(_claim(0), 150);
        assertEq(_claim(1), 50);
        _assertConserved();
    }

    // ------------------------------------------------------------------ uneven shares and dust

    /// Stakes of 1, 3 and 7 wei (Σ 11) and incomes none of which divides by 11: every staker is
    /// paid exactly the floor of its pro-rata share, and the dust left is below one wei per staker
    /// (1 wei here) — it does not grow with the number of incomes, because the scaled remainder
    /// of each income is carried into the next.
    function test_Rewards_UnevenStakes_FloorOfExactShareAndBoundedDust() public {
        uint256[3] memory stake = [uint256(1), 3, 7];
        for (uint256 i; i < 3; ++i) {
            _stake(stakers[i], stake[i]);
        }
        uint256[5] memory incomes = [uint256(1), 5, 13, 1e18 + 7, 999_999];
        for (uint256 k; k < incomes.length; ++k) {
            _income(incomes[k]);
            _claim(k % 3);
            for (uint256 i; i < 3; ++i) {
                assertLe(claimed[i], totalIncome * stake[i] / 11, "paid more than the exact share");
            }
            _assertConserved();
        }
        for (uint256 i; i < 3; ++i) {
            _claim(i);
        }

        // Σ income 1_000000000001_000025; exact shares ·1/11, ·3/11, ·7/11 rounded down.
        assertEq(claimed[0], 90_909090909181820);
        assertEq(claimed[1], 272_727272727545461);
        assertEq(claimed[2], 636_363636364272743);
        assertEq(_pool().unclaimed, 1);
        _assertConserved();
    }

    /// With stakes far above 1e18 the carry itself may hold up to Σstake/1e18 wei of income not yet
    /// per-share-representable; dust·1e18 == carry + Σ(stake_i·accPerShare mod 1e18) exactly.
    function test_Rewards_LargeOddStakes_DustIsCarryPlusRoundingExactly() public {
        uint256[3] memory stake = [uint256(1), 2e18 + 1, 333_333_333_333_333_333_337];
        uint256 staked = stake[0] + stake[1] + stake[2];
        for (uint256 i; i < 3; ++i) {
            _stake(stakers[i], stake[i]);
        }
        uint256[5] memory incomes = [uint256(1), 7, 1e18 + 3, 999, 123_456_789_012_345_678_901];
        for (uint256 k; k < incomes.length; ++k) {
            _income(incomes[k]);
        }
        for (uint256 i; i < 3; ++i) {
            _claim(i);
            assertLe(claimed[i], Math.mulDiv(totalIncome, stake[i], staked), "paid more than the exact share");
        }

        assertEq(claimed[0], 0);
        assertEq(claimed[1], 742287012002061708);
        assertEq(claimed[2], 123714502000343618001);
        uint256 dust = _pool().unclaimed;
        assertEq(dust, 202);
        Tokenomics.Pool memory p = _pool();
        uint256 fractions;
        for (uint256 i; i < 3; ++i) {
            fractions += mulmod(stake[i], p.accPerShare, 1e18);
        }
        assertEq(dust * 1e18, p.carry + fractions);
        assertLt(dust, 3 + staked / 1e18 + 1);
        _assertConserved();
    }

    /// Incomes too small to raise accPerShare by even one unit are not lost: the carry
    /// accumulates them until they are, and the stakers are then paid all of it.
    function test_Rewards_CarryPaysOutIncomesBelowOnePerShareUnit() public {
        _stake(stakers[0], 1e24);
        _stake(stakers[1], 3e24);

        for (uint256 k; k < 3; ++k) {
            _income(1e6); // 1e6·1e18 / 4e24 < 1
            assertEq(_pool().accPerShare, 0);
            assertEq(tokenomics.pendingReward(node, stakers[0]), 0);
        }
        _income(1e6);

        assertEq(_claim(0), 1e6);
        assertEq(_claim(1), 3e6);
        assertEq(_pool().unclaimed, 0);
        assertEq(_pool().carry, 0);
    }

    /// Regression: the debt of a staker whose stake changes used to be rounded down, crediting it
    /// up to 1 wei it had not earned each time; two such stakers could be owed more than the pool
    /// held, and the last claim then reverted (arithmetic underflow).
    function test_Rewards_StakeChangesNeverOverdrawPool() public {
        _stake(stakers[0], 2);
        _income(1); // accPerShare 0.5e18
        _stake(stakers[0], 1); // 3 wei · 0.5 = 1.5 already accounted for
        _stake(stakers[1], 1); // 1 wei · 0.5 = 0.5 already accounted for
        _income(2); // accPerShare 1e18
        _assertSolvent();

        // Exact entitlements: staker0 1 + 2·3/4 = 2.5, staker1 2·1/4 = 0.5.
        assertEq(_claim(0), 2);
        assertEq(_claim(1), 0);
        assertEq(_pool().unclaimed, 1);
        _assertConserved();
    }

    // ------------------------------------------------------------------ fuzz

    /// Fixed stakers, random incomes, claims interleaved at random: each staker is paid at most the
    /// floor of its exact pro-rata share at every point, at most 1 + stake/1e18 wei less in the end,
    /// and Σ claimed + unclaimed == Σ income.
    function testFuzz_Rewards_FixedStakers_ProRataAndConservation(
        uint256[3] memory stake,
        uint256[6] memory incomes,
        uint256 claimMask
    ) public {
        uint256 staked;
        for (uint256 i; i < 3; ++i) {
            stake[i] = bound(stake[i], 1, 1e25);
            staked += stake[i];
            _stake(stakers[i], stake[i]);
        }
        for (uint256 k; k < incomes.length; ++k) {
            _income(bound(incomes[k], 1, 1e24));
            for (uint256 i; i < 3; ++i) {
                if ((claimMask >> (k * 3 + i)) & 1 == 1) _claim(i);
                assertLe(claimed[i], Math.mulDiv(totalIncome, stake[i], staked), "paid more than the exact share");
            }
            _assertConserved();
            _assertSolvent();
        }
        for (uint256 i; i < 3; ++i) {
            _claim(i);
            uint256 exact = Math.mulDiv(totalIncome, stake[i], staked);
            assertLe(claimed[i], exact);
            assertGe(claimed[i] + 1 + stake[i] / 1e18, exact, "staker fell behind its share");
        }
        assertLt(_pool().unclaimed, 3 + staked / 1e18 + 1, "dust bound");
        _assertConserved();
    }

    /// Stakes, unstakes, incomes and claims in random order: the pool never owes more than it
    /// holds, no claim reverts, and Σ claimed + unclaimed == Σ income.
    function testFuzz_Rewards_ChangingStakes_PoolNeverOverdrawn(uint256 seed) public {
        for (uint256 step; step < 24; ++step) {
            uint256 r = uint256(keccak256(abi.encode(seed, step)));
            uint256 who = r % 3;
            uint256 amount = 1 + (r >> 8) % (r & 0x10 == 0 ? 10 : 1e21);
            uint256 op = (r >> 128) % 4;
            if (op == 0) {
                _stake(stakers[who], amount);
            } else if (op == 1) {
                (uint256 has,,) = tokenomics.stakes(node, stakers[who]);
                if (has != 0) _unstake(stakers[who], 1 + amount % has);
            } else if (op == 2) {
                _income(amount);
            } else {
                _claim(who);
            }
            _assertSolvent();
            _assertConserved();
        }
        for (uint256 i; i < 3; ++i) {
            _claim(i);
        }
        _assertConserved();
    }
}
