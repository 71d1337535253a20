// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {NodeRegistry} from "./NodeRegistry.sol";

/// @title Network status per epoch.
/// @notice Once per epoch the operator (Nexus) posts a compact snapshot: the Merkle root of every
/// node's (address, uptime, reputation) leaf plus only the entries that changed. Entries update
/// reputation in the NodeRegistry (a node under `minReputation` becomes inactive) and record
/// uptime, one of the three weights of the epoch reward in Tokenomics.
contract NetworkStatus is AccessControl {
    bytes32 public constant REPORTER_ROLE = keccak256("REPORTER_ROLE");
    bytes32 public constant GOVERNOR_ROLE = keccak256("GOVERNOR_ROLE");

    /// Bounds one post (the operator splits larger snapshots into several posts).
    uint256 public constant MAX_ENTRIES = 512;

    struct Entry {
        address node;
        /// Share of the epoch the node was healthy, 0..10_000.
        uint16 uptimeBps;
        /// 0..10_000.
        uint16 reputation;
    }

    NodeRegistry public immutable registry;
    uint64 public immutable genesis;
    uint64 public immutable epochLength;
    uint16 public minReputation;

    mapping(uint64 epoch => bytes32) public rootOf;
    mapping(uint64 epoch => mapping(address node => uint16)) public uptimeOf;
    mapping(uint64 epoch => uint256) public totalUptime;

    event StatusPosted(uint64 indexed epoch, bytes32 root, uint256 entries);
    event MinReputationSet(uint16 minReputation);

    error EpochNotStarted(uint64 epoch, uint64 current);
    error EpochClosed(uint64 epoch, uint64 current);
    error TooManyEntries(uint256 count, uint256 max);
    error OutOfRange(uint16 value);
    error ZeroEpochLength();

    constructor(address admin, NodeRegistry registry_, uint64 epochLength_, uint16 minReputation_) {
        if (epochLength_ == 0) revert ZeroEpochLength();
        if (minReputation_ > 10_000) revert OutOfRange(minReputation_);
        registry = registry_;
        genesis = uint64(block.timestamp);
        epochLength = epochLength_;
        minReputation = minReputation_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(GOVERNOR_ROLE, admin);
    }

    function currentEpoch() public view returns (uint64) {
        return (uint64(block.timestamp) - genesis) / epochLength;
    }

    /// Posts (part of) the snapshot of `epoch`: the current epoch, or the one just ended (a
    /// snapshot is taken at the end of its epoch). Posting the same node twice replaces its entry.
    function post(uint64 epoch, bytes32 root, Entry[] calldata entries) external onlyRole(REPORTER_ROLE) {
        uint64 current = currentEpoch();
        if (epoch > current) revert EpochNotStarted(epoch, current);
        if (epoch + 1 < current) revert EpochClosed(epoch, current);
        uint256 n = entries.length;
        if (n > MAX_ENTRIES) revert TooManyEntries(n, MAX_ENTRIES);
        rootOf[epoch] = root;
        uint256 total = totalUptime[epoch];
        uint16 minRep = minReputation;
        for (uint256 i; i < n; ++i) {
            Entry calldata e = entries[i];
            if (e.uptimeBps > 10_000) revert OutOfRange(e.uptimeBps);
            if (e.reputation > 10_000) revert OutOfRange(e.reputation);
            total = total - uptimeOf[epoch][e.node] + e.uptimeBps;
            uptimeOf[epoch][e.node] = e.uptimeBps;
            registry.setReputation(e.node, e.reputation, minRep);
        }
        totalUptime[epoch] = total;
        emit StatusPosted(epoch, root, n);
    }

    function setMinReputation(uint16 minReputation_) external onlyRole(GOVERNOR_ROLE) {
        if (minReputation_ > 10_000) revert OutOfRange(minReputation_);
        minReputation = minReputation_;
        emit MinReputationSet(minReputation_);
    }
}
