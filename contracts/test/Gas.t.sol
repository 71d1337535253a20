// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {console2} from "forge-std/console2.sol";
import {Base} from "./Base.t.sol";
import {Tokenomics} from "../src/Tokenomics.sol";

/// Foundry's `cool` cheatcode (newer than the vendored forge-std's Vm interface): marks an
/// account and all its storage slots cold again, so gas is measured as in a fresh transaction.
interface CoolingVm {
    function cool(address target) external;
}

/// Gas of `settleBatch` per entry, measured as a transaction would pay it: execution (with every
/// contract and slot cold, as at the start of a transaction) + 21_000 + calldata (EIP-2028 / the
/// EIP-7623 floor, whichever is higher).
///
/// Regimes:
///   new            first payment to each node in the epoch and first debit of each user:
///                  node-side slots go from zero to non-zero;
///   warm           every (user, node) pair already settled earlier in the epoch: all slots
///                  non-zero;
///   repeated       one (user, node) pair repeated in every entry, warm;
///   next-epoch     as warm, but the batch is the first of a new epoch: each node's usage
///                  counters for the epoch go from zero to non-zero;
///   warm-10-nodes  warm, distinct users but only 10 nodes;
///   staked         as warm, and every node has a staker, so each entry also feeds a pool.
contract SettleBatchGasTest is Base {
    /// What a settlement transaction may use; the Rust settler sends up to SETTLER_MAX_ENTRIES
    /// entries per batch (`BatchLimits::max_entries`) and relies on one batch fitting this.
    uint256 internal constant TX_GAS_BOUND = 16_700_000;
    uint256 internal constant SETTLER_MAX_ENTRIES = 100;
    uint256 internal constant MAX_PAIRS = 1_000;
    uint96 internal constant AMOUNT = 1e15;

    uint256 internal batchNonce;

    function setUp() public override {
        super.setUp();
        // Every user gets 1_000 LAI of custody in one faucet grant.
        address[] memory who = new address[](MAX_PAIRS);
        uint256[] memory amounts = new uint256[](MAX_PAIRS);
        for (uint256 i; i < MAX_PAIRS; ++i) {
            who[i] = _user(i);
            amounts[i] = 1_000 * LAI;
        }
        vm.prank(operator);
        users.grantBatch("gas-users", who, amounts);
    }

    // ------------------------------------------------------------------ measurements

    function test_Gas_SettleBatch_AllNew() public {
        _report("new", 1, _measureFresh(_distinct(1)));
        _report("new", 100, _measureFresh(_distinct(100)));
        _report("new", 1_000, _measureFresh(_distinct(1_000)));
    }

    function test_Gas_SettleBatch_Warm() public {
        _prime(_distinct(MAX_PAIRS));
        _report("warm", 1, _measureFresh(_distinct(1)));
        _report("warm", 100, _measureFresh(_distinct(100)));
        _report("warm", 1_000, _measureFresh(_distinct(1_000)));
    }

    function test_Gas_SettleBatch_WarmInNextEpoch() public {
        _prime(_distinct(MAX_PAIRS));
        _warpToEpoch(1);
        _report("next-epoch", 1, _measureFresh(_distinct(1)));
        _report("next-epoch", 100, _measureFresh(_distinct(100)));
        _report("next-epoch", 1_000, _measureFresh(_distinct(1_000)));
    }

    function test_Gas_SettleBatch_RepeatedPair() public {
        _prime(_repeated(1));
        _report("repeated", 1, _measureFresh(_repeated(1)));
        _report("repeated", 100, _measureFresh(_repeated(100)));
        _report("repeated", 1_000, _measureFresh(_repeated(1_000)));
    }

    /// Distinct users over only 10 nodes (a small network): node-side slots are shared.
    function test_Gas_SettleBatch_WarmDistinctUsersOverTenNodes() public {
        _prime(_spread(MAX_PAIRS, 10));
        _report("warm-10-nodes", 100, _measureFresh(_spread(100, 10)));
        _report("warm-10-nodes", 1_000, _measureFresh(_spread(1_000, 10)));
    }

    function test_Gas_SettleBatch_WarmWithStakedPools() public {
        for (uint256 i; i < MAX_PAIRS; ++i) {
            _fund(address(this), 1);
            token.approve(address(tokenomics), 1);
            tokenomics.stake(_node(i), 1);
        }
        _prime(_distinct(MAX_PAIRS));
        _report("staked", 1, _measureFresh(_distinct(1)));
        _report("staked", 100, _measureFresh(_distinct(100)));
        _report("staked", 1_000, _measureFresh(_distinct(1_000)));
    }

    // ------------------------------------------------------------------ the bound

    /// The Rust settler's full batch (`BatchLimits::max_entries`) in the worst regime: every
    /// (user, node) pair distinct, every node paid for the first time, every node's pool staked
    /// (so each entry also feeds a pool). It must fit one transaction.
    function test_Gas_WorstCaseSettlerBatch_FitsTxGasBound() public {
        for (uint256 i; i < SETTLER_MAX_ENTRIES; ++i) {
            _fund(address(this), 1);
            token.approve(address(tokenomics), 1);
            tokenomics.stake(_node(i), 1);
        }
        uint256 gas = _measure(_distinct(SETTLER_MAX_ENTRIES));
        _report("new-staked", SETTLER_MAX_ENTRIES, gas);
        assertLe(gas, TX_GAS_BOUND, "the settler's largest batch exceeds the settlement gas bound");
    }

    /// The largest warm batch of distinct pairs that fits the bound.
    function test_Gas_MaxWarmDistinctEntriesWithinTxGasBound() public {
        _prime(_distinct(MAX_PAIRS));
        _reportMax("warm", _maxEntriesWithinBound());
    }

    /// The largest batch of distinct pairs, first of its epoch, that fits the bound.
    function test_Gas_MaxNextEpochDistinctEntriesWithinTxGasBound() public {
        _prime(_distinct(MAX_PAIRS));
        _warpToEpoch(1);
        _reportMax("next-epoch", _maxEntriesWithinBound());
    }

    // ------------------------------------------------------------------ helpers

    function _user(uint256 i) internal pure returns (address) {
        return vm.addr(0x1000000 + i);
    }

    function _node(uint256 i) internal pure returns (address) {
        return vm.addr(0x2000000 + i);
    }

    /// Entry i: user i pays node i.
    function _distinct(uint256 n) internal pure returns (Tokenomics.Entry[] memory entries) {
        entries = new Tokenomics.Entry[](n);
        for (uint256 i; i < n; ++i) {
            entries[i] = _entry(_user(i), _node(i), AMOUNT, 1_234, 3);
        }
    }

    /// Entry i: user i pays node i mod `nodes`.
    function _spread(uint256 n, uint256 nodes) internal pure returns (Tokenomics.Entry[] memory entries) {
        entries = new Tokenomics.Entry[](n);
        for (uint256 i; i < n; ++i) {
            entries[i] = _entry(_user(i), _node(i % nodes), AMOUNT, 1_234, 3);
        }
    }

    function _repeated(uint256 n) internal pure returns (Tokenomics.Entry[] memory entries) {
        entries = new Tokenomics.Entry[](n);
        for (uint256 i; i < n; ++i) {
            entries[i] = _entry(_user(0), _node(0), AMOUNT, 1_234, 3);
        }
    }

    /// Settles `entries` once so every slot they touch is non-zero.
    function _prime(Tokenomics.Entry[] memory entries) internal {
        assertTrue(_settle(keccak256("prime"), entries));
    }

    /// Binary search for the largest n such that settling _distinct(n) fits TX_GAS_BOUND; checks
    /// that n fits and n + 1 does not.
    function _maxEntriesWithinBound() internal returns (uint256 fits) {
        fits = 1;
        uint256 exceeds = MAX_PAIRS + 1;
        assertLe(_measureFresh(_distinct(fits)), TX_GAS_BOUND);
        while (exceeds - fits > 1) {
            uint256 mid = (fits + exceeds) / 2;
            if (_measureFresh(_distinct(mid)) <= TX_GAS_BOUND) fits = mid;
            else exceeds = mid;
        }
        if (fits < MAX_PAIRS) assertGt(_measureFresh(_distinct(fits + 1)), TX_GAS_BOUND);
    }

    /// Measures on a copy of the state, which is then discarded.
    function _measureFresh(Tokenomics.Entry[] memory entries) internal returns (uint256 gas) {
        uint256 snapshot = vm.snapshotState();
        gas = _measure(entries);
        vm.revertToState(snapshot);
    }

    /// Transaction gas of settling `entries` as a new batch.
    function _measure(Tokenomics.Entry[] memory entries) internal returns (uint256) {
        bytes memory data = abi.encodeCall(Tokenomics.settleBatch, (bytes32(++batchNonce), entries));
        CoolingVm(address(vm)).cool(address(tokenomics));
        CoolingVm(address(vm)).cool(address(users));
        CoolingVm(address(vm)).cool(address(token));
        CoolingVm(address(vm)).cool(address(status));

        vm.prank(operator);
        uint256 before = gasleft();
        (bool ok, bytes memory result) = address(tokenomics).call(data);
        uint256 execution = before - gasleft();
        assertTrue(ok, "settleBatch reverted");
        assertTrue(abi.decode(result, (bool)), "batch not applied");

        (uint256 standard, uint256 floor) = _calldataGas(data);
        uint256 charged = standard + execution > floor ? standard + execution : floor;
        return 21_000 + charged;
    }

    /// EIP-2028 calldata cost (4 / 16 gas per zero / non-zero byte) and the EIP-7623 floor
    /// (10 gas per token, a non-zero byte being 4 tokens).
    function _calldataGas(bytes memory data) internal pure returns (uint256 standard, uint256 floor) {
        uint256 zeros;
        for (uint256 i; i < data.length; ++i) {
            if (data[i] == 0) ++zeros;
        }
        uint256 tokens = zeros + 4 * (data.length - zeros);
        return (4 * tokens, 10 * tokens);
    }

    function _reportMax(string memory regime, uint256 entries) internal pure {
        console2.log(
            string.concat("settleBatch max_entries regime=", regime, " within_gas=16700000 entries=", vm.toString(entries))
        );
    }

    function _report(string memory regime, uint256 entries, uint256 gas) internal pure {
        console2.log(
            string.concat(
                "settleBatch entries=",
                vm.toString(entries),
                " regime=",
                regime,
                " gas=",
                vm.toString(gas),
                " per_entry=",
                vm.toString(gas / entries)
            )
        );
    }
}
