// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {CommonBase} from "forge-std/Base.sol";
import {StdUtils} from "forge-std/StdUtils.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {LAIToken} from "../../src/LAIToken.sol";
import {UserRegistry} from "../../src/UserRegistry.sol";
import {NodeRegistry} from "../../src/NodeRegistry.sol";
import {NetworkStatus} from "../../src/NetworkStatus.sol";
import {Tokenomics} from "../../src/Tokenomics.sol";

/// Drives the whole protocol with bounded random actions over a small, fixed cast of users, nodes
/// and stakers, and keeps the ghost records the invariants compare the contracts with.
contract ProtocolHandler is CommonBase, StdUtils {
    uint256 internal constant LAI = 1e18;

    LAIToken public immutable token;
    UserRegistry public immutable users;
    NodeRegistry public immutable registry;
    NetworkStatus public immutable status;
    Tokenomics public immutable tokenomics;
    address public immutable admin;
    address public immutable operator;
    address public immutable treasury;

    address[] public userActors;
    address[] public nodeActors;
    address[] public stakerActors;
    bytes32[] public settleIds;
    bytes32[] public grantIds;
    bytes32[] public withdrawIds;

    /// Everything minted, by anyone, since the token was deployed.
    uint256 public ghostMinted;
    mapping(bytes32 id => uint256) public settleApplications;
    mapping(bytes32 id => uint256) public grantApplications;
    mapping(bytes32 id => uint256) public withdrawApplications;
    /// Calls that must always succeed (claims, settlements, grants within budget) but reverted.
    uint256 public unexpectedReverts;
    /// Block time, re-applied at the start of every action so warps persist across calls.
    uint256 public currentTime;

    constructor(
        LAIToken token_,
        UserRegistry users_,
        NodeRegistry registry_,
        NetworkStatus status_,
        Tokenomics tokenomics_,
        address admin_,
        address operator_,
        address treasury_
    ) {
        (token, users, registry, status, tokenomics) = (token_, users_, registry_, status_, tokenomics_);
        (admin, operator, treasury) = (admin_, operator_, treasury_);
        currentTime = block.timestamp;
        for (uint256 i; i < 4; ++i) {
            userActors.push(vm.addr(0xA11CE0 + i));
            stakerActors.push(vm.addr(0x57A4E0 + i));
        }
        for (uint256 i; i < 3; ++i) {
            nodeActors.push(vm.addr(0x90DE0 + i));
        }
        for (uint256 i; i < 6; ++i) {
            settleIds.push(keccak256(abi.encode("settle", i)));
        }
        for (uint256 i; i < 3; ++i) {
            grantIds.push(keccak256(abi.encode("grant", i)));
            withdrawIds.push(keccak256(abi.encode("withdraw", i)));
        }
        // Two nodes stake for themselves, the operator sponsors the third.
        uint256 minStake = registry.minStake();
        for (uint256 i; i < 3; ++i) {
            address staker = i < 2 ? nodeActors[i] : operator;
            uint256 amount = minStake + i * 5 * LAI;
            _mint(staker, amount);
            vm.startPrank(staker);
            token.approve(address(registry), amount);
            registry.register(nodeActors[i], _offer(), amount);
            vm.stopPrank();
        }
    }

    modifier action() {
        vm.warp(currentTime);
        _;
    }

    // ------------------------------------------------------------------ views for the invariants

    function userCount() external view returns (uint256) {
        return userActors.length;
    }

    function nodeCount() external view returns (uint256) {
        return nodeActors.length;
    }

    function stakerCount() external view returns (uint256) {
        return stakerActors.length;
    }

    function settleIdCount() external view returns (uint256) {
        return settleIds.length;
    }

    function grantIdCount() external view returns (uint256) {
        return grantIds.length;
    }

    function withdrawIdCount() external view returns (uint256) {
        return withdrawIds.length;
    }

    // ------------------------------------------------------------------ users

    function deposit(uint256 userSeed, uint256 amount) external action {
        address user = _pick(userActors, userSeed);
        amount = bound(amount, 1, 1_000 * LAI);
        _mint(user, amount);
        vm.startPrank(user);
        token.approve(address(users), amount);
        users.deposit(amount);
        vm.stopPrank();
    }

    function depositFor(uint256 fromSeed, uint256 userSeed, uint256 amount) external action {
        address from = _pick(stakerActors, fromSeed);
        address user = _pick(userActors, userSeed);
        amount = bound(amount, 1, 1_000 * LAI);
        _mint(from, amount);
        vm.startPrank(from);
        token.approve(address(users), amount);
        users.depositFor(user, amount);
        vm.stopPrank();
    }

    function withdraw(uint256 userSeed, uint256 amount) external action {
        address user = _pick(userActors, userSeed);
        uint256 balance = users.balanceOf(user);
        if (balance == 0) return;
        amount = bound(amount, 1, balance);
        vm.prank(user);
        users.withdraw(amount, user);
    }

    function grantBatch(uint256 idSeed, uint256 amountSeed) external action {
        bytes32 id = grantIds[idSeed % grantIds.length];
        uint256 n = userActors.length;
        uint256[] memory amounts = new uint256[](n);
        uint256 total;
        for (uint256 i; i < n; ++i) {
            amounts[i] = uint256(keccak256(abi.encode(amountSeed, i))) % (100 * LAI);
            total += amounts[i];
        }
        vm.prank(operator);
        try users.grantBatch(id, userActors, amounts) returns (bool applied) {
            if (applied) {
                grantApplications[id]++;
                ghostMinted += total;
            }
        } catch {
            unexpectedReverts++;
        }
    }

    /// A withdrawal batch of up to 4 random lines (user custody → a user's or a staker's wallet);
    /// amounts may exceed what users hold (shortfalls), and ids are often resent.
    function withdrawBatch(uint256 idSeed, uint256 seed, uint256 count) external action {
        bytes32 id = withdrawIds[idSeed % withdrawIds.length];
        uint256 n = count % 5;
        address[] memory who = new address[](n);
        address[] memory to = new address[](n);
        uint256[] memory amounts = new uint256[](n);
        for (uint256 i; i < n; ++i) {
            uint256 r = uint256(keccak256(abi.encode(seed, i)));
            who[i] = _pick(userActors, r);
            to[i] = (r >> 8) % 2 == 0 ? _pick(userActors, r >> 16) : _pick(stakerActors, r >> 16);
            amounts[i] = (r >> 24) % (300 * LAI);
        }
        vm.prank(operator);
        try users.withdrawBatch(id, who, to, amounts) returns (bool applied) {
            if (applied) withdrawApplications[id]++;
        } catch {
            unexpectedReverts++;
        }
    }

    // ------------------------------------------------------------------ settlement and nodes

    /// A batch of up to 5 random entries; amounts may exceed what users hold (shortfalls), and the
    /// id comes from a small set so ids are often resent.
    function settleBatch(uint256 idSeed, uint256 seed, uint256 count) external action {
        bytes32 id = settleIds[idSeed % settleIds.length];
        Tokenomics.Entry[] memory entries = new Tokenomics.Entry[](count % 6);
        for (uint256 i; i < entries.length; ++i) {
            uint256 r = uint256(keccak256(abi.encode(seed, i)));
            entries[i] = Tokenomics.Entry({
                user: _pick(userActors, r),
                node: _pick(nodeActors, r >> 8),
                amount: uint96((r >> 16) % (300 * LAI)),
                tokens: uint64((r >> 112) % 1_000_000),
                requests: uint32((r >> 176) % 100)
            });
        }
        vm.prank(operator);
        try tokenomics.settleBatch(id, entries) returns (bool applied) {
            if (applied) settleApplications[id]++;
        } catch {
            unexpectedReverts++;
        }
    }

    function withdrawNode(uint256 nodeSeed, uint256 amount) external action {
        address node = _pick(nodeActors, nodeSeed);
        uint256 balance = tokenomics.nodeBalance(node);
        if (balance == 0) return;
        amount = bound(amount, 1, balance);
        vm.prank(node);
        tokenomics.withdrawNode(amount, node);
    }

    function withdrawTreasury(uint256 amount) external action {
        uint256 balance = tokenomics.treasuryBalance();
        if (balance == 0) return;
        amount = bound(amount, 1, balance);
        vm.prank(admin);
        tokenomics.withdrawTreasury(amount, treasury);
    }

    function postStatus(uint256 seed) external action {
        uint256 n = nodeActors.length;
        NetworkStatus.Entry[] memory entries = new NetworkStatus.Entry[](n);
        for (uint256 i; i < n; ++i) {
            uint256 r = uint256(keccak256(abi.encode(seed, i)));
            entries[i] = NetworkStatus.Entry({
                node: nodeActors[i],
                uptimeBps: SafeCast.toUint16(r % 10_001),
                reputation: SafeCast.toUint16((r >> 16) % 10_001)
            });
        }
        uint64 epoch = status.currentEpoch();
        vm.prank(operator);
        status.post(epoch, bytes32(seed), entries);
    }

    /// Claims a final epoch's reward, first moving time on if no epoch is final yet.
    function claimEpochReward(uint256 epochSeed, uint256 nodeSeed) external action {
        if (status.currentEpoch() < 2) _advance(2 * status.epochLength());
        uint64 current = status.currentEpoch();
        uint64 epoch = uint64(bound(epochSeed, 0, current - 2));
        address node = _pick(nodeActors, nodeSeed);
        if (tokenomics.rewardClaimed(epoch, node)) return;
        try tokenomics.claimEpochReward(epoch, node) returns (uint256 reward) {
            ghostMinted += reward;
        } catch {
            unexpectedReverts++;
        }
    }

    // ------------------------------------------------------------------ node stake

    function requestUnstake(uint256 nodeSeed, uint256 amount) external action {
        address node = _pick(nodeActors, nodeSeed);
        uint256 staked = registry.stakeOf(node);
        if (staked == 0) return;
        amount = bound(amount, 1, staked);
        vm.prank(node);
        registry.requestUnstake(node, amount);
    }

    /// Withdraws what a node has unbonding, waiting out the unbonding delay first if needed.
    function withdrawStake(uint256 nodeSeed) external action {
        address node = _pick(nodeActors, nodeSeed);
        NodeRegistry.Node memory n = registry.getNode(node);
        if (n.unbonding == 0) return;
        if (currentTime < n.unbondingEnds) _advance(n.unbondingEnds - currentTime);
        vm.prank(node);
        registry.withdrawStake(node);
    }

    function slash(uint256 nodeSeed, uint256 amount) external action {
        address node = _pick(nodeActors, nodeSeed);
        amount = bound(amount, 1, 30 * LAI);
        vm.prank(admin);
        registry.slash(node, amount, "invariant run");
    }

    // ------------------------------------------------------------------ staking pools

    function stake(uint256 stakerSeed, uint256 nodeSeed, uint256 amount) external action {
        address staker = _pick(stakerActors, stakerSeed);
        address node = _pick(nodeActors, nodeSeed);
        amount = bound(amount, 1, 100 * LAI);
        _mint(staker, amount);
        vm.startPrank(staker);
        token.approve(address(tokenomics), amount);
        tokenomics.stake(node, amount);
        vm.stopPrank();
    }

    function unstake(uint256 stakerSeed, uint256 nodeSeed, uint256 amount) external action {
        address staker = _pick(stakerActors, stakerSeed);
        address node = _pick(nodeActors, nodeSeed);
        (uint256 staked,,) = tokenomics.stakes(node, staker);
        if (staked == 0) return;
        amount = bound(amount, 1, staked);
        vm.prank(staker);
        tokenomics.unstake(node, amount);
    }

    function claim(uint256 stakerSeed, uint256 nodeSeed) external action {
        address staker = _pick(stakerActors, stakerSeed);
        address node = _pick(nodeActors, nodeSeed);
        vm.prank(staker);
        try tokenomics.claim(node) {}
        catch {
            unexpectedReverts++;
        }
    }

    // ------------------------------------------------------------------ time

    function warp(uint256 secondsForward) external action {
        _advance(bound(secondsForward, 1, 2 days));
    }

    // ------------------------------------------------------------------ internals

    function _advance(uint256 secondsForward) internal {
        currentTime += secondsForward;
        vm.warp(currentTime);
    }

    function _mint(address to, uint256 amount) internal {
        vm.prank(admin);
        token.mint(to, amount);
        ghostMinted += amount;
    }

    function _pick(address[] storage list, uint256 seed) internal view returns (address) {
        return list[seed % list.length];
    }

    function _offer() internal pure returns (NodeRegistry.Offer memory) {
        return NodeRegistry.Offer({
            kind: NodeRegistry.Kind.Llm,
            models: new string[](1),
            priceIn: 1,
            priceOut: 2,
            metadataUri: ""
        });
    }
}
