// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {StdInvariant} from "forge-std/StdInvariant.sol";
import {Base} from "../Base.t.sol";
import {NodeRegistry} from "../../src/NodeRegistry.sol";
import {ProtocolHandler} from "./ProtocolHandler.sol";

/// Conservation and custody invariants of the whole protocol under random sequences of every
/// state-changing action (see ProtocolHandler).
contract ProtocolInvariantTest is StdInvariant, Base {
    ProtocolHandler internal handler;

    function setUp() public override {
        super.setUp();
        handler = new ProtocolHandler(token, users, registry, status, tokenomics, admin, operator, treasury);

        bytes4[] memory selectors = new bytes4[](18);
        selectors[0] = ProtocolHandler.deposit.selector;
        selectors[1] = ProtocolHandler.depositFor.selector;
        selectors[2] = ProtocolHandler.withdraw.selector;
        selectors[3] = ProtocolHandler.grantBatch.selector;
        selectors[4] = ProtocolHandler.settleBatch.selector;
        selectors[5] = ProtocolHandler.withdrawNode.selector;
        selectors[6] = ProtocolHandler.withdrawTreasury.selector;
        selectors[7] = ProtocolHandler.postStatus.selector;
        selectors[8] = ProtocolHandler.claimEpochReward.selector;
        selectors[9] = ProtocolHandler.requestUnstake.selector;
        selectors[10] = ProtocolHandler.withdrawStake.selector;
        selectors[11] = ProtocolHandler.slash.selector;
        selectors[12] = ProtocolHandler.stake.selector;
        selectors[13] = ProtocolHandler.unstake.selector;
        selectors[14] = ProtocolHandler.claim.selector;
        selectors[15] = ProtocolHandler.warp.selector;
        selectors[16] = ProtocolHandler.settleBatch.selector; // settlement twice as likely
        selectors[17] = ProtocolHandler.withdrawBatch.selector;
        targetSelector(FuzzSelector({addr: address(handler), selectors: selectors}));
        targetContract(address(handler));
    }

    /// (a) Supply conservation: the supply is exactly what was minted, and what each minter minted
    /// is exactly the allowance it used up.
    function invariant_SupplyEqualsMinted() public view {
        assertEq(token.totalSupply(), handler.ghostMinted(), "supply != minted");
        uint256 used = (FAUCET_BUDGET - token.mintAllowance(address(users)))
            + (EMISSION_BUDGET - token.mintAllowance(address(tokenomics)))
            + (ADMIN_BUDGET - token.mintAllowance(admin));
        assertEq(token.totalSupply(), used, "supply != allowances used");
    }

    /// (b) UserRegistry custody.
    function invariant_UserCustody() public view {
        uint256 sum;
        for (uint256 i; i < handler.userCount(); ++i) {
            sum += users.balanceOf(handler.userActors(i));
        }
        assertEq(token.balanceOf(address(users)), users.totalBalances(), "held != totalBalances");
        assertEq(users.totalBalances(), sum, "totalBalances != sum of balances");
    }

    /// (c) Tokenomics custody, and its totals match the per-node / per-pool records.
    function invariant_TokenomicsCustody() public view {
        assertEq(
            token.balanceOf(address(tokenomics)),
            tokenomics.totalNodeBalances() + tokenomics.treasuryBalance() + tokenomics.totalPoolStaked()
                + tokenomics.totalPoolUnclaimed(),
            "held != node + treasury + staked + unclaimed"
        );
        uint256 nodeSum;
        uint256 stakedSum;
        uint256 unclaimedSum;
        for (uint256 i; i < handler.nodeCount(); ++i) {
            address node = handler.nodeActors(i);
            nodeSum += tokenomics.nodeBalance(node);
            (uint256 staked,, uint256 unclaimed,) = tokenomics.pools(node);
            stakedSum += staked;
            unclaimedSum += unclaimed;
        }
        assertEq(tokenomics.totalNodeBalances(), nodeSum, "totalNodeBalances != sum");
        assertEq(tokenomics.totalPoolStaked(), stakedSum, "totalPoolStaked != sum");
        assertEq(tokenomics.totalPoolUnclaimed(), unclaimedSum, "totalPoolUnclaimed != sum");
    }

    /// Every pool holds at least what its stakers are owed, and each pool's stake is its stakers'.
    function invariant_PoolsSolvent() public view {
        for (uint256 i; i < handler.nodeCount(); ++i) {
            address node = handler.nodeActors(i);
            uint256 owed;
            uint256 stakes;
            for (uint256 j; j < handler.stakerCount(); ++j) {
                address staker = handler.stakerActors(j);
                owed += tokenomics.pendingReward(node, staker);
                (uint256 amount,,) = tokenomics.stakes(node, staker);
                stakes += amount;
            }
            (uint256 staked,, uint256 unclaimed,) = tokenomics.pools(node);
            assertLe(owed, unclaimed, "pool owes more than it holds");
            assertEq(staked, stakes, "pool stake != sum of stakes");
        }
    }

    /// (d) NodeRegistry custody.
    function invariant_RegistryCustody() public view {
        uint256 sum;
        for (uint256 i; i < handler.nodeCount(); ++i) {
            NodeRegistry.Node memory n = registry.getNode(handler.nodeActors(i));
            sum += n.stake + n.unbonding;
        }
        assertEq(token.balanceOf(address(registry)), registry.totalLocked(), "held != totalLocked");
        assertEq(registry.totalLocked(), sum, "totalLocked != sum of stake + unbonding");
    }

    /// (e) No batch id is ever applied twice, and the contracts' flags agree with what was applied.
    function invariant_BatchIdsAppliedAtMostOnce() public view {
        for (uint256 i; i < handler.settleIdCount(); ++i) {
            bytes32 id = handler.settleIds(i);
            uint256 applied = handler.settleApplications(id);
            assertLe(applied, 1, "settlement batch applied twice");
            assertEq(applied == 1, tokenomics.settled(id), "settled flag");
        }
        for (uint256 i; i < handler.grantIdCount(); ++i) {
            bytes32 id = handler.grantIds(i);
            uint256 applied = handler.grantApplications(id);
            assertLe(applied, 1, "grant batch applied twice");
            assertEq(applied == 1, users.granted(id), "granted flag");
        }
        for (uint256 i; i < handler.withdrawIdCount(); ++i) {
            bytes32 id = handler.withdrawIds(i);
            uint256 applied = handler.withdrawApplications(id);
            assertLe(applied, 1, "withdrawal batch applied twice");
            assertEq(applied == 1, users.withdrawalApplied(id), "withdrawal flag");
        }
    }

    /// (f) Every token is held by someone the handler knows: no LAI leaks to an unknown address.
    function invariant_SupplyHeldByKnownHolders() public view {
        uint256 held = token.balanceOf(address(users)) + token.balanceOf(address(tokenomics))
            + token.balanceOf(address(registry)) + token.balanceOf(treasury) + token.balanceOf(operator)
            + token.balanceOf(admin);
        for (uint256 i; i < handler.userCount(); ++i) {
            held += token.balanceOf(handler.userActors(i));
        }
        for (uint256 i; i < handler.nodeCount(); ++i) {
            held += token.balanceOf(handler.nodeActors(i));
        }
        for (uint256 i; i < handler.stakerCount(); ++i) {
            held += token.balanceOf(handler.stakerActors(i));
        }
        assertEq(token.totalSupply(), held, "supply != sum of known holders");
    }

    /// Settlements, withdrawal batches, grants within budget and claims never revert.
    function invariant_NoUnexpectedReverts() public view {
        assertEq(handler.unexpectedReverts(), 0);
    }
}
