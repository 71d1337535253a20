// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Base} from "./Base.t.sol";
import {NetworkStatus} from "../src/NetworkStatus.sol";

contract NetworkStatusTest is Base {
    address internal nodeA = makeAddr("nodeA");
    address internal nodeB = makeAddr("nodeB");

    bytes32 internal constant ROOT = keccak256("root");

    event StatusPosted(uint64 indexed epoch, bytes32 root, uint256 entries);
    event MinReputationSet(uint16 minReputation);
    event ReputationUpdated(address indexed node, uint16 reputation, bool active);

    function setUp() public override {
        super.setUp();
        _registerNode(nodeA, MIN_STAKE);
        _registerNode(nodeB, MIN_STAKE);
    }

    function _entries(NetworkStatus.Entry memory a) internal pure returns (NetworkStatus.Entry[] memory list) {
        list = new NetworkStatus.Entry[](1);
        list[0] = a;
    }

    function _entries(NetworkStatus.Entry memory a, NetworkStatus.Entry memory b)
        internal
        pure
        returns (NetworkStatus.Entry[] memory list)
    {
        list = new NetworkStatus.Entry[](2);
        (list[0], list[1]) = (a, b);
    }

    function _postRoot(uint64 epoch, NetworkStatus.Entry[] memory entries) internal {
        vm.prank(operator);
        status.post(epoch, ROOT, entries);
    }

    // ------------------------------------------------------------------ constructor and epochs

    function test_Constructor_SetsParametersAndRoles() public view {
        assertEq(address(status.registry()), address(registry));
        assertEq(status.genesis(), START);
        assertEq(status.epochLength(), EPOCH_LENGTH);
        assertEq(status.minReputation(), MIN_REPUTATION);
        assertTrue(status.hasRole(status.DEFAULT_ADMIN_ROLE(), admin));
        assertTrue(status.hasRole(status.GOVERNOR_ROLE(), admin));
        assertTrue(status.hasRole(status.REPORTER_ROLE(), operator));
    }

    function test_Revert_When_DeployedWithZeroEpochLength() public {
        vm.expectRevert(NetworkStatus.ZeroEpochLength.selector);
        new NetworkStatus(admin, registry, 0, MIN_REPUTATION);
    }

    function test_Revert_When_DeployedWithMinReputationOutOfRange() public {
        vm.expectRevert(abi.encodeWithSelector(NetworkStatus.OutOfRange.selector, 10_001));
        new NetworkStatus(admin, registry, EPOCH_LENGTH, 10_001);
    }

    function test_CurrentEpoch_AdvancesEveryEpochLength() public {
        assertEq(status.currentEpoch(), 0);
        vm.warp(START + EPOCH_LENGTH - 1);
        assertEq(status.currentEpoch(), 0);
        vm.warp(START + EPOCH_LENGTH);
        assertEq(status.currentEpoch(), 1);
        vm.warp(START + 10 * EPOCH_LENGTH + 5);
        assertEq(status.currentEpoch(), 10);
    }

    // ------------------------------------------------------------------ post

    function test_Post_RecordsRootUptimeAndReputationAndEmits() public {
        NetworkStatus.Entry[] memory entries =
            _entries(_statusEntry(nodeA, 9_500, 7_000), _statusEntry(nodeB, 4_000, 6_000));

        vm.expectEmit(address(registry));
        emit ReputationUpdated(nodeA, 7_000, true);
        vm.expectEmit(address(registry));
        emit ReputationUpdated(nodeB, 6_000, true);
        vm.expectEmit(address(status));
        emit StatusPosted(0, ROOT, 2);
        _postRoot(0, entries);

        assertEq(status.rootOf(0), ROOT);
        assertEq(status.uptimeOf(0, nodeA), 9_500);
        assertEq(status.uptimeOf(0, nodeB), 4_000);
        assertEq(status.totalUptime(0), 13_500);
        assertEq(registry.getNode(nodeA).reputation, 7_000);
        assertEq(registry.getNode(nodeB).reputation, 6_000);
    }

    function test_Post_SameNodeAgainReplacesItsUptime() public {
        _postRoot(0, _entries(_statusEntry(nodeA, 9_000, 5_000), _statusEntry(nodeB, 3_000, 5_000)));
        _postRoot(0, _entries(_statusEntry(nodeA, 5_000, 5_000)));

        assertEq(status.uptimeOf(0, nodeA), 5_000);
        assertEq(status.totalUptime(0), 8_000);
    }

    function test_Post_PreviousEpochIsStillOpen() public {
        _warpToEpoch(1);
        _postRoot(0, _entries(_statusEntry(nodeA, 10_000, 5_000)));

        assertEq(status.uptimeOf(0, nodeA), 10_000);
        assertEq(status.totalUptime(1), 0);
    }

    function test_Post_UnknownNodeRecordsUptimeOnly() public {
        address ghost = makeAddr("ghost");
        _postRoot(0, _entries(_statusEntry(ghost, 10_000, 9_000)));

        assertEq(status.uptimeOf(0, ghost), 10_000);
        assertFalse(registry.getNode(ghost).registered);
    }

    function test_Post_BelowMinReputationMakesNodeInactive() public {
        _postRoot(0, _entries(_statusEntry(nodeA, 10_000, MIN_REPUTATION - 1)));
        assertFalse(registry.isActive(nodeA));

        _postRoot(0, _entries(_statusEntry(nodeA, 10_000, MIN_REPUTATION)));
        assertTrue(registry.isActive(nodeA));
    }

    function test_Post_AcceptsBoundaryValues() public {
        NetworkStatus.Entry[] memory entries = new NetworkStatus.Entry[](status.MAX_ENTRIES());
        for (uint256 i; i < entries.length; ++i) {
            entries[i] = _statusEntry(vm.addr(0x1000 + i), 10_000, 10_000);
        }
        _postRoot(0, entries);

        assertEq(status.totalUptime(0), 10_000 * entries.length);
    }

    function test_Revert_When_PostingFutureEpoch() public {
        vm.expectRevert(abi.encodeWithSelector(NetworkStatus.EpochNotStarted.selector, 1, 0));
        _postRoot(1, _entries(_statusEntry(nodeA, 1, 1)));
    }

    function test_Revert_When_PostingClosedEpoch() public {
        _warpToEpoch(2);
        vm.expectRevert(abi.encodeWithSelector(NetworkStatus.EpochClosed.selector, 0, 2));
        _postRoot(0, _entries(_statusEntry(nodeA, 1, 1)));
    }

    function test_Revert_When_PostingTooManyEntries() public {
        uint256 n = status.MAX_ENTRIES() + 1;
        vm.expectRevert(abi.encodeWithSelector(NetworkStatus.TooManyEntries.selector, n, n - 1));
        _postRoot(0, new NetworkStatus.Entry[](n));
    }

    function test_Revert_When_UptimeOutOfRange() public {
        vm.expectRevert(abi.encodeWithSelector(NetworkStatus.OutOfRange.selector, 10_001));
        _postRoot(0, _entries(_statusEntry(nodeA, 10_001, 5_000)));
    }

    function test_Revert_When_ReputationOutOfRange() public {
        vm.expectRevert(abi.encodeWithSelector(NetworkStatus.OutOfRange.selector, 10_001));
        _postRoot(0, _entries(_statusEntry(nodeA, 5_000, 10_001)));
    }

    function test_Revert_When_PostByNonReporter() public {
        NetworkStatus.Entry[] memory entries = _entries(_statusEntry(nodeA, 1, 1));
        vm.expectRevert(_unauthorized(stranger, status.REPORTER_ROLE()));
        vm.prank(stranger);
        status.post(0, ROOT, entries);
    }

    function test_Revert_When_StatusLacksRegistryRole() public {
        bytes32 role = registry.STATUS_ROLE();
        vm.prank(admin);
        registry.revokeRole(role, address(status));

        vm.expectRevert(_unauthorized(address(status), registry.STATUS_ROLE()));
        _postRoot(0, _entries(_statusEntry(nodeA, 1, 1)));
    }

    // ------------------------------------------------------------------ setMinReputation

    function test_SetMinReputation_AppliesToLaterPostsAndEmits() public {
        vm.expectEmit(address(status));
        emit MinReputationSet(8_000);
        vm.prank(admin);
        status.setMinReputation(8_000);
        assertEq(status.minReputation(), 8_000);

        _postRoot(0, _entries(_statusEntry(nodeA, 10_000, 7_999)));
        assertFalse(registry.isActive(nodeA));
    }

    function test_Revert_When_MinReputationOutOfRange() public {
        vm.expectRevert(abi.encodeWithSelector(NetworkStatus.OutOfRange.selector, 10_001));
        vm.prank(admin);
        status.setMinReputation(10_001);
    }

    function test_Revert_When_SetMinReputationByNonGovernor() public {
        vm.expectRevert(_unauthorized(operator, status.GOVERNOR_ROLE()));
        vm.prank(operator);
        status.setMinReputation(0);
    }
}
