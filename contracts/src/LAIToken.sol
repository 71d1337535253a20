// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Capped} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Capped.sol";

/// @title LAI, the Lattice network's token.
/// @notice OpenZeppelin's audited ERC-20 with a hard supply cap. Minting is a role, and each
/// minter (the faucet, the emission of epoch rewards) may only mint up to its own allowance, so a
/// compromised minter key can never inflate the supply beyond what governance granted it.
contract LAIToken is ERC20Capped, AccessControl {
    bytes32 public constant MINTER_ROLE = keccak256("MINTER_ROLE");

    /// Remaining amount each minter may still mint.
    mapping(address minter => uint256) public mintAllowance;

    event MintAllowanceSet(address indexed minter, uint256 allowance);

    error MintAllowanceExceeded(address minter, uint256 requested, uint256 remaining);

    constructor(address admin, uint256 supplyCap) ERC20("Lattice AI", "LAI") ERC20Capped(supplyCap) {
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// Grants `minter` the minter role with a (replacing) allowance; 0 revokes the role.
    function setMintAllowance(address minter, uint256 allowance) external onlyRole(DEFAULT_ADMIN_ROLE) {
        mintAllowance[minter] = allowance;
        if (allowance == 0) {
            _revokeRole(MINTER_ROLE, minter);
        } else {
            _grantRole(MINTER_ROLE, minter);
        }
        emit MintAllowanceSet(minter, allowance);
    }

    function mint(address to, uint256 amount) external onlyRole(MINTER_ROLE) {
        uint256 remaining = mintAllowance[msg.sender];
        if (amount > remaining) revert MintAllowanceExceeded(msg.sender, amount, remaining);
        mintAllowance[msg.sender] = remaining - amount;
        _mint(to, amount);
    }
}
