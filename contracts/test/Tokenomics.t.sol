// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Vm} from "forge-std/Vm.sol";
import {IERC20Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";
import {Base} from "./Base.t.sol";
import {LAIToken} from "../src/LAIToken.sol";
import {NetworkStatus} from "../src/NetworkStatus.sol";
import {Tokenomics} from "../src/Tokenomics.sol";

contract TokenomicsTest is Base {
    address internal alice = makeAddr("alice");
    address internal bob = makeAddr("bob");
    address internal nodeA = makeAddr("nodeA");
    address internal nodeB = makeAddr("nodeB");
    address internal nodeC = makeAddr("nodeC");
    address internal staker = makeAddr("staker");

    bytes32 internal constant BATCH = keccak256("batch-1");

    function setUp() public override {
        super.setUp();
        _deposit(alice, 1_000 * LAI);
    }

    function _stake(address who, address node, uint256 amount) internal {
        _fund(who, amount);
        vm.startPrank(who);
        token.approve(address(tokenomics), amount);
        tokenomics.stake(node, amount);
        vm.stopPrank();
    }

    function _pool(address node) internal view returns (Tokenomics.Pool memory p) {
        (p.staked, p.accPerShare, p.unclaimed, p.carry) = tokenomics.pools(node);
    }

    function _assertCustody() internal view {
        assertEq(
            token.balanceOf(address(tokenomics)),
            tokenomics.totalNodeBalances() + tokenomics.treasuryBalance() + tokenomics.totalPoolStaked()
                + tokenomics.totalPoolUnclaimed(),
            "tokenomics custody"
        );
    }

    // ------------------------------------------------------------------ constructor and governance

    function test_Constructor_SetsDefaultsAndRoles() public view {
        (uint16 nodeBps, uint16 poolBps, uint16 treasuryBps) = tokenomics.split();
        assertEq(nodeBps, 9_000);
        assertEq(poolBps, 500);
        assertEq(treasuryBps, 500);
        (uint16 computeBps, uint16 requestsBps, uint16 uptimeBps) = tokenomics.weights();
        assertEq(computeBps, 5_000);
        assertEq(requestsBps, 3_000);
        assertEq(uptimeBps, 2_000);
        assertEq(address(tokenomics.token()), address(token));
        assertEq(address(tokenomics.users()), address(users));
        assertEq(address(tokenomics.status()), address(status));
        assertTrue(tokenomics.hasRole(tokenomics.DEFAULT_ADMIN_ROLE(), admin));
        assertTrue(tokenomics.hasRole(tokenomics.GOVERNOR_ROLE(), admin));
    }

    function test_SetSplit_UpdatesAndEmits() public {
        vm.expectEmit(address(tokenomics));
        emit Tokenomics.SplitSet(8_000, 1_500, 500);
        vm.prank(admin);
        tokenomics.setSplit(8_000, 1_500, 500);

        (uint16 nodeBps, uint16 poolBps, uint16 treasuryBps) = tokenomics.split();
        assertEq(nodeBps, 8_000);
        assertEq(poolBps, 1_500);
        assertEq(treasuryBps, 500);
    }

    function test_Revert_When_SplitDoesNotSumToBps() public {
        vm.expectRevert(abi.encodeWithSelector(Tokenomics.BadSplit.selector, 10_001));
        vm.prank(admin);
        tokenomics.setSplit(9_000, 501, 500);
    }

    function test_Revert_When_SetSplitByNonGovernor() public {
        vm.expectRevert(_unauthorized(operator, tokenomics.GOVERNOR_ROLE()));
        vm.prank(operator);
        tokenomics.setSplit(10_000, 0, 0);
    }

    function test_SetWeights_UpdatesAndEmits() public {
        vm.expectEmit(address(tokenomics));
        emit Tokenomics.WeightsSet(10_000, 0, 0);
        vm.prank(admin);
        tokenomics.setWeights(10_000, 0, 0);

        (uint16 computeBps, uint16 requestsBps, uint16 uptimeBps) = tokenomics.weights();
        assertEq(computeBps, 10_000);
        assertEq(requestsBps, 0);
        assertEq(uptimeBps, 0);
    }

    function test_Revert_When_WeightsDoNotSumToBps() public {
        vm.expectRevert(abi.encodeWithSelector(Tokenomics.BadSplit.selector, 9_999));
        vm.prank(admin);
        tokenomics.setWeights(5_000, 3_000, 1_999);
    }

    function test_Revert_When_SetWeightsByNonGovernor() public {
        vm.expectRevert(_unauthorized(stranger, tokenomics.GOVERNOR_ROLE()));
        vm.prank(stranger);
        tokenomics.setWeights(10_000, 0, 0);
    }

    function test_SetEmission_UpdatesAndEmits() public {
        vm.expectEmit(address(tokenomics));
        emit Tokenomics.EmissionSet(7 * LAI);
        vm.prank(admin);
        tokenomics.setEmission(7 * LAI);

        assertEq(tokenomics.emissionPerEpoch(), 7 * LAI);
        assertEq(tokenomics.epochEmission(5), 7 * LAI);
    }

    function test_Revert_When_SetEmissionByNonGovernor() public {
        vm.expectRevert(_unauthorized(operator, tokenomics.GOVERNOR_ROLE()));
        vm.prank(operator);
        tokenomics.setEmission(1);
    }

    // ------------------------------------------------------------------ settleBatch

    function test_SettleBatch_SplitsPaymentsAndEmits() public {
        Tokenomics.Entry[] memory entries = new Tokenomics.Entry[](2);
        entries[0] = _entry(alice, nodeA, 10 * LAI, 1_000, 3);
        entries[1] = _entry(alice, nodeB, 20 * LAI, 2_000, 5);

        vm.expectEmit(address(tokenomics));
        emit Tokenomics.BatchSettled(BATCH, 2, 30 * LAI, 30 * LAI, 0);
        assertTrue(_settle(BATCH, entries));

        // 90 % to the node, 5 % to its (empty) pool, which falls back to the node, 5 % treasury.
        assertEq(tokenomics.nodeBalance(nodeA), 9.5e18);
        assertEq(tokenomics.nodeBalance(nodeB), 19e18);
        assertEq(tokenomics.nodeEarned(nodeA), 9.5e18);
        assertEq(tokenomics.nodeEarned(nodeB), 19e18);
        assertEq(tokenomics.treasuryBalance(), 1.5e18);
        assertEq(tokenomics.totalNodeBalances(), 28.5e18);
        assertEq(tokenomics.totalSettled(), 30 * LAI);
        assertTrue(tokenomics.settled(BATCH));
        assertEq(users.balanceOf(alice), 970 * LAI);
        assertEq(token.balanceOf(address(tokenomics)), 30 * LAI);
        _assertCustody();
    }

    function test_SettleBatch_RecordsUsageForTheCurrentEpoch() public {
        _settle(BATCH, _one(_entry(alice, nodeA, 1, 1_000, 3)));
        _warpToEpoch(1);
        _settle(keccak256("batch-2"), _one(_entry(alice, nodeA, 1, 50, 2)));

        (uint256 tokens0, uint256 requests0) = tokenomics.epochNode(0, nodeA);
        (uint256 tokens1, uint256 requests1) = tokenomics.epochNode(1, nodeA);
        (uint256 total0,) = tokenomics.epochTotals(0);
        assertEq(tokens0, 1_000);
        assertEq(requests0, 3);
        assertEq(tokens1, 50);
        assertEq(requests1, 2);
        assertEq(total0, 1_000);
    }

    function test_SettleBatch_FeeSplitExactToTheWei_TreasuryGetsRemainder() public {
        _stake(staker, nodeA, 1 * LAI);

        _settleOne(BATCH, alice, nodeA, 12_345);

        // 12_345 × 90 % = 11_110.5 → 11_110; × 5 % = 617.25 → 617; treasury 12_345 − 11_110 − 617.
        assertEq(tokenomics.nodeBalance(nodeA), 11_110);
        assertEq(_pool(nodeA).unclaimed, 617);
        assertEq(tokenomics.treasuryBalance(), 618);
        assertEq(tokenomics.nodeEarned(nodeA), 11_110);
        _assertCustody();
    }

    function test_SettleBatch_FeeSplitRemainderWithUnevenSplit() public {
        vm.prank(admin);
        tokenomics.setSplit(3_333, 3_333, 3_334);
        _stake(staker, nodeA, 1 * LAI);

        _settleOne(BATCH, alice, nodeA, 10);
        assertEq(tokenomics.nodeBalance(nodeA), 3);
        assertEq(_pool(nodeA).unclaimed, 3);
        assertEq(tokenomics.treasuryBalance(), 4);

        _settleOne(keccak256("batch-2"), alice, nodeA, 1);
        assertEq(tokenomics.nodeBalance(nodeA), 3);
        assertEq(tokenomics.treasuryBalance(), 5);
    }

    function test_SettleBatch_PoolShareGoesToNodeWhenNobodyStaked() public {
        _settleOne(BATCH, alice, nodeA, 12_345);

        assertEq(tokenomics.nodeBalance(nodeA), 11_110 + 617);
        assertEq(tokenomics.nodeEarned(nodeA), 11_727);
        assertEq(tokenomics.treasuryBalance(), 618);
        assertEq(_pool(nodeA).unclaimed, 0);
        assertEq(tokenomics.totalPoolUnclaimed(), 0);
        _assertCustody();
    }

    function test_SettleBatch_SameIdTwiceIsNoOp() public {
        Tokenomics.Entry[] memory entries = _one(_entry(alice, nodeA, 10 * LAI, 100, 1));
        _settle(BATCH, entries);
        uint256 userBalance = users.balanceOf(alice);
        uint256 nodeBal = tokenomics.nodeBalance(nodeA);
        uint256 treasuryBal = tokenomics.treasuryBalance();
        uint256 held = token.balanceOf(address(tokenomics));
        (uint256 tokens,) = tokenomics.epochTotals(0);

        vm.recordLogs();
        assertFalse(_settle(BATCH, entries));

        Vm.Log[] memory logs = vm.getRecordedLogs();
        assertEq(logs.length, 1, "only BatchAlreadySettled, no transfer");
        assertEq(logs[0].emitter, address(tokenomics));
        assertEq(logs[0].topics[0], Tokenomics.BatchAlreadySettled.selector);
        assertEq(logs[0].topics[1], BATCH);
        assertEq(users.balanceOf(alice), userBalance);
        assertEq(tokenomics.nodeBalance(nodeA), nodeBal);
        assertEq(tokenomics.treasuryBalance(), treasuryBal);
        assertEq(token.balanceOf(address(tokenomics)), held);
        assertEq(tokenomics.totalSettled(), 10 * LAI);
        (uint256 tokensAfter,) = tokenomics.epochTotals(0);
        assertEq(tokensAfter, tokens);
    }

    function test_SettleBatch_SettledIdIgnoresDifferentEntries() public {
        _settleOne(BATCH, alice, nodeA, 10 * LAI);
        assertFalse(_settleOne(BATCH, alice, nodeB, 500 * LAI));

        assertEq(tokenomics.nodeBalance(nodeB), 0);
        assertEq(users.balanceOf(alice), 990 * LAI);
    }

    function test_SettleBatch_ShortfallWhenUserWithdrew() public {
        vm.prank(alice);
        users.withdraw(990 * LAI, alice);

        vm.expectEmit(address(tokenomics));
        emit Tokenomics.Shortfall(BATCH, alice, 25 * LAI, 10 * LAI);
        vm.expectEmit(address(tokenomics));
        emit Tokenomics.BatchSettled(BATCH, 1, 25 * LAI, 10 * LAI, 15 * LAI);
        assertTrue(_settleOne(BATCH, alice, nodeA, 25 * LAI));

        assertEq(users.balanceOf(alice), 0);
        assertEq(tokenomics.nodeBalance(nodeA), 9.5e18);
        assertEq(tokenomics.treasuryBalance(), 0.5e18);
        assertEq(tokenomics.totalSettled(), 10 * LAI);
        _assertCustody();
    }

    function test_SettleBatch_ShortfallOfOneUserDoesNotBlockOthers() public {
        Tokenomics.Entry[] memory entries = new Tokenomics.Entry[](2);
        entries[0] = _entry(bob, nodeA, 5 * LAI, 0, 0); // bob never deposited
        entries[1] = _entry(alice, nodeB, 2 * LAI, 0, 0);

        vm.expectEmit(address(tokenomics));
        emit Tokenomics.Shortfall(BATCH, bob, 5 * LAI, 0);
        vm.expectEmit(address(tokenomics));
        emit Tokenomics.BatchSettled(BATCH, 2, 7 * LAI, 2 * LAI, 5 * LAI);
        _settle(BATCH, entries);

        assertEq(tokenomics.nodeBalance(nodeA), 0);
        assertEq(tokenomics.nodeBalance(nodeB), 1.9e18);
    }

    function test_SettleBatch_EmptyBatchConsumesId() public {
        vm.expectEmit(address(tokenomics));
        emit Tokenomics.BatchSettled(BATCH, 0, 0, 0, 0);
        assertTrue(_settle(BATCH, new Tokenomics.Entry[](0)));
        assertTrue(tokenomics.settled(BATCH));
    }

    function test_Revert_When_SettleBatchTooLarge() public {
        uint256 n = tokenomics.MAX_BATCH() + 1;
        vm.expectRevert(abi.encodeWithSelector(Tokenomics.BatchTooLarge.selector, n, n - 1));
        _settle(BATCH, new Tokenomics.Entry[](n));
    }

    function test_Revert_When_SettleBatchByNonSettler() public {
        Tokenomics.Entry[] memory entries = _one(_entry(alice, nodeA, 1, 0, 0));
        vm.expectRevert(_unauthorized(stranger, tokenomics.SETTLER_ROLE()));
        vm.prank(stranger);
        tokenomics.settleBatch(BATCH, entries);
    }

    function test_Revert_When_TokenomicsLacksSettlerRoleOnUsers_IdNotConsumed() public {
        bytes32 role = users.SETTLER_ROLE();
        vm.prank(admin);
        users.revokeRole(role, address(tokenomics));

        vm.expectRevert(_unauthorized(address(tokenomics), users.SETTLER_ROLE()));
        _settleOne(BATCH, alice, nodeA, 1);
        assertFalse(tokenomics.settled(BATCH));
    }

    // ------------------------------------------------------------------ withdrawNode / withdrawTreasury

    function test_WithdrawNode_PaysRecipientAndEmits() public {
        _settleOne(BATCH, alice, nodeA, 10 * LAI);

        vm.expectEmit(address(tokenomics));
        emit Tokenomics.NodeWithdrawal(nodeA, bob, 4 * LAI);
        vm.prank(nodeA);
        tokenomics.withdrawNode(4 * LAI, bob);

        assertEq(token.balanceOf(bob), 4 * LAI);
        assertEq(tokenomics.nodeBalance(nodeA), 5.5e18);
        assertEq(tokenomics.totalNodeBalances(), 5.5e18);
        assertEq(tokenomics.nodeEarned(nodeA), 9.5e18, "earned is not reduced by withdrawals");
        _assertCustody();
    }

    function test_Revert_When_WithdrawNodeZero() public {
        vm.expectRevert(Tokenomics.ZeroAmount.selector);
        vm.prank(nodeA);
        tokenomics.withdrawNode(0, nodeA);
    }

    function test_Revert_When_WithdrawNodeExceedsBalance() public {
        _settleOne(BATCH, alice, nodeA, 10 * LAI);
        vm.expectRevert(abi.encodeWithSelector(Tokenomics.InsufficientBalance.selector, 9.5e18, 9.5e18 + 1));
        vm.prank(nodeA);
        tokenomics.withdrawNode(9.5e18 + 1, nodeA);
    }

    function test_WithdrawTreasury_PaysRecipientAndEmits() public {
        _settleOne(BATCH, alice, nodeA, 10 * LAI);

        vm.expectEmit(address(tokenomics));
        emit Tokenomics.TreasuryWithdrawal(treasury, 0.5e18);
        vm.prank(admin);
        tokenomics.withdrawTreasury(0.5e18, treasury);

        assertEq(tokenomics.treasuryBalance(), 0);
        assertEq(token.balanceOf(treasury), 0.5e18);
        _assertCustody();
    }

    function test_Revert_When_WithdrawTreasuryZero() public {
        vm.expectRevert(Tokenomics.ZeroAmount.selector);
        vm.prank(admin);
        tokenomics.withdrawTreasury(0, treasury);
    }

    function test_Revert_When_WithdrawTreasuryExceedsBalance() public {
        _settleOne(BATCH, alice, nodeA, 10 * LAI);
        vm.expectRevert(abi.encodeWithSelector(Tokenomics.InsufficientBalance.selector, 0.5e18, 1 * LAI));
        vm.prank(admin);
        tokenomics.withdrawTreasury(1 * LAI, treasury);
    }

    function test_Revert_When_WithdrawTreasuryByNonGovernor() public {
        _settleOne(BATCH, alice, nodeA, 10 * LAI);
        vm.expectRevert(_unauthorized(nodeA, tokenomics.GOVERNOR_ROLE()));
        vm.prank(nodeA);
        tokenomics.withdrawTreasury(1, nodeA);
    }

    // ------------------------------------------------------------------ stake / unstake / claim

    function test_Stake_LocksTokensAndEmits() public {
        _fund(staker, 5 * LAI);
        vm.startPrank(staker);
        token.approve(address(tokenomics), 5 * LAI);
        vm.expectEmit(address(tokenomics));
        emit Tokenomics.Staked(nodeA, staker, 5 * LAI);
        tokenomics.stake(nodeA, 5 * LAI);
        vm.stopPrank();

        (uint256 amount,,) = tokenomics.stakes(nodeA, staker);
        assertEq(amount, 5 * LAI);
        assertEq(_pool(nodeA).staked, 5 * LAI);
        assertEq(tokenomics.totalPoolStaked(), 5 * LAI);
        assertEq(token.balanceOf(staker), 0);
        _assertCustody();
    }

    function test_Revert_When_StakeZero() public {
        vm.expectRevert(Tokenomics.ZeroAmount.selector);
        vm.prank(staker);
        tokenomics.stake(nodeA, 0);
    }

    function test_Revert_When_StakeWithoutApproval() public {
        _fund(staker, 5 * LAI);
        vm.expectRevert(
            abi.encodeWithSelector(IERC20Errors.ERC20InsufficientAllowance.selector, address(tokenomics), 0, 5 * LAI)
        );
        vm.prank(staker);
        tokenomics.stake(nodeA, 5 * LAI);
    }

    function test_Unstake_ReturnsTokensKeepsRewardAndEmits() public {
        _stake(staker, nodeA, 5 * LAI);
        _settleOne(BATCH, alice, nodeA, 100 * LAI); // pool gets 5 LAI

        vm.expectEmit(address(tokenomics));
        emit Tokenomics.Unstaked(nodeA, staker, 5 * LAI);
        vm.prank(staker);
        tokenomics.unstake(nodeA, 5 * LAI);

        assertEq(token.balanceOf(staker), 5 * LAI);
        assertEq(_pool(nodeA).staked, 0);
        assertEq(tokenomics.totalPoolStaked(), 0);
        assertEq(tokenomics.pendingReward(nodeA, staker), 5 * LAI);
        vm.prank(staker);
        assertEq(tokenomics.claim(nodeA), 5 * LAI);
        assertEq(token.balanceOf(staker), 10 * LAI);
        _assertCustody();
    }

    function test_Revert_When_UnstakeZero() public {
        _stake(staker, nodeA, 5 * LAI);
        vm.expectRevert(Tokenomics.ZeroAmount.selector);
        vm.prank(staker);
        tokenomics.unstake(nodeA, 0);
    }

    function test_Revert_When_UnstakeMoreThanStaked() public {
        _stake(staker, nodeA, 5 * LAI);
        vm.expectRevert(abi.encodeWithSelector(Tokenomics.InsufficientBalance.selector, 5 * LAI, 5 * LAI + 1));
        vm.prank(staker);
        tokenomics.unstake(nodeA, 5 * LAI + 1);
    }

    function test_Claim_PaysPoolShareAndEmits() public {
        _stake(staker, nodeA, 5 * LAI);
        _settleOne(BATCH, alice, nodeA, 100 * LAI);
        assertEq(tokenomics.pendingReward(nodeA, staker), 5 * LAI);

        vm.expectEmit(address(tokenomics));
        emit Tokenomics.RewardClaimed(nodeA, staker, 5 * LAI);
        vm.prank(staker);
        uint256 paid = tokenomics.claim(nodeA);

        assertEq(paid, 5 * LAI);
        assertEq(token.balanceOf(staker), 5 * LAI);
        assertEq(_pool(nodeA).unclaimed, 0);
        assertEq(tokenomics.totalPoolUnclaimed(), 0);
        assertEq(tokenomics.pendingReward(nodeA, staker), 0);
        _assertCustody();
    }

    function test_Claim_NothingAccruedReturnsZeroWithoutTransfer() public {
        _stake(staker, nodeA, 5 * LAI);

        vm.recordLogs();
        vm.prank(staker);
        assertEq(tokenomics.claim(nodeA), 0);
        assertEq(vm.getRecordedLogs().length, 0);
    }

    // ------------------------------------------------------------------ epoch rewards

    /// Epoch 0: nodeA 100 tokens / 3 requests / uptime 100 %, nodeB 200 / 5 / 50 %,
    /// nodeC 400 / 0 / 25 %; then time moves to epoch 2, when epoch 0 is final.
    function _epochZeroActivity() internal {
        Tokenomics.Entry[] memory entries = new Tokenomics.Entry[](3);
        entries[0] = _entry(alice, nodeA, 1 * LAI, 100, 3);
        entries[1] = _entry(alice, nodeB, 1 * LAI, 200, 5);
        entries[2] = _entry(alice, nodeC, 1 * LAI, 400, 0);
        _settle(BATCH, entries);

        NetworkStatus.Entry[] memory up = new NetworkStatus.Entry[](3);
        up[0] = _statusEntry(nodeA, 10_000, 5_000);
        up[1] = _statusEntry(nodeB, 5_000, 5_000);
        up[2] = _statusEntry(nodeC, 2_500, 5_000);
        _post(0, up);
        _warpToEpoch(2);
    }

    // Emission 1_000 LAI, weights 50 % compute / 30 % requests / 20 % uptime; Σ tokens 700,
    // Σ requests 8, Σ uptime 17_500. Each term is rounded down on its own:
    //   A: 500e18·100/700 = 71_428571428571428571 + 300e18·3/8 = 112.5e18 + 200e18·10000/17500 = 114_285714285714285714
    //   B: 500e18·200/700 = 142_857142857142857142 + 300e18·5/8 = 187.5e18 + 200e18·5000/17500 = 57_142857142857142857
    //   C: 500e18·400/700 = 285_714285714285714285 + 0 + 200e18·2500/17500 = 28_571428571428571428
    uint256 internal constant REWARD_A = 298_214285714285714285;
    uint256 internal constant REWARD_B = 387_499999999999999999;
    uint256 internal constant REWARD_C = 314_285714285714285713;

    function test_EpochRewardOf_ExactFormula() public {
        _epochZeroActivity();

        assertEq(tokenomics.epochRewardOf(0, nodeA), REWARD_A);
        assertEq(tokenomics.epochRewardOf(0, nodeB), REWARD_B);
        assertEq(tokenomics.epochRewardOf(0, nodeC), REWARD_C);
    }

    function test_ClaimEpochReward_MintsExactRewardAndEmits() public {
        _epochZeroActivity();
        uint256 supply = token.totalSupply();
        uint256 balanceBefore = tokenomics.nodeBalance(nodeA);

        vm.expectEmit(address(tokenomics));
        emit Tokenomics.EpochRewardPaid(0, nodeA, REWARD_A);
        vm.prank(stranger); // anyone may trigger the payment; it always goes to the node
        uint256 reward = tokenomics.claimEpochReward(0, nodeA);

        assertEq(reward, REWARD_A);
        assertEq(tokenomics.nodeBalance(nodeA), balanceBefore + REWARD_A);
        assertEq(token.totalSupply(), supply + REWARD_A);
        assertEq(token.mintAllowance(address(tokenomics)), EMISSION_BUDGET - REWARD_A);
        assertTrue(tokenomics.rewardClaimed(0, nodeA));
        _assertCustody();
    }

    function test_ClaimEpochReward_AllNodesSumWithinEmission() public {
        _epochZeroActivity();
        uint256 sum = tokenomics.claimEpochReward(0, nodeA) + tokenomics.claimEpochReward(0, nodeB)
            + tokenomics.claimEpochReward(0, nodeC);

        assertEq(sum, REWARD_A + REWARD_B + REWARD_C);
        assertEq(EMISSION - sum, 3, "three terms rounded down by < 1 wei each");
    }

    function test_Revert_When_ClaimEpochRewardBeforeFinal() public {
        _settleOne(BATCH, alice, nodeA, 1 * LAI);
        vm.expectRevert(abi.encodeWithSelector(Tokenomics.EpochNotFinal.selector, 0, 0));
        tokenomics.claimEpochReward(0, nodeA);

        _warpToEpoch(1); // epoch 0's status may still be posted during epoch 1
        vm.expectRevert(abi.encodeWithSelector(Tokenomics.EpochNotFinal.selector, 0, 1));
        tokenomics.claimEpochReward(0, nodeA);
    }

    function test_Revert_When_ClaimEpochRewardTwice() public {
        _epochZeroActivity();
        tokenomics.claimEpochReward(0, nodeA);

        vm.expectRevert(abi.encodeWithSelector(Tokenomics.AlreadyClaimed.selector, 0, nodeA));
        tokenomics.claimEpochReward(0, nodeA);
    }

    function test_ClaimEpochReward_EmissionFixedByFirstClaim() public {
        _epochZeroActivity();
        tokenomics.claimEpochReward(0, nodeA);
        vm.prank(admin);
        tokenomics.setEmission(2 * EMISSION);

        assertEq(tokenomics.epochEmission(0), EMISSION);
        assertEq(tokenomics.epochEmission(1), 2 * EMISSION);
        assertEq(tokenomics.claimEpochReward(0, nodeB), REWARD_B);
    }

    function test_ClaimEpochReward_IdleNodeGetsNothing() public {
        _epochZeroActivity();
        uint256 supply = token.totalSupply();

        vm.recordLogs();
        assertEq(tokenomics.claimEpochReward(0, stranger), 0);

        assertEq(vm.getRecordedLogs().length, 0);
        assertEq(token.totalSupply(), supply);
        assertTrue(tokenomics.rewardClaimed(0, stranger));
    }

    function test_ClaimEpochReward_ZeroEmissionPaysNothing() public {
        vm.prank(admin);
        tokenomics.setEmission(0);
        _epochZeroActivity();

        assertEq(tokenomics.epochRewardOf(0, nodeA), 0);
        assertEq(tokenomics.claimEpochReward(0, nodeA), 0);
        assertEq(tokenomics.nodeBalance(nodeA), 0.95e18);
    }

    function test_Revert_When_EmissionBudgetExhausted() public {
        _epochZeroActivity();
        vm.prank(admin);
        token.setMintAllowance(address(tokenomics), 1);

        vm.expectRevert(
            abi.encodeWithSelector(LAIToken.MintAllowanceExceeded.selector, address(tokenomics), REWARD_A, 1)
        );
        tokenomics.claimEpochReward(0, nodeA);
        assertFalse(tokenomics.rewardClaimed(0, nodeA));
    }

    function testFuzz_EpochRewards_SumNeverExceedsEmission(
        uint64[3] memory tokens,
        uint32[3] memory requests,
        uint16[3] memory uptime,
        uint256 emission
    ) public {
        emission = bound(emission, 1, 10_000_000 * LAI);
        vm.prank(admin);
        tokenomics.setEmission(emission);
        address[3] memory nodes = [nodeA, nodeB, nodeC];
        Tokenomics.Entry[] memory entries = new Tokenomics.Entry[](3);
        NetworkStatus.Entry[] memory up = new NetworkStatus.Entry[](3);
        uint256[3] memory totals;
        for (uint256 i; i < 3; ++i) {
            tokens[i] = uint64(bound(tokens[i], 0, 1e15));
            requests[i] = uint32(bound(requests[i], 0, 1e6));
            uptime[i] = uint16(bound(uptime[i], 0, 10_000));
            entries[i] = _entry(alice, nodes[i], 0, tokens[i], requests[i]);
            up[i] = _statusEntry(nodes[i], uptime[i], 5_000);
            totals[0] += tokens[i];
            totals[1] += requests[i];
            totals[2] += uptime[i];
        }
        bool allTermsPaid = totals[0] != 0 && totals[1] != 0 && totals[2] != 0;
        _settle(BATCH, entries);
        _post(0, up);
        _warpToEpoch(2);

        uint256 sum;
        for (uint256 i; i < 3; ++i) {
            sum += tokenomics.claimEpochReward(0, nodes[i]);
        }

        assertLe(sum, emission);
        if (allTermsPaid) assertLt(emission - sum, 9, "at most 3 terms x 3 nodes rounded down");
        assertEq(token.mintAllowance(address(tokenomics)), EMISSION_BUDGET - sum);
    }
}
