// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";

/// @title Nodes: identity, offer, stake, reputation.
/// @notice A node (its secp256k1 key, the same one that signs usage receipts) registers its kind,
/// models, prices and a metadata URI while locking at least `minStake` LAI. Whoever provides the
/// stake (the node itself, or a registrar sponsoring it) gets it back after the unbonding delay.
/// Governance slashes with a recorded reason; NetworkStatus writes reputation and activity.
contract NodeRegistry is AccessControl {
    using SafeERC20 for IERC20;

    bytes32 public constant GOVERNOR_ROLE = keccak256("GOVERNOR_ROLE");
    bytes32 public constant REGISTRAR_ROLE = keccak256("REGISTRAR_ROLE");
    bytes32 public constant STATUS_ROLE = keccak256("STATUS_ROLE");

    uint256 public constant MAX_MODELS = 16;
    uint256 public constant MAX_STRING = 256;

    enum Kind {
        Llm,
        Knowledge,
        Agent
    }

    struct Offer {
        Kind kind;
        string[] models;
        /// Smallest LAI units per 1M prompt / completion tokens.
        uint128 priceIn;
        uint128 priceOut;
        string metadataUri;
    }

    struct Node {
        address staker;
        bool registered;
        bool active;
        /// 0..10_000, written by NetworkStatus.
        uint16 reputation;
        uint256 stake;
        uint256 unbonding;
        uint64 unbondingEnds;
        uint256 slashed;
        Offer offer;
    }

    IERC20 public immutable token;
    address public treasury;
    uint256 public minStake;
    uint64 public unbondingDelay;

    mapping(address node => Node) internal nodes;
    /// Stake locked + unbonding over all nodes (what this contract must hold).
    uint256 public totalLocked;

    event NodeRegistered(
        address indexed node, address indexed staker, Kind kind, string[] models, uint128 priceIn, uint128 priceOut,
        string metadataUri, uint256 stake
    );
    event OfferUpdated(address indexed node, Kind kind, string[] models, uint128 priceIn, uint128 priceOut, string metadataUri);
    event StakeAdded(address indexed node, address indexed from, uint256 amount);
    event UnstakeRequested(address indexed node, uint256 amount, uint64 availableAt);
    event StakeWithdrawn(address indexed node, address indexed to, uint256 amount);
    event Slashed(address indexed node, uint256 amount, string reason);
    event ReputationUpdated(address indexed node, uint16 reputation, bool active);
    event ParametersSet(uint256 minStake, uint64 unbondingDelay, address treasury);

    error NotAuthorized(address caller, address node);
    error AlreadyRegistered(address node);
    error NotRegistered(address node);
    error StakeTooLow(uint256 stake, uint256 minStake);
    error TooManyModels(uint256 count, uint256 max);
    error StringTooLong(uint256 length, uint256 max);
    error ZeroAmount();
    error UnbondingNotOver(uint64 availableAt);
    error NothingToWithdraw();
    error AmountExceedsStake(uint256 amount, uint256 stake);

    constructor(address admin, IERC20 token_, address treasury_, uint256 minStake_, uint64 unbondingDelay_) {
        token = token_;
        treasury = treasury_;
        minStake = minStake_;
        unbondingDelay = unbondingDelay_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(GOVERNOR_ROLE, admin);
        emit ParametersSet(minStake_, unbondingDelay_, treasury_);
    }

    modifier onlyNodeOrRegistrar(address node) {
        if (msg.sender != node && !hasRole(REGISTRAR_ROLE, msg.sender)) revert NotAuthorized(msg.sender, node);
        _;
    }

    /// Registers `node` (the caller itself, or any node when the caller is a registrar) with
    /// `stake` LAI taken from the caller, who becomes the node's staker.
    function register(address node, Offer calldata offer, uint256 stake) external onlyNodeOrRegistrar(node) {
        Node storage n = nodes[node];
        if (n.registered) revert AlreadyRegistered(node);
        if (stake < minStake) revert StakeTooLow(stake, minStake);
        _checkOffer(offer);
        token.safeTransferFrom(msg.sender, address(this), stake);
        n.staker = msg.sender;
        n.registered = true;
        n.active = true;
        n.reputation = 5_000;
        n.stake = stake;
        n.offer = offer;
        totalLocked += stake;
        emit NodeRegistered(
            node, msg.sender, offer.kind, offer.models, offer.priceIn, offer.priceOut, offer.metadataUri, stake
        );
    }

    function updateOffer(address node, Offer calldata offer) external onlyNodeOrRegistrar(node) {
        Node storage n = _registered(node);
        _checkOffer(offer);
        n.offer = offer;
        emit OfferUpdated(node, offer.kind, offer.models, offer.priceIn, offer.priceOut, offer.metadataUri);
    }

    function addStake(address node, uint256 amount) external {
        Node storage n = _registered(node);
        if (amount == 0) revert ZeroAmount();
        token.safeTransferFrom(msg.sender, address(this), amount);
        n.stake += amount;
        totalLocked += amount;
        emit StakeAdded(node, msg.sender, amount);
    }

    /// Starts unbonding `amount` of the stake; it stops counting at once and can be withdrawn
    /// after `unbondingDelay` (a new request restarts the clock for everything unbonding).
    function requestUnstake(address node, uint256 amount) external {
        Node storage n = _registered(node);
        if (msg.sender != node && msg.sender != n.staker) revert NotAuthorized(msg.sender, node);
        if (amount == 0) revert ZeroAmount();
        if (amount > n.stake) revert AmountExceedsStake(amount, n.stake);
        n.stake -= amount;
        n.unbonding += amount;
        uint64 availableAt = uint64(block.timestamp) + unbondingDelay;
        n.unbondingEnds = availableAt;
        if (n.stake < minStake && n.active) {
            n.active = false;
            emit ReputationUpdated(node, n.reputation, false);
        }
        emit UnstakeRequested(node, amount, availableAt);
    }

    function withdrawStake(address node) external {
        Node storage n = _registered(node);
        if (msg.sender != node && msg.sender != n.staker) revert NotAuthorized(msg.sender, node);
        uint256 amount = n.unbonding;
        if (amount == 0) revert NothingToWithdraw();
        if (block.timestamp < n.unbondingEnds) revert UnbondingNotOver(n.unbondingEnds);
        n.unbonding = 0;
        totalLocked -= amount;
        token.safeTransfer(n.staker, amount);
        emit StakeWithdrawn(node, n.staker, amount);
    }

    /// Slashes up to `amount` from the stake (then from what is unbonding) to the treasury.
    function slash(address node, uint256 amount, string calldata reason) external onlyRole(GOVERNOR_ROLE) {
        Node storage n = _registered(node);
        if (amount == 0) revert ZeroAmount();
        if (bytes(reason).length > MAX_STRING) revert StringTooLong(bytes(reason).length, MAX_STRING);
        uint256 fromStake = amount <= n.stake ? amount : n.stake;
        uint256 rest = amount - fromStake;
        uint256 fromUnbonding = rest <= n.unbonding ? rest : n.unbonding;
        uint256 taken = fromStake + fromUnbonding;
        n.stake -= fromStake;
        n.unbonding -= fromUnbonding;
        n.slashed += taken;
        totalLocked -= taken;
        if (n.stake < minStake && n.active) {
            n.active = false;
            emit ReputationUpdated(node, n.reputation, false);
        }
        if (taken != 0) token.safeTransfer(treasury, taken);
        emit Slashed(node, taken, reason);
    }

    /// Written by NetworkStatus each epoch. A node is active when its reputation is at least
    /// `minReputation` and it still has the minimum stake.
    function setReputation(address node, uint16 reputation, uint16 minReputation) external onlyRole(STATUS_ROLE) {
        Node storage n = nodes[node];
        if (!n.registered) return; // a status entry for an unknown node changes nothing
        bool active = reputation >= minReputation && n.stake >= minStake;
        n.reputation = reputation;
        n.active = active;
        emit ReputationUpdated(node, reputation, active);
    }

    function setParameters(uint256 minStake_, uint64 unbondingDelay_, address treasury_)
        external
        onlyRole(GOVERNOR_ROLE)
    {
        minStake = minStake_;
        unbondingDelay = unbondingDelay_;
        treasury = treasury_;
        emit ParametersSet(minStake_, unbondingDelay_, treasury_);
    }

    function getNode(address node) external view returns (Node memory) {
        return nodes[node];
    }

    function isActive(address node) external view returns (bool) {
        Node storage n = nodes[node];
        return n.registered && n.active && n.stake >= minStake;
    }

    function stakeOf(address node) external view returns (uint256) {
        return nodes[node].stake;
    }

    function _registered(address node) internal view returns (Node storage n) {
        n = nodes[node];
        if (!n.registered) revert NotRegistered(node);
    }

    function _checkOffer(Offer calldata offer) internal pure {
        uint256 count = offer.models.length;
        if (count > MAX_MODELS) revert TooManyModels(count, MAX_MODELS);
        for (uint256 i; i < count; ++i) {
            uint256 len = bytes(offer.models[i]).length;
            if (len > MAX_STRING) revert StringTooLong(len, MAX_STRING);
        }
        if (bytes(offer.metadataUri).length > MAX_STRING) {
            revert StringTooLong(bytes(offer.metadataUri).length, MAX_STRING);
        }
    }
}
