// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {LAIToken} from "./LAIToken.sol";

/// @title Users and their LAI in the protocol's custody.
/// @notice A user links an address to a Nexus account id, deposits LAI (or someone deposits for
/// them: the faucet, an exchange) and withdraws it. Settlement (the Tokenomics contract, holder of
/// SETTLER_ROLE) debits users for the inference they used; the debited LAI moves to Tokenomics.
/// Starter credits (the faucet) are granted in idempotent batches minted straight into custody,
/// within the mint allowance governance gave this contract. Withdrawals of custodial users (whose
/// key is Nexus's) are released in idempotent batches by the holder of WITHDRAWER_ROLE after
/// Nexus debited the off-chain credit.
/// Invariant: token.balanceOf(this) == totalBalances == Σ balanceOf.
contract UserRegistry is AccessControl {
    using SafeERC20 for IERC20;

    bytes32 public constant SETTLER_ROLE = keccak256("SETTLER_ROLE");
    bytes32 public constant FAUCET_ROLE = keccak256("FAUCET_ROLE");
    bytes32 public constant WITHDRAWER_ROLE = keccak256("WITHDRAWER_ROLE");

    uint256 public constant MAX_BATCH = 2_048;

    IERC20 public immutable token;

    mapping(address user => bytes32) public accountOf;
    mapping(bytes32 accountId => address) public userOf;
    mapping(address user => uint256) public balanceOf;
    uint256 public totalBalances;
    mapping(bytes32 grantId => bool) public granted;
    mapping(bytes32 batchId => bool) public withdrawalApplied;

    event Registered(address indexed user, bytes32 indexed accountId);
    event Deposited(address indexed user, address indexed from, uint256 amount);
    event Withdrawn(address indexed user, address indexed to, uint256 amount);
    event Granted(bytes32 indexed grantId, uint256 users, uint256 total);
    event GrantAlreadyApplied(bytes32 indexed grantId);
    event WithdrawalBatch(bytes32 indexed batchId, uint256 users, uint256 total);
    event WithdrawalBatchAlreadyApplied(bytes32 indexed batchId);
    /// A user's custody held less than the batch asked to release for them: `paid` was sent.
    event WithdrawalShortfall(bytes32 indexed batchId, address indexed user, uint256 requested, uint256 paid);

    error ZeroAmount();
    error ZeroAccount();
    error AlreadyRegistered(address user, bytes32 accountId);
    error AccountTaken(bytes32 accountId, address user);
    error InsufficientBalance(address user, uint256 balance, uint256 requested);
    error LengthMismatch(uint256 users, uint256 amounts);
    error BadDestination(uint256 index, address to);
    error BatchTooLarge(uint256 entries, uint256 max);

    constructor(address admin, IERC20 token_) {
        token = token_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// Links the caller to `accountId` (once; an account id belongs to one address).
    function register(bytes32 accountId) external {
        if (accountId == bytes32(0)) revert ZeroAccount();
        bytes32 current = accountOf[msg.sender];
        if (current != bytes32(0)) revert AlreadyRegistered(msg.sender, current);
        address owner = userOf[accountId];
        if (owner != address(0)) revert AccountTaken(accountId, owner);
        accountOf[msg.sender] = accountId;
        userOf[accountId] = msg.sender;
        emit Registered(msg.sender, accountId);
    }

    function deposit(uint256 amount) external {
        depositFor(msg.sender, amount);
    }

    /// Moves `amount` LAI from the caller into custody, credited to `user`.
    function depositFor(address user, uint256 amount) public {
        if (amount == 0) revert ZeroAmount();
        token.safeTransferFrom(msg.sender, address(this), amount);
        balanceOf[user] += amount;
        totalBalances += amount;
        emit Deposited(user, msg.sender, amount);
    }

    function withdraw(uint256 amount, address to) external {
        if (amount == 0) revert ZeroAmount();
        uint256 balance = balanceOf[msg.sender];
        if (amount > balance) revert InsufficientBalance(msg.sender, balance, amount);
        unchecked {
            balanceOf[msg.sender] = balance - amount;
            totalBalances -= amount;
        }
        token.safeTransfer(to, amount);
        emit Withdrawn(msg.sender, to, amount);
    }

    /// Credits starter grants (batch `grantId`, applied at most once: resending an applied id
    /// changes nothing and emits GrantAlreadyApplied). The LAI is minted into custody.
    /// @return applied false when the batch had already been applied.
    function grantBatch(bytes32 grantId, address[] calldata users, uint256[] calldata amounts)
        external
        onlyRole(FAUCET_ROLE)
        returns (bool applied)
    {
        if (granted[grantId]) {
            emit GrantAlreadyApplied(grantId);
            return false;
        }
        uint256 n = users.length;
        if (amounts.length != n) revert LengthMismatch(n, amounts.length);
        if (n > MAX_BATCH) revert BatchTooLarge(n, MAX_BATCH);
        granted[grantId] = true;
        uint256 total;
        for (uint256 i; i < n; ++i) {
            balanceOf[users[i]] += amounts[i];
            total += amounts[i];
        }
        totalBalances += total;
        if (total != 0) LAIToken(address(token)).mint(address(this), total);
        emit Granted(grantId, n, total);
        return true;
    }

    /// Releases withdrawals Nexus already debited off-chain (batch `batchId`, applied at most
    /// once: resending an applied id changes nothing and emits WithdrawalBatchAlreadyApplied).
    /// Each `users[i]`'s custody pays up to `amounts[i]` to `to[i]`; a user whose custody holds
    /// less (it withdrew on-chain itself meanwhile) pays what it holds and the difference is
    /// reported by WithdrawalShortfall, so one such user can never block a whole batch.
    /// @return applied false when the batch had already been applied.
    function withdrawBatch(
        bytes32 batchId,
        address[] calldata users,
        address[] calldata to,
        uint256[] calldata amounts
    ) external onlyRole(WITHDRAWER_ROLE) returns (bool applied) {
        if (withdrawalApplied[batchId]) {
            emit WithdrawalBatchAlreadyApplied(batchId);
            return false;
        }
        uint256 n = users.length;
        if (amounts.length != n) revert LengthMismatch(n, amounts.length);
        if (to.length != n) revert LengthMismatch(n, to.length);
        if (n > MAX_BATCH) revert BatchTooLarge(n, MAX_BATCH);
        withdrawalApplied[batchId] = true;
        uint256 total;
        for (uint256 i; i < n; ++i) {
            address user = users[i];
            address dest = to[i];
            if (dest == address(0) || dest == address(this)) revert BadDestination(i, dest);
            uint256 balance = balanceOf[user];
            uint256 amount = amounts[i];
            uint256 take = amount <= balance ? amount : balance;
            unchecked {
                balanceOf[user] = balance - take;
                total += take;
            }
            if (take != amount) emit WithdrawalShortfall(batchId, user, amount, take);
            if (take != 0) {
                token.safeTransfer(dest, take);
                emit Withdrawn(user, dest, take);
            }
        }
        unchecked {
            totalBalances -= total;
        }
        emit WithdrawalBatch(batchId, n, total);
        return true;
    }

    /// Debits each `users[i]` by up to `amounts[i]` and sends the total to the settler.
    /// A user who withdrew before their usage was settled pays what is left (the shortfall is
    /// reported by the settler's event), so one such user can never block a whole batch.
    /// @return paid what each user actually paid.
    function settleDebits(address[] calldata users, uint256[] calldata amounts)
        external
        onlyRole(SETTLER_ROLE)
        returns (uint256[] memory paid)
    {
        uint256 n = users.length;
        if (amounts.length != n) revert LengthMismatch(n, amounts.length);
        paid = new uint256[](n);
        uint256 total;
        for (uint256 i; i < n; ++i) {
            address user = users[i];
            uint256 balance = balanceOf[user];
            uint256 amount = amounts[i];
            uint256 take = amount <= balance ? amount : balance;
            unchecked {
                balanceOf[user] = balance - take;
                total += take;
            }
            paid[i] = take;
        }
        unchecked {
            totalBalances -= total;
        }
        if (total != 0) token.safeTransfer(msg.sender, total);
    }
}
