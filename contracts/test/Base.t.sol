// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Test} from "forge-std/Test.sol";
import {IAccessControl} from "@openzeppelin/contracts/access/IAccessControl.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {LAIToken} from "../src/LAIToken.sol";
import {UserRegistry} from "../src/UserRegistry.sol";
import {NodeRegistry} from "../src/NodeRegistry.sol";
import {NetworkStatus} from "../src/NetworkStatus.sol";
import {Tokenomics} from "../src/Tokenomics.sol";

/// The five contracts deployed and wired as `Protocol::deploy` (crates/chain) does, with the
/// parameters of a local network, plus helpers shared by every test.
abstract contract Base is Test {
    uint256 internal constant LAI = 1e18;
    uint256 internal constant CAP = 1_000_000_000 * LAI;
    uint256 internal constant FAUCET_BUDGET = 100_000_000 * LAI;
    uint256 internal constant EMISSION_BUDGET = 100_000_000 * LAI;
    uint256 internal constant ADMIN_BUDGET = 100_000_000 * LAI;
    uint256 internal constant EMISSION = 1_000 * LAI;
    uint256 internal constant MIN_STAKE = 10 * LAI;
    uint64 internal constant UNBONDING_DELAY = 1 days;
    uint64 internal constant EPOCH_LENGTH = 1 hours;
    uint16 internal constant MIN_REPUTATION = 2_000;
    uint256 internal constant START = 1_700_000_000;

    address internal admin = makeAddr("admin");
    address internal operator = makeAddr("operator");
    address internal treasury = makeAddr("treasury");
    address internal stranger = makeAddr("stranger");

    LAIToken internal token;
    NodeRegistry internal registry;
    NetworkStatus internal status;
    UserRegistry internal users;
    Tokenomics internal tokenomics;

    function setUp() public virtual {
        vm.warp(START);
        vm.startPrank(admin);
        token = new LAIToken(admin, CAP);
        registry = new NodeRegistry(admin, token, treasury, MIN_STAKE, UNBONDING_DELAY);
        status = new NetworkStatus(admin, registry, EPOCH_LENGTH, MIN_REPUTATION);
        users = new UserRegistry(admin, token);
        tokenomics = new Tokenomics(admin, token, users, status);

        users.grantRole(users.SETTLER_ROLE(), address(tokenomics));
        users.grantRole(users.FAUCET_ROLE(), operator);
        users.grantRole(users.WITHDRAWER_ROLE(), operator);
        token.setMintAllowance(address(users), FAUCET_BUDGET);
        token.setMintAllowance(address(tokenomics), EMISSION_BUDGET);
        token.setMintAllowance(admin, ADMIN_BUDGET);
        registry.grantRole(registry.STATUS_ROLE(), address(status));
        registry.grantRole(registry.REGISTRAR_ROLE(), operator);
        status.grantRole(status.REPORTER_ROLE(), operator);
        tokenomics.grantRole(tokenomics.SETTLER_ROLE(), operator);
        tokenomics.setEmission(EMISSION);
        vm.stopPrank();
    }

    // ------------------------------------------------------------------ tokens and users

    /// Mints `amount` LAI to `to` out of the admin's allowance.
    function _fund(address to, uint256 amount) internal {
        vm.prank(admin);
        token.mint(to, amount);
    }

    /// Funds `user` and deposits `amount` into its custody balance.
    function _deposit(address user, uint256 amount) internal {
        _fund(user, amount);
        vm.startPrank(user);
        token.approve(address(users), amount);
        users.deposit(amount);
        vm.stopPrank();
    }

    // ------------------------------------------------------------------ nodes

    function _offer() internal pure returns (NodeRegistry.Offer memory offer) {
        string[] memory models = new string[](2);
        models[0] = "llama-3.1-8b";
        models[1] = "qwen-2.5-7b";
        offer = NodeRegistry.Offer({
            kind: NodeRegistry.Kind.Llm,
            models: models,
            priceIn: 100,
            priceOut: 300,
            metadataUri: "ipfs://node"
        });
    }

    /// `node` registers itself with `stake` LAI of its own.
    function _registerNode(address node, uint256 stake) internal {
        _fund(node, stake);
        vm.startPrank(node);
        token.approve(address(registry), stake);
        registry.register(node, _offer(), stake);
        vm.stopPrank();
    }

    // ------------------------------------------------------------------ settlement

    function _entry(address user, address node, uint256 amount, uint64 tokens, uint32 requests)
        internal
        pure
        returns (Tokenomics.Entry memory)
    {
        return Tokenomics.Entry({user: user, node: node, amount: SafeCast.toUint96(amount), tokens: tokens, requests: requests});
    }

    function _one(Tokenomics.Entry memory e) internal pure returns (Tokenomics.Entry[] memory entries) {
        entries = new Tokenomics.Entry[](1);
        entries[0] = e;
    }

    function _settle(bytes32 id, Tokenomics.Entry[] memory entries) internal returns (bool) {
        vm.prank(operator);
        return tokenomics.settleBatch(id, entries);
    }

    function _settleOne(bytes32 id, address user, address node, uint256 amount) internal returns (bool) {
        return _settle(id, _one(_entry(user, node, amount, 0, 0)));
    }

    // ------------------------------------------------------------------ status and time

    function _statusEntry(address node, uint16 uptimeBps, uint16 reputation)
        internal
        pure
        returns (NetworkStatus.Entry memory)
    {
        return NetworkStatus.Entry({node: node, uptimeBps: uptimeBps, reputation: reputation});
    }

    function _post(uint64 epoch, NetworkStatus.Entry[] memory entries) internal {
        vm.prank(operator);
        status.post(epoch, keccak256(abi.encode(epoch, entries)), entries);
    }

    /// Moves time to the start of `epoch`.
    function _warpToEpoch(uint64 epoch) internal {
        vm.warp(uint256(status.genesis()) + uint256(epoch) * EPOCH_LENGTH);
    }

    // ------------------------------------------------------------------ errors

    function _unauthorized(address account, bytes32 role) internal pure returns (bytes memory) {
        return abi.encodeWithSelector(IAccessControl.AccessControlUnauthorizedAccount.selector, account, role);
    }
}
