// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Base} from "./Base.t.sol";
import {NodeRegistry} from "../src/NodeRegistry.sol";

contract NodeRegistryTest is Base {
    address internal node = makeAddr("node");

    event NodeRegistered(
        address indexed node,
        address indexed staker,
        NodeRegistry.Kind kind,
        string[] models,
        uint128 priceIn,
        uint128 priceOut,
        string metadataUri,
        uint256 stake
    );
    event OfferUpdated(
        address indexed node,
        NodeRegistry.Kind kind,
        string[] models,
        uint128 priceIn,
        uint128 priceOut,
        string metadataUri
    );
    event StakeAdded(address indexed node, address indexed from, uint256 amount);
    event UnstakeRequested(address indexed node, uint256 amount, uint64 availableAt);
    event StakeWithdrawn(address indexed node, address indexed to, uint256 amount);
    event Slashed(address indexed node, uint256 amount, string reason);
    event ReputationUpdated(address indexed node, uint16 reputation, bool active);
    event ParametersSet(uint256 minStake, uint64 unbondingDelay, address treasury);

    function _longString(uint256 length) internal pure returns (string memory) {
        return string(new bytes(length));
    }

    function _offerWithModels(uint256 count) internal pure returns (NodeRegistry.Offer memory offer) {
        offer = _offer();
        offer.models = new string[](count);
        for (uint256 i; i < count; ++i) {
            offer.models[i] = "m";
        }
    }

    function _approve(address from, uint256 amount) internal {
        _fund(from, amount);
        vm.prank(from);
        token.approve(address(registry), amount);
    }

    function _assertLocked() internal view {
        assertEq(token.balanceOf(address(registry)), registry.totalLocked(), "token held != totalLocked");
    }

    // ------------------------------------------------------------------ constructor

    function test_Constructor_SetsParametersAndRoles() public view {
        assertEq(address(registry.token()), address(token));
        assertEq(registry.treasury(), treasury);
        assertEq(registry.minStake(), MIN_STAKE);
        assertEq(registry.unbondingDelay(), UNBONDING_DELAY);
        assertTrue(registry.hasRole(registry.DEFAULT_ADMIN_ROLE(), admin));
        assertTrue(registry.hasRole(registry.GOVERNOR_ROLE(), admin));
    }

    // ------------------------------------------------------------------ register

    function test_Register_BySelf_LocksStakeAndEmits() public {
        NodeRegistry.Offer memory offer = _offer();
        _approve(node, MIN_STAKE);

        vm.expectEmit(address(registry));
        emit NodeRegistered(
            node, node, offer.kind, offer.models, offer.priceIn, offer.priceOut, offer.metadataUri, MIN_STAKE
        );
        vm.prank(node);
        registry.register(node, offer, MIN_STAKE);

        NodeRegistry.Node memory n = registry.getNode(node);
        assertEq(n.staker, node);
        assertTrue(n.registered);
        assertTrue(n.active);
        assertEq(n.reputation, 5_000);
        assertEq(n.stake, MIN_STAKE);
        assertEq(n.unbonding, 0);
        assertEq(n.offer.models.length, 2);
        assertEq(n.offer.models[1], "qwen-2.5-7b");
        assertEq(n.offer.priceOut, 300);
        assertEq(n.offer.metadataUri, "ipfs://node");
        assertTrue(registry.isActive(node));
        assertEq(registry.stakeOf(node), MIN_STAKE);
        assertEq(registry.totalLocked(), MIN_STAKE);
        assertEq(token.balanceOf(node), 0);
        _assertLocked();
    }

    function test_Register_ByRegistrar_RegistrarBecomesStaker() public {
        _approve(operator, MIN_STAKE);
        vm.prank(operator);
        registry.register(node, _offer(), MIN_STAKE);

        assertEq(registry.getNode(node).staker, operator);
        assertEq(token.balanceOf(operator), 0);
        _assertLocked();
    }

    function test_Register_WithoutModelsOrUri() public {
        NodeRegistry.Offer memory offer = _offerWithModels(0);
        offer.metadataUri = "";
        offer.kind = NodeRegistry.Kind.Agent;
        _approve(node, MIN_STAKE);
        vm.prank(node);
        registry.register(node, offer, MIN_STAKE);

        assertEq(uint8(registry.getNode(node).offer.kind), uint8(NodeRegistry.Kind.Agent));
    }

    function test_Revert_When_RegisteringAnotherNodeWithoutRegistrarRole() public {
        _approve(stranger, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotAuthorized.selector, stranger, node));
        vm.prank(stranger);
        registry.register(node, _offer(), MIN_STAKE);
    }

    function test_Revert_When_RegisteringTwice() public {
        _registerNode(node, MIN_STAKE);
        _approve(node, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.AlreadyRegistered.selector, node));
        vm.prank(node);
        registry.register(node, _offer(), MIN_STAKE);
    }

    function test_Revert_When_StakeBelowMinimum() public {
        _approve(node, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.StakeTooLow.selector, MIN_STAKE - 1, MIN_STAKE));
        vm.prank(node);
        registry.register(node, _offer(), MIN_STAKE - 1);
    }

    function test_Revert_When_TooManyModels() public {
        _approve(node, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.TooManyModels.selector, 17, 16));
        vm.prank(node);
        registry.register(node, _offerWithModels(17), MIN_STAKE);
    }

    function test_Revert_When_ModelNameTooLong() public {
        NodeRegistry.Offer memory offer = _offer();
        offer.models[1] = _longString(257);
        _approve(node, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.StringTooLong.selector, 257, 256));
        vm.prank(node);
        registry.register(node, offer, MIN_STAKE);
    }

    function test_Revert_When_MetadataUriTooLong() public {
        NodeRegistry.Offer memory offer = _offer();
        offer.metadataUri = _longString(257);
        _approve(node, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.StringTooLong.selector, 257, 256));
        vm.prank(node);
        registry.register(node, offer, MIN_STAKE);
    }

    function test_Register_AcceptsLimits() public {
        NodeRegistry.Offer memory offer = _offerWithModels(16);
        offer.models[0] = _longString(256);
        offer.metadataUri = _longString(256);
        _approve(node, MIN_STAKE);
        vm.prank(node);
        registry.register(node, offer, MIN_STAKE);

        assertEq(registry.getNode(node).offer.models.length, 16);
    }

    // ------------------------------------------------------------------ updateOffer

    function test_UpdateOffer_BySelfReplacesOfferAndEmits() public {
        _registerNode(node, MIN_STAKE);
        NodeRegistry.Offer memory offer = _offerWithModels(1);
        offer.kind = NodeRegistry.Kind.Knowledge;
        offer.priceIn = 7;
        offer.priceOut = 9;
        offer.metadataUri = "https://node.example";

        vm.expectEmit(address(registry));
        emit OfferUpdated(node, offer.kind, offer.models, 7, 9, "https://node.example");
        vm.prank(node);
        registry.updateOffer(node, offer);

        NodeRegistry.Offer memory stored = registry.getNode(node).offer;
        assertEq(uint8(stored.kind), uint8(NodeRegistry.Kind.Knowledge));
        assertEq(stored.models.length, 1);
        assertEq(stored.priceIn, 7);
        assertEq(stored.metadataUri, "https://node.example");
    }

    function test_UpdateOffer_ByRegistrar() public {
        _registerNode(node, MIN_STAKE);
        NodeRegistry.Offer memory offer = _offer();
        offer.priceIn = 1;
        vm.prank(operator);
        registry.updateOffer(node, offer);

        assertEq(registry.getNode(node).offer.priceIn, 1);
    }

    function test_Revert_When_UpdateOfferByStranger() public {
        _registerNode(node, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotAuthorized.selector, stranger, node));
        vm.prank(stranger);
        registry.updateOffer(node, _offer());
    }

    function test_Revert_When_UpdateOfferOfUnregisteredNode() public {
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotRegistered.selector, node));
        vm.prank(node);
        registry.updateOffer(node, _offer());
    }

    function test_Revert_When_UpdateOfferWithTooManyModels() public {
        _registerNode(node, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.TooManyModels.selector, 17, 16));
        vm.prank(node);
        registry.updateOffer(node, _offerWithModels(17));
    }

    // ------------------------------------------------------------------ addStake

    function test_AddStake_ByAnyoneIncreasesStakeAndEmits() public {
        _registerNode(node, MIN_STAKE);
        _approve(stranger, 5 * LAI);

        vm.expectEmit(address(registry));
        emit StakeAdded(node, stranger, 5 * LAI);
        vm.prank(stranger);
        registry.addStake(node, 5 * LAI);

        assertEq(registry.stakeOf(node), 15 * LAI);
        assertEq(registry.totalLocked(), 15 * LAI);
        _assertLocked();
    }

    function test_Revert_When_AddStakeZero() public {
        _registerNode(node, MIN_STAKE);
        vm.expectRevert(NodeRegistry.ZeroAmount.selector);
        vm.prank(node);
        registry.addStake(node, 0);
    }

    function test_Revert_When_AddStakeToUnregisteredNode() public {
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotRegistered.selector, node));
        registry.addStake(node, 1);
    }

    // ------------------------------------------------------------------ requestUnstake / withdrawStake

    function test_RequestUnstake_StartsUnbondingAndEmits() public {
        _registerNode(node, 15 * LAI);
        uint64 availableAt = uint64(block.timestamp) + UNBONDING_DELAY;

        vm.expectEmit(address(registry));
        emit UnstakeRequested(node, 5 * LAI, availableAt);
        vm.prank(node);
        registry.requestUnstake(node, 5 * LAI);

        NodeRegistry.Node memory n = registry.getNode(node);
        assertEq(n.stake, 10 * LAI);
        assertEq(n.unbonding, 5 * LAI);
        assertEq(n.unbondingEnds, availableAt);
        assertTrue(n.active);
        assertEq(registry.totalLocked(), 15 * LAI, "unbonding stays locked");
    }

    function test_RequestUnstake_BelowMinimumDeactivates() public {
        _registerNode(node, MIN_STAKE);

        vm.expectEmit(address(registry));
        emit ReputationUpdated(node, 5_000, false);
        vm.prank(node);
        registry.requestUnstake(node, 1);

        assertFalse(registry.getNode(node).active);
        assertFalse(registry.isActive(node));
    }

    function test_RequestUnstake_ByRegistrarThatStaked() public {
        _approve(operator, MIN_STAKE);
        vm.prank(operator);
        registry.register(node, _offer(), MIN_STAKE);

        vm.prank(operator);
        registry.requestUnstake(node, 1 * LAI);

        assertEq(registry.getNode(node).unbonding, 1 * LAI);
    }

    function test_Revert_When_RequestUnstakeByStranger() public {
        _registerNode(node, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotAuthorized.selector, stranger, node));
        vm.prank(stranger);
        registry.requestUnstake(node, 1);
    }

    function test_Revert_When_RequestUnstakeByRegistrarThatDidNotStake() public {
        _registerNode(node, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotAuthorized.selector, operator, node));
        vm.prank(operator);
        registry.requestUnstake(node, 1);
    }

    function test_Revert_When_RequestUnstakeZero() public {
        _registerNode(node, MIN_STAKE);
        vm.expectRevert(NodeRegistry.ZeroAmount.selector);
        vm.prank(node);
        registry.requestUnstake(node, 0);
    }

    function test_Revert_When_RequestUnstakeExceedsStake() public {
        _registerNode(node, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.AmountExceedsStake.selector, MIN_STAKE + 1, MIN_STAKE));
        vm.prank(node);
        registry.requestUnstake(node, MIN_STAKE + 1);
    }

    function test_Revert_When_RequestUnstakeOfUnregisteredNode() public {
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotRegistered.selector, node));
        vm.prank(node);
        registry.requestUnstake(node, 1);
    }

    function test_Revert_When_WithdrawStakeBeforeUnbondingEnds() public {
        _registerNode(node, MIN_STAKE);
        vm.prank(node);
        registry.requestUnstake(node, MIN_STAKE);
        uint64 availableAt = uint64(block.timestamp) + UNBONDING_DELAY;

        vm.warp(availableAt - 1);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.UnbondingNotOver.selector, availableAt));
        vm.prank(node);
        registry.withdrawStake(node);
    }

    function test_WithdrawStake_AfterUnbondingPaysStakerAndEmits() public {
        _registerNode(node, MIN_STAKE);
        vm.prank(node);
        registry.requestUnstake(node, 4 * LAI);
        vm.warp(block.timestamp + UNBONDING_DELAY);

        vm.expectEmit(address(registry));
        emit StakeWithdrawn(node, node, 4 * LAI);
        vm.prank(node);
        registry.withdrawStake(node);

        NodeRegistry.Node memory n = registry.getNode(node);
        assertEq(n.unbonding, 0);
        assertEq(n.stake, 6 * LAI);
        assertEq(token.balanceOf(node), 4 * LAI);
        assertEq(registry.totalLocked(), 6 * LAI);
        _assertLocked();
    }

    function test_WithdrawStake_ByNodePaysTheRegistrarThatStaked() public {
        _approve(operator, MIN_STAKE);
        vm.prank(operator);
        registry.register(node, _offer(), MIN_STAKE);

        vm.prank(node);
        registry.requestUnstake(node, MIN_STAKE);
        vm.warp(block.timestamp + UNBONDING_DELAY);
        vm.prank(node);
        registry.withdrawStake(node);

        assertEq(token.balanceOf(operator), MIN_STAKE);
        assertEq(token.balanceOf(node), 0);
    }

    function test_WithdrawStake_ByRegistrarThatStaked() public {
        _approve(operator, MIN_STAKE);
        vm.prank(operator);
        registry.register(node, _offer(), MIN_STAKE);

        vm.prank(operator);
        registry.requestUnstake(node, MIN_STAKE);
        vm.warp(block.timestamp + UNBONDING_DELAY);
        vm.prank(operator);
        registry.withdrawStake(node);

        assertEq(token.balanceOf(operator), MIN_STAKE);
    }

    function test_RequestUnstake_NewRequestRestartsTheClock() public {
        _registerNode(node, 20 * LAI);
        vm.prank(node);
        registry.requestUnstake(node, 1 * LAI);
        vm.warp(block.timestamp + UNBONDING_DELAY - 1);
        vm.prank(node);
        registry.requestUnstake(node, 2 * LAI);
        uint64 restartedEnd = uint64(block.timestamp) + UNBONDING_DELAY;

        vm.warp(block.timestamp + 1);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.UnbondingNotOver.selector, restartedEnd));
        vm.prank(node);
        registry.withdrawStake(node);

        vm.warp(restartedEnd);
        vm.prank(node);
        registry.withdrawStake(node);
        assertEq(token.balanceOf(node), 3 * LAI);
    }

    function test_Revert_When_WithdrawStakeWithNothingUnbonding() public {
        _registerNode(node, MIN_STAKE);
        vm.expectRevert(NodeRegistry.NothingToWithdraw.selector);
        vm.prank(node);
        registry.withdrawStake(node);
    }

    function test_Revert_When_WithdrawStakeByStranger() public {
        _registerNode(node, MIN_STAKE);
        vm.prank(node);
        registry.requestUnstake(node, 1);
        vm.warp(block.timestamp + UNBONDING_DELAY);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotAuthorized.selector, stranger, node));
        vm.prank(stranger);
        registry.withdrawStake(node);
    }

    function test_Revert_When_WithdrawStakeOfUnregisteredNode() public {
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotRegistered.selector, node));
        vm.prank(node);
        registry.withdrawStake(node);
    }

    // ------------------------------------------------------------------ slash

    function test_Slash_TakesStakeThenUnbondingToTreasury() public {
        _registerNode(node, 15 * LAI);
        vm.prank(node);
        registry.requestUnstake(node, 3 * LAI); // stake 12, unbonding 3

        vm.expectEmit(address(registry));
        emit ReputationUpdated(node, 5_000, false);
        vm.expectEmit(address(registry));
        emit Slashed(node, 14 * LAI, "double-signed receipts");
        vm.prank(admin);
        registry.slash(node, 14 * LAI, "double-signed receipts");

        NodeRegistry.Node memory n = registry.getNode(node);
        assertEq(n.stake, 0);
        assertEq(n.unbonding, 1 * LAI);
        assertEq(n.slashed, 14 * LAI);
        assertFalse(n.active);
        assertFalse(registry.isActive(node));
        assertEq(token.balanceOf(treasury), 14 * LAI);
        assertEq(registry.totalLocked(), 1 * LAI);
        _assertLocked();
    }

    function test_Slash_PartialKeepsNodeActiveAboveMinimum() public {
        _registerNode(node, 15 * LAI);
        vm.prank(admin);
        registry.slash(node, 5 * LAI, "downtime");

        assertTrue(registry.isActive(node));
        assertEq(registry.stakeOf(node), MIN_STAKE);
    }

    function test_Slash_MoreThanEverythingTakesWhatIsThere() public {
        _registerNode(node, MIN_STAKE);
        vm.prank(node);
        registry.requestUnstake(node, 4 * LAI);

        vm.expectEmit(address(registry));
        emit Slashed(node, MIN_STAKE, "fraud");
        vm.prank(admin);
        registry.slash(node, 1_000 * LAI, "fraud");

        assertEq(token.balanceOf(treasury), MIN_STAKE);
        assertEq(registry.totalLocked(), 0);
        vm.expectRevert(NodeRegistry.NothingToWithdraw.selector);
        vm.prank(node);
        registry.withdrawStake(node);
    }

    function test_Slash_EmptyNodeTakesNothing() public {
        _registerNode(node, MIN_STAKE);
        vm.startPrank(admin);
        registry.slash(node, MIN_STAKE, "first");
        vm.expectEmit(address(registry));
        emit Slashed(node, 0, "second");
        registry.slash(node, 1, "second");
        vm.stopPrank();

        assertEq(registry.getNode(node).slashed, MIN_STAKE);
        assertEq(token.balanceOf(treasury), MIN_STAKE);
    }

    function test_Slash_PaysTheCurrentTreasury() public {
        _registerNode(node, MIN_STAKE);
        address newTreasury = makeAddr("newTreasury");
        vm.startPrank(admin);
        registry.setParameters(MIN_STAKE, UNBONDING_DELAY, newTreasury);
        registry.slash(node, 1 * LAI, "late");
        vm.stopPrank();

        assertEq(token.balanceOf(newTreasury), 1 * LAI);
        assertEq(token.balanceOf(treasury), 0);
    }

    function test_Revert_When_SlashZero() public {
        _registerNode(node, MIN_STAKE);
        vm.expectRevert(NodeRegistry.ZeroAmount.selector);
        vm.prank(admin);
        registry.slash(node, 0, "none");
    }

    function test_Revert_When_SlashReasonTooLong() public {
        _registerNode(node, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.StringTooLong.selector, 257, 256));
        vm.prank(admin);
        registry.slash(node, 1, _longString(257));
    }

    function test_Revert_When_SlashUnregisteredNode() public {
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotRegistered.selector, node));
        vm.prank(admin);
        registry.slash(node, 1, "ghost");
    }

    function test_Revert_When_SlashByNonGovernor() public {
        _registerNode(node, MIN_STAKE);
        vm.expectRevert(_unauthorized(operator, registry.GOVERNOR_ROLE()));
        vm.prank(operator);
        registry.slash(node, 1, "not yours");
    }

    // ------------------------------------------------------------------ setReputation

    function test_SetReputation_AboveMinimumKeepsActiveAndEmits() public {
        _registerNode(node, MIN_STAKE);
        vm.expectEmit(address(registry));
        emit ReputationUpdated(node, 8_000, true);
        vm.prank(address(status));
        registry.setReputation(node, 8_000, MIN_REPUTATION);

        assertEq(registry.getNode(node).reputation, 8_000);
        assertTrue(registry.isActive(node));
    }

    function test_SetReputation_BelowMinimumDeactivatesAndRecovers() public {
        _registerNode(node, MIN_STAKE);
        vm.startPrank(address(status));
        registry.setReputation(node, MIN_REPUTATION - 1, MIN_REPUTATION);
        assertFalse(registry.isActive(node));
        registry.setReputation(node, MIN_REPUTATION, MIN_REPUTATION);
        vm.stopPrank();

        assertTrue(registry.isActive(node));
    }

    function test_SetReputation_StaysInactiveWithoutMinimumStake() public {
        _registerNode(node, MIN_STAKE);
        vm.prank(node);
        registry.requestUnstake(node, 1);

        vm.expectEmit(address(registry));
        emit ReputationUpdated(node, 10_000, false);
        vm.prank(address(status));
        registry.setReputation(node, 10_000, MIN_REPUTATION);

        assertFalse(registry.isActive(node));
    }

    function test_SetReputation_UnknownNodeChangesNothing() public {
        vm.recordLogs();
        vm.prank(address(status));
        registry.setReputation(node, 9_000, MIN_REPUTATION);

        assertEq(vm.getRecordedLogs().length, 0);
        assertFalse(registry.getNode(node).registered);
        assertEq(registry.getNode(node).reputation, 0);
    }

    function test_Revert_When_SetReputationByNonStatus() public {
        _registerNode(node, MIN_STAKE);
        vm.expectRevert(_unauthorized(admin, registry.STATUS_ROLE()));
        vm.prank(admin);
        registry.setReputation(node, 0, MIN_REPUTATION);
    }

    // ------------------------------------------------------------------ setParameters

    function test_SetParameters_UpdatesAndEmits() public {
        vm.expectEmit(address(registry));
        emit ParametersSet(20 * LAI, 2 days, stranger);
        vm.prank(admin);
        registry.setParameters(20 * LAI, 2 days, stranger);

        assertEq(registry.minStake(), 20 * LAI);
        assertEq(registry.unbondingDelay(), 2 days);
        assertEq(registry.treasury(), stranger);
    }

    function test_SetParameters_HigherMinimumMakesExistingNodeInactive() public {
        _registerNode(node, MIN_STAKE);
        vm.prank(admin);
        registry.setParameters(MIN_STAKE + 1, UNBONDING_DELAY, treasury);

        assertFalse(registry.isActive(node));
    }

    function test_Revert_When_SetParametersByNonGovernor() public {
        vm.expectRevert(_unauthorized(stranger, registry.GOVERNOR_ROLE()));
        vm.prank(stranger);
        registry.setParameters(1, 1, stranger);
    }
}
