// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {ERC20Capped} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Capped.sol";
import {Base} from "./Base.t.sol";
import {LAIToken} from "../src/LAIToken.sol";

contract LAITokenTest is Base {
    address internal minter = makeAddr("minter");
    address internal alice = makeAddr("alice");

    event MintAllowanceSet(address indexed minter, uint256 allowance);

    function test_Constructor_SetsMetadataCapAndAdmin() public view {
        assertEq(token.name(), "Lattice AI");
        assertEq(token.symbol(), "LAI");
        assertEq(token.decimals(), 18);
        assertEq(token.cap(), CAP);
        assertEq(token.totalSupply(), 0);
        assertTrue(token.hasRole(token.DEFAULT_ADMIN_ROLE(), admin));
        assertFalse(token.hasRole(token.DEFAULT_ADMIN_ROLE(), operator));
    }

    function test_Revert_When_DeployedWithZeroCap() public {
        vm.expectRevert(abi.encodeWithSelector(ERC20Capped.ERC20InvalidCap.selector, 0));
        new LAIToken(admin, 0);
    }

    // ------------------------------------------------------------------ setMintAllowance

    function test_SetMintAllowance_GrantsMinterRoleAndEmits() public {
        vm.expectEmit(address(token));
        emit MintAllowanceSet(minter, 500);
        vm.prank(admin);
        token.setMintAllowance(minter, 500);

        assertTrue(token.hasRole(token.MINTER_ROLE(), minter));
        assertEq(token.mintAllowance(minter), 500);
    }

    function test_SetMintAllowance_ReplacesRatherThanAdds() public {
        vm.startPrank(admin);
        token.setMintAllowance(minter, 500);
        token.setMintAllowance(minter, 200);
        vm.stopPrank();

        assertEq(token.mintAllowance(minter), 200);
    }

    function test_SetMintAllowance_ZeroRevokesMinterRole() public {
        vm.startPrank(admin);
        token.setMintAllowance(minter, 500);
        vm.expectEmit(address(token));
        emit MintAllowanceSet(minter, 0);
        token.setMintAllowance(minter, 0);
        vm.stopPrank();

        assertFalse(token.hasRole(token.MINTER_ROLE(), minter));
        vm.expectRevert(_unauthorized(minter, token.MINTER_ROLE()));
        vm.prank(minter);
        token.mint(alice, 1);
    }

    function test_Revert_When_SetMintAllowanceByNonAdmin() public {
        vm.expectRevert(_unauthorized(stranger, token.DEFAULT_ADMIN_ROLE()));
        vm.prank(stranger);
        token.setMintAllowance(stranger, 1);
    }

    // ------------------------------------------------------------------ mint

    function test_Mint_ConsumesAllowanceAndCredits() public {
        vm.prank(admin);
        token.setMintAllowance(minter, 500);

        vm.expectEmit(address(token));
        emit IERC20.Transfer(address(0), alice, 300);
        vm.prank(minter);
        token.mint(alice, 300);

        assertEq(token.balanceOf(alice), 300);
        assertEq(token.totalSupply(), 300);
        assertEq(token.mintAllowance(minter), 200);
    }

    function test_Mint_WholeAllowanceLeavesZero() public {
        vm.prank(admin);
        token.setMintAllowance(minter, 500);
        vm.prank(minter);
        token.mint(alice, 500);

        assertEq(token.mintAllowance(minter), 0);
        vm.expectRevert(abi.encodeWithSelector(LAIToken.MintAllowanceExceeded.selector, minter, 1, 0));
        vm.prank(minter);
        token.mint(alice, 1);
    }

    function test_Revert_When_MintExceedsAllowance() public {
        vm.prank(admin);
        token.setMintAllowance(minter, 500);

        vm.expectRevert(abi.encodeWithSelector(LAIToken.MintAllowanceExceeded.selector, minter, 501, 500));
        vm.prank(minter);
        token.mint(alice, 501);
    }

    function test_Revert_When_MintByNonMinter() public {
        vm.expectRevert(_unauthorized(stranger, token.MINTER_ROLE()));
        vm.prank(stranger);
        token.mint(stranger, 1);
    }

    function test_Revert_When_MintExceedsCap() public {
        vm.startPrank(admin);
        LAIToken small = new LAIToken(admin, 1_000);
        small.setMintAllowance(minter, 5_000);
        vm.stopPrank();
        vm.prank(minter);
        small.mint(alice, 600);

        vm.expectRevert(abi.encodeWithSelector(ERC20Capped.ERC20ExceededCap.selector, 1_001, 1_000));
        vm.prank(minter);
        small.mint(alice, 401);

        // The reverted mint consumed no allowance; the cap can still be reached exactly.
        assertEq(small.mintAllowance(minter), 4_400);
        vm.prank(minter);
        small.mint(alice, 400);
        assertEq(small.totalSupply(), 1_000);
    }

    function testFuzz_Mint_BoundedByAllowanceAndCap(uint256 allowance, uint256 first, uint256 second) public {
        allowance = bound(allowance, 1, CAP * 2);
        vm.prank(admin);
        token.setMintAllowance(minter, allowance);
        first = bound(first, 0, allowance);
        vm.assume(first <= CAP);
        vm.prank(minter);
        token.mint(alice, first);

        uint256 remaining = allowance - first;
        second = bound(second, 0, CAP * 3);
        vm.prank(minter);
        if (second > remaining) {
            vm.expectRevert(abi.encodeWithSelector(LAIToken.MintAllowanceExceeded.selector, minter, second, remaining));
        } else if (first + second > CAP) {
            vm.expectRevert(abi.encodeWithSelector(ERC20Capped.ERC20ExceededCap.selector, first + second, CAP));
        }
        token.mint(alice, second);

        assertLe(token.totalSupply(), CAP);
        assertEq(token.totalSupply() + token.mintAllowance(minter), allowance);
    }
}
