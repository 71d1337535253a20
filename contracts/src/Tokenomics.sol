// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";
import {LAIToken} from "./LAIToken.sol";
import {NetworkStatus} from "./NetworkStatus.sol";
import {UserRegistry} from "./UserRegistry.sol";

/// @title Settlement, fee split, staking pools and epoch rewards.
/// @notice Nexus meters inference off-chain and settles it here in batches: each entry moves LAI
/// from a user's custody balance to a node, split by governance-set basis points between the node,
/// the node's staking pool and the maintenance treasury. A batch id is applied at most once.
/// Token holders stake on a node's pool and earn a pro-rata share of that pool's income
/// (reward-per-share accounting: no loop over stakers). Each epoch an emission is shared between
/// nodes by compute (tokens), requests served and uptime.
/// Custody invariant: token.balanceOf(this) ==
///     Σ nodeBalance + treasuryBalance + Σ pool.staked + Σ pool.unclaimed (rewards incl. dust).
contract Tokenomics is AccessControl {
    using SafeERC20 for IERC20;

    bytes32 public constant SETTLER_ROLE = keccak256("SETTLER_ROLE");
    bytes32 public constant GOVERNOR_ROLE = keccak256("GOVERNOR_ROLE");

    uint256 public constant BPS = 10_000;
    uint256 public constant MAX_BATCH = 2_048;
    uint256 internal constant PRECISION = 1e18;

    struct Entry {
        address user;
        address node;
        uint96 amount;
        uint64 tokens;
        uint32 requests;
    }

    struct Split {
        uint16 nodeBps;
        uint16 poolBps;
        uint16 treasuryBps;
    }

    struct Weights {
        uint16 computeBps;
        uint16 requestsBps;
        uint16 uptimeBps;
    }

    struct Pool {
        uint256 staked;
        /// Rewards per staked unit, scaled by 1e18.
        uint256 accPerShare;
        /// Rewards received and not yet claimed, including rounding dust.
        uint256 unclaimed;
        /// Scaled remainder (< staked) not yet reflected in accPerShare; carried to the next income.
        uint256 carry;
    }

    struct Stake {
        uint256 amount;
        uint256 debt;
        uint256 owed;
    }

    struct EpochStats {
        uint256 tokens;
        uint256 requests;
    }

    LAIToken public immutable token;
    UserRegistry public immutable users;
    NetworkStatus public immutable status;

    Split public split;
    Weights public weights;
    uint256 public emissionPerEpoch;

    mapping(bytes32 batchId => bool) public settled;
    mapping(address node => uint256) public nodeBalance;
    /// Everything a node was ever credited by settlement (its share plus pool income nobody
    /// staked for); with `totalSettled`, what reconciliation compares with the off-chain ledger.
    mapping(address node => uint256) public nodeEarned;
    uint256 public totalSettled;
    uint256 public totalNodeBalances;
    uint256 public treasuryBalance;

    mapping(address node => Pool) public pools;
    mapping(address node => mapping(address staker => Stake)) public stakes;
    uint256 public totalPoolStaked;
    uint256 public totalPoolUnclaimed;

    mapping(uint64 epoch => EpochStats) public epochTotals;
    mapping(uint64 epoch => mapping(address node => EpochStats)) public epochNode;
    mapping(uint64 epoch => mapping(address node => bool)) public rewardClaimed;
    /// Emission of an epoch, fixed by its first reward claim so later governance changes
    /// cannot make two nodes of one epoch be paid from different totals.
    mapping(uint64 epoch => uint256) internal fixedEmission;
    mapping(uint64 epoch => bool) public emissionFixed;

    event BatchSettled(bytes32 indexed batchId, uint256 entries, uint256 charged, uint256 paid, uint256 shortfall);
    event BatchAlreadySettled(bytes32 indexed batchId);
    event Shortfall(bytes32 indexed batchId, address indexed user, uint256 owed, uint256 paid);
    event NodeWithdrawal(address indexed node, address indexed to, uint256 amount);
    event TreasuryWithdrawal(address indexed to, uint256 amount);
    event Staked(address indexed node, address indexed staker, uint256 amount);
    event Unstaked(address indexed node, address indexed staker, uint256 amount);
    event RewardClaimed(address indexed node, address indexed staker, uint256 amount);
    event EpochRewardPaid(uint64 indexed epoch, address indexed node, uint256 amount);
    event SplitSet(uint16 nodeBps, uint16 poolBps, uint16 treasuryBps);
    event WeightsSet(uint16 computeBps, uint16 requestsBps, uint16 uptimeBps);
    event EmissionSet(uint256 emissionPerEpoch);

    error BadSplit(uint256 sum);
    error BatchTooLarge(uint256 entries, uint256 max);
    error ZeroAmount();
    error InsufficientBalance(uint256 balance, uint256 requested);
    error EpochNotFinal(uint64 epoch, uint64 current);
    error AlreadyClaimed(uint64 epoch, address node);

    constructor(address admin, LAIToken token_, UserRegistry users_, NetworkStatus status_) {
        token = token_;
        users = users_;
        status = status_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(GOVERNOR_ROLE, admin);
        _setSplit(9_000, 500, 500);
        _setWeights(5_000, 3_000, 2_000);
    }

    // ---------------------------------------------------------------- settlement

    /// Applies batch `batchId` once. Submitting a settled id again changes nothing and emits
    /// BatchAlreadySettled, so a settler that crashed after sending can always safely resend.
    /// @return applied false when the batch had already been settled.
    function settleBatch(bytes32 batchId, Entry[] calldata entries)
        external
        onlyRole(SETTLER_ROLE)
        returns (bool applied)
    {
        if (settled[batchId]) {
            emit BatchAlreadySettled(batchId);
            return false;
        }
        uint256 n = entries.length;
        if (n > MAX_BATCH) revert BatchTooLarge(n, MAX_BATCH);
        settled[batchId] = true;

        address[] memory who = new address[](n);
        uint256[] memory owed = new uint256[](n);
        uint256 charged;
        for (uint256 i; i < n; ++i) {
            who[i] = entries[i].user;
            owed[i] = entries[i].amount;
            charged += entries[i].amount;
        }
        uint256[] memory paid = users.settleDebits(who, owed);

        Split memory s = split;
        uint64 epoch = status.currentEpoch();
        uint256 totalPaid;
        uint256 toTreasury;
        uint256 epochTokens;
        uint256 epochRequests;
        for (uint256 i; i < n; ++i) {
            Entry calldata e = entries[i];
            uint256 amount = paid[i];
            if (amount < owed[i]) emit Shortfall(batchId, e.user, owed[i], amount);
            totalPaid += amount;
            toTreasury += _credit(e, amount, s, epoch);
            epochTokens += e.tokens;
            epochRequests += e.requests;
        }
        EpochStats storage totals = epochTotals[epoch];
        totals.tokens += epochTokens;
        totals.requests += epochRequests;
        treasuryBalance += toTreasury;
        totalSettled += totalPaid;
        emit BatchSettled(batchId, n, charged, totalPaid, charged - totalPaid);
        return true;
    }

    /// Credits one entry's payment to its node and pool; returns the treasury's share.
    function _credit(Entry calldata e, uint256 amount, Split memory s, uint64 epoch)
        internal
        returns (uint256 toTreasury)
    {
        uint256 nodeShare = amount * s.nodeBps / BPS;
        uint256 poolShare = amount * s.poolBps / BPS;
        uint256 toNode = nodeShare + _feedPool(e.node, poolShare);
        _payNode(e.node, toNode);
        nodeEarned[e.node] += toNode;
        EpochStats storage stats = epochNode[epoch][e.node];
        stats.tokens += e.tokens;
        stats.requests += e.requests;
        return amount - nodeShare - poolShare;
    }

    /// Adds `amount` to the node's pool; returns what could not go to stakers (nobody staked).
    function _feedPool(address node, uint256 amount) internal returns (uint256 toNode) {
        if (amount == 0) return 0;
        Pool storage p = pools[node];
        uint256 staked = p.staked;
        if (staked == 0) return amount;
        uint256 scaled = amount * PRECISION + p.carry;
        uint256 delta = scaled / staked;
        p.carry = scaled - delta * staked;
        p.accPerShare += delta;
        p.unclaimed += amount;
        totalPoolUnclaimed += amount;
        return 0;
    }

    function _payNode(address node, uint256 amount) internal {
        if (amount == 0) return;
        nodeBalance[node] += amount;
        totalNodeBalances += amount;
    }

    /// A node withdraws its earnings (the caller is the node's key).
    function withdrawNode(uint256 amount, address to) external {
        uint256 balance = nodeBalance[msg.sender];
        if (amount == 0) revert ZeroAmount();
        if (amount > balance) revert InsufficientBalance(balance, amount);
        unchecked {
            nodeBalance[msg.sender] = balance - amount;
            totalNodeBalances -= amount;
        }
        IERC20(address(token)).safeTransfer(to, amount);
        emit NodeWithdrawal(msg.sender, to, amount);
    }

    function withdrawTreasury(uint256 amount, address to) external onlyRole(GOVERNOR_ROLE) {
        uint256 balance = treasuryBalance;
        if (amount == 0) revert ZeroAmount();
        if (amount > balance) revert InsufficientBalance(balance, amount);
        treasuryBalance = balance - amount;
        IERC20(address(token)).safeTransfer(to, amount);
        emit TreasuryWithdrawal(to, amount);
    }

    // ---------------------------------------------------------------- staking pools

    function stake(address node, uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        Pool storage p = pools[node];
        Stake storage st = stakes[node][msg.sender];
        _accrue(p, st);
        IERC20(address(token)).safeTransferFrom(msg.sender, address(this), amount);
        st.amount += amount;
        st.debt = _debt(st.amount, p.accPerShare);
        p.staked += amount;
        totalPoolStaked += amount;
        emit Staked(node, msg.sender, amount);
    }

    function unstake(address node, uint256 amount) external {
        Pool storage p = pools[node];
        Stake storage st = stakes[node][msg.sender];
        if (amount == 0) revert ZeroAmount();
        if (amount > st.amount) revert InsufficientBalance(st.amount, amount);
        _accrue(p, st);
        st.amount -= amount;
        st.debt = _debt(st.amount, p.accPerShare);
        p.staked -= amount;
        totalPoolStaked -= amount;
        IERC20(address(token)).safeTransfer(msg.sender, amount);
        emit Unstaked(node, msg.sender, amount);
    }

    /// Pays the caller's accrued share of `node`'s pool income.
    function claim(address node) external returns (uint256 amount) {
        Pool storage p = pools[node];
        Stake storage st = stakes[node][msg.sender];
        _accrue(p, st);
        amount = st.owed;
        if (amount == 0) return 0;
        st.owed = 0;
        p.unclaimed -= amount;
        totalPoolUnclaimed -= amount;
        IERC20(address(token)).safeTransfer(msg.sender, amount);
        emit RewardClaimed(node, msg.sender, amount);
    }

    function pendingReward(address node, address staker) external view returns (uint256) {
        Pool storage p = pools[node];
        Stake storage st = stakes[node][staker];
        uint256 accrued = st.amount * p.accPerShare / PRECISION;
        return accrued > st.debt ? st.owed + accrued - st.debt : st.owed;
    }

    function _accrue(Pool storage p, Stake storage st) internal {
        uint256 accrued = st.amount * p.accPerShare / PRECISION;
        // Right after a stake change the rounded-up debt may exceed the rounded-down accrual.
        if (accrued <= st.debt) return;
        st.owed += accrued - st.debt;
        st.debt = accrued;
    }

    /// What a stake of `amount` is deemed to have already received at `accPerShare`, rounded
    /// up: rounded down, every stake change would credit up to 1 wei never earned, and a pool
    /// could end up owing its stakers more than it holds (the last claim then reverts).
    function _debt(uint256 amount, uint256 accPerShare) internal pure returns (uint256) {
        return Math.mulDiv(amount, accPerShare, PRECISION, Math.Rounding.Ceil);
    }

    // ---------------------------------------------------------------- epoch rewards

    /// Pays `node` its share of epoch `epoch`'s emission, once the epoch's figures are final
    /// (its status window has closed): emission × (w_compute·tokens/Σtokens +
    /// w_requests·requests/Σrequests + w_uptime·uptime/Σuptime) / 10_000, each term rounded down.
    function claimEpochReward(uint64 epoch, address node) external returns (uint256 reward) {
        uint64 current = status.currentEpoch();
        if (epoch + 2 > current) revert EpochNotFinal(epoch, current);
        if (rewardClaimed[epoch][node]) revert AlreadyClaimed(epoch, node);
        rewardClaimed[epoch][node] = true;
        if (!emissionFixed[epoch]) {
            emissionFixed[epoch] = true;
            fixedEmission[epoch] = emissionPerEpoch;
        }
        reward = epochRewardOf(epoch, node);
        if (reward == 0) return 0;
        token.mint(address(this), reward);
        _payNode(node, reward);
        emit EpochRewardPaid(epoch, node, reward);
    }

    function epochEmission(uint64 epoch) public view returns (uint256) {
        return emissionFixed[epoch] ? fixedEmission[epoch] : emissionPerEpoch;
    }

    /// What `node` earns for `epoch` (at the current emission until the epoch's first claim).
    function epochRewardOf(uint64 epoch, address node) public view returns (uint256) {
        uint256 emission = epochEmission(epoch);
        if (emission == 0) return 0;
        Weights memory w = weights;
        EpochStats storage total = epochTotals[epoch];
        EpochStats storage mine = epochNode[epoch][node];
        uint256 totalUptime = status.totalUptime(epoch);
        uint256 reward;
        if (total.tokens != 0) reward += Math.mulDiv(emission * w.computeBps, mine.tokens, total.tokens * BPS);
        if (total.requests != 0) {
            reward += Math.mulDiv(emission * w.requestsBps, mine.requests, total.requests * BPS);
        }
        if (totalUptime != 0) {
            reward += Math.mulDiv(emission * w.uptimeBps, status.uptimeOf(epoch, node), totalUptime * BPS);
        }
        return reward;
    }

    // ---------------------------------------------------------------- governance

    function setSplit(uint16 nodeBps, uint16 poolBps, uint16 treasuryBps) external onlyRole(GOVERNOR_ROLE) {
        _setSplit(nodeBps, poolBps, treasuryBps);
    }

    function setWeights(uint16 computeBps, uint16 requestsBps, uint16 uptimeBps) external onlyRole(GOVERNOR_ROLE) {
        _setWeights(computeBps, requestsBps, uptimeBps);
    }

    function setEmission(uint256 emissionPerEpoch_) external onlyRole(GOVERNOR_ROLE) {
        emissionPerEpoch = emissionPerEpoch_;
        emit EmissionSet(emissionPerEpoch_);
    }

    function _setSplit(uint16 nodeBps, uint16 poolBps, uint16 treasuryBps) internal {
        uint256 sum = uint256(nodeBps) + poolBps + treasuryBps;
        if (sum != BPS) revert BadSplit(sum);
        split = Split(nodeBps, poolBps, treasuryBps);
        emit SplitSet(nodeBps, poolBps, treasuryBps);
    }

    function _setWeights(uint16 computeBps, uint16 requestsBps, uint16 uptimeBps) internal {
        uint256 sum = uint256(computeBps) + requestsBps + uptimeBps;
        if (sum != BPS) revert BadSplit(sum);
        weights = Weights(computeBps, requestsBps, uptimeBps);
        emit WeightsSet(computeBps, requestsBps, uptimeBps);
    }
}
