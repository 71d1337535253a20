// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";
import {Base} from "./Base.t.sol";
import {LAIToken} from "../src/LAIToken.sol";
import {UserRegistry} from "../src/UserRegistry.sol";

contract UserRegistryTest is Base {
    address internal alice = makeAddr("alice");
    address internal bob = makeAddr("bob");
    address internal settler = makeAddr("settler");

    bytes32 internal constant ALICE_ACCOUNT = keccak256("acct_alice");
    bytes32 internal constant GRANT = keccak256("grant-1");

    event Registered(address indexed user, bytes32 indexed accountId);
    event Deposited(address indexed user, address indexed from, uint256 amount);
    event Withdrawn(address indexed user, address indexed to, uint256 amount);
    event Granted(bytes32 indexed grantId, uint256 users, uint256 total);
    event GrantAlreadyApplied(bytes32 indexed grantId);

    function setUp() public override {
        super.setUp();
        bytes32 role = users.SETTLER_ROLE();
        vm.prank(admin);
        users.grantRole(role, settler);
    }

    function _grant(bytes32 id, address[] memory who, uint256[] memory amounts) internal returns (bool) {
        vm.prank(operator);
        return users.grantBatch(id, who, amounts);
    }

    function _pair(address a, address b) internal pure returns (address[] memory list) {
        list = new address[](2);
        (list[0], list[1]) = (a, b);
    }

    function _pair(uint256 a, uint256 b) internal pure returns (uint256[] memory list) {
        list = new uint256[](2);
        (list[0], list[1]) = (a, b);
    }

    function _assertCustody() internal view {
        assertEq(token.balanceOf(address(users)), users.totalBalances(), "token held != totalBalances");
    }

    // ------------------------------------------------------------------ register

    function test_Register_LinksAddressAndAccountAndEmits() public {
        vm.expectEmit(address(users));
        emit Registered(alice, ALICE_ACCOUNT);
        vm.prank(alice);
        users.register(ALICE_ACCOUNT);

        assertEq(users.accountOf(alice), ALICE_ACCOUNT);
        assertEq(users.userOf(ALICE_ACCOUNT), alice);
    }

    function test_Revert_When_RegisteringZeroAccount() public {
        vm.expectRevert(UserRegistry.ZeroAccount.selector);
        vm.prank(alice);
        users.register(bytes32(0));
    }

    function test_Revert_When_AddressAlreadyRegistered() public {
        vm.startPrank(alice);
        users.register(ALICE_ACCOUNT);
        vm.expectRevert(abi.encodeWithSelector(UserRegistry.AlreadyRegistered.selector, alice, ALICE_ACCOUNT));
        users.register(keccak256("another"));
        vm.stopPrank();
    }

    function test_Revert_When_AccountTakenByAnotherAddress() public {
        vm.prank(alice);
        users.register(ALICE_ACCOUNT);

        vm.expectRevert(abi.encodeWithSelector(UserRegistry.AccountTaken.selector, ALICE_ACCOUNT, alice));
        vm.prank(bob);
        users.register(ALICE_ACCOUNT);
    }

    // ------------------------------------------------------------------ deposit / withdraw

    function test_Deposit_MovesTokensIntoCustodyAndEmits() public {
        _fund(alice, 100);
        vm.startPrank(alice);
        token.approve(address(users), 100);
        vm.expectEmit(address(users));
        emit Deposited(alice, alice, 60);
        users.deposit(60);
        vm.stopPrank();

        assertEq(users.balanceOf(alice), 60);
        assertEq(users.totalBalances(), 60);
        assertEq(token.balanceOf(alice), 40);
        _assertCustody();
    }

    function test_DepositFor_CreditsTheBeneficiary() public {
        _fund(bob, 100);
        vm.startPrank(bob);
        token.approve(address(users), 100);
        vm.expectEmit(address(users));
        emit Deposited(alice, bob, 100);
        users.depositFor(alice, 100);
        vm.stopPrank();

        assertEq(users.balanceOf(alice), 100);
        assertEq(users.balanceOf(bob), 0);
        assertEq(token.balanceOf(bob), 0);
        _assertCustody();
    }

    function test_Revert_When_DepositingZero() public {
        vm.expectRevert(UserRegistry.ZeroAmount.selector);
        vm.prank(alice);
        users.deposit(0);
    }

    function test_Revert_When_DepositForZero() public {
        vm.expectRevert(UserRegistry.ZeroAmount.selector);
        vm.prank(bob);
        users.depositFor(alice, 0);
    }

    function test_Revert_When_DepositWithoutApproval() public {
        _fund(alice, 100);
        vm.expectRevert(
            abi.encodeWithSelector(IERC20Errors.ERC20InsufficientAllowance.selector, address(users), 0, 100)
        );
        vm.prank(alice);
        users.deposit(100);
    }

    function test_Withdraw_SendsToRecipientAndEmits() public {
        _deposit(alice, 100);

        vm.expectEmit(address(users));
        emit Withdrawn(alice, bob, 30);
        vm.prank(alice);
        users.withdraw(30, bob);

        assertEq(users.balanceOf(alice), 70);
        assertEq(users.totalBalances(), 70);
        assertEq(token.balanceOf(bob), 30);
        _assertCustody();
    }

    function test_Withdraw_WholeBalance() public {
        _deposit(alice, 100);
        vm.prank(alice);
        users.withdraw(100, alice);

        assertEq(users.balanceOf(alice), 0);
        assertEq(token.balanceOf(alice), 100);
        _assertCustody();
    }

    function test_Revert_When_WithdrawingZero() public {
        _deposit(alice, 100);
        vm.expectRevert(UserRegistry.ZeroAmount.selector);
        vm.prank(alice);
        users.withdraw(0, alice);
    }

    function test_Revert_When_WithdrawingMoreThanBalance() public {
        _deposit(alice, 100);
        vm.expectRevert(abi.encodeWithSelector(UserRegistry.InsufficientBalance.selector, alice, 100, 101));
        vm.prank(alice);
        users.withdraw(101, alice);
    }

    function test_Revert_When_WithdrawingAnotherUsersBalance() public {
        _deposit(alice, 100);
        vm.expectRevert(abi.encodeWithSelector(UserRegistry.InsufficientBalance.selector, bob, 0, 1));
        vm.prank(bob);
        users.withdraw(1, bob);
    }

    // ------------------------------------------------------------------ grantBatch

    function test_GrantBatch_MintsIntoCustodyAndEmits() public {
        vm.expectEmit(address(users));
        emit Granted(GRANT, 2, 300);
        assertTrue(_grant(GRANT, _pair(alice, bob), _pair(100, 200)));

        assertEq(users.balanceOf(alice), 100);
        assertEq(users.balanceOf(bob), 200);
        assertEq(users.totalBalances(), 300);
        assertEq(token.totalSupply(), 300);
        assertEq(token.mintAllowance(address(users)), FAUCET_BUDGET - 300);
        assertTrue(users.granted(GRANT));
        _assertCustody();
    }

    function test_GrantBatch_SameUserTwiceInOneBatchAddsUp() public {
        assertTrue(_grant(GRANT, _pair(alice, alice), _pair(100, 25)));
        assertEq(users.balanceOf(alice), 125);
        _assertCustody();
    }

    function test_GrantBatch_AppliedOnce_SecondCallIsNoOp() public {
        _grant(GRANT, _pair(alice, bob), _pair(100, 200));
        uint256 supply = token.totalSupply();

        vm.expectEmit(address(users));
        emit GrantAlreadyApplied(GRANT);
        assertFalse(_grant(GRANT, _pair(alice, bob), _pair(100, 200)));

        assertEq(users.balanceOf(alice), 100);
        assertEq(users.balanceOf(bob), 200);
        assertEq(users.totalBalances(), 300);
        assertEq(token.totalSupply(), supply);
        assertEq(token.mintAllowance(address(users)), FAUCET_BUDGET - 300);
    }

    function test_GrantBatch_AppliedIdIgnoresDifferentEntries() public {
        _grant(GRANT, _pair(alice, bob), _pair(100, 200));

        // Even malformed entries under an applied id are a no-op rather than a revert.
        address[] memory one = new address[](1);
        one[0] = alice;
        assertFalse(_grant(GRANT, one, _pair(5, 5)));
        assertEq(users.balanceOf(alice), 100);
    }

    function test_GrantBatch_ZeroTotalMarksAppliedWithoutMinting() public {
        vm.expectEmit(address(users));
        emit Granted(GRANT, 2, 0);
        assertTrue(_grant(GRANT, _pair(alice, bob), _pair(0, 0)));

        assertTrue(users.granted(GRANT));
        assertEq(token.totalSupply(), 0);
    }

    function test_Revert_When_GrantLengthMismatch() public {
        address[] memory one = new address[](1);
        one[0] = alice;
        vm.expectRevert(abi.encodeWithSelector(UserRegistry.LengthMismatch.selector, 1, 2));
        _grant(GRANT, one, _pair(1, 2));
    }

    function test_Revert_When_GrantBatchTooLarge() public {
        uint256 n = users.MAX_BATCH() + 1;
        vm.expectRevert(abi.encodeWithSelector(UserRegistry.BatchTooLarge.selector, n, n - 1));
        _grant(GRANT, new address[](n), new uint256[](n));
    }

    function test_Revert_When_GrantExceedsFaucetBudget_IdNotConsumed() public {
        vm.prank(admin);
        token.setMintAllowance(address(users), 250);

        vm.expectRevert(abi.encodeWithSelector(LAIToken.MintAllowanceExceeded.selector, address(users), 300, 250));
        _grant(GRANT, _pair(alice, bob), _pair(100, 200));

        assertFalse(users.granted(GRANT));
        assertEq(users.balanceOf(alice), 0);
        assertEq(users.totalBalances(), 0);
    }

    function test_Revert_When_GrantBatchByNonFaucet() public {
        vm.expectRevert(_unauthorized(stranger, users.FAUCET_ROLE()));
        vm.prank(stranger);
        users.grantBatch(GRANT, _pair(alice, bob), _pair(1, 2));
    }

    // ------------------------------------------------------------------ settleDebits

    function test_SettleDebits_DebitsUsersAndPaysSettler() public {
        _deposit(alice, 100);
        _deposit(bob, 50);

        vm.prank(settler);
        uint256[] memory paid = users.settleDebits(_pair(alice, bob), _pair(40, 50));

        assertEq(paid[0], 40);
        assertEq(paid[1], 50);
        assertEq(users.balanceOf(alice), 60);
        assertEq(users.balanceOf(bob), 0);
        assertEq(users.totalBalances(), 60);
        assertEq(token.balanceOf(settler), 90);
        _assertCustody();
    }

    function test_SettleDebits_ShortfallPaysWhatIsLeft() public {
        _deposit(alice, 100);
        vm.prank(alice);
        users.withdraw(70, alice);

        vm.prank(settler);
        uint256[] memory paid = users.settleDebits(_pair(alice, bob), _pair(50, 10));

        assertEq(paid[0], 30);
        assertEq(paid[1], 0);
        assertEq(users.balanceOf(alice), 0);
        assertEq(token.balanceOf(settler), 30);
        _assertCustody();
    }

    function test_SettleDebits_SameUserTwiceDrawsOnRemainingBalance() public {
        _deposit(alice, 100);

        vm.prank(settler);
        uint256[] memory paid = users.settleDebits(_pair(alice, alice), _pair(80, 80));

        assertEq(paid[0], 80);
        assertEq(paid[1], 20);
        assertEq(users.balanceOf(alice), 0);
        assertEq(token.balanceOf(settler), 100);
    }

    function test_Revert_When_SettleDebitsLengthMismatch() public {
        address[] memory one = new address[](1);
        vm.expectRevert(abi.encodeWithSelector(UserRegistry.LengthMismatch.selector, 1, 2));
        vm.prank(settler);
        users.settleDebits(one, _pair(1, 2));
    }

    function test_Revert_When_SettleDebitsByNonSettler() public {
        _deposit(alice, 100);
        vm.expectRevert(_unauthorized(stranger, users.SETTLER_ROLE()));
        vm.prank(stranger);
        users.settleDebits(_pair(alice, bob), _pair(100, 0));
    }

    function testFuzz_DepositWithdraw_CustodyMatchesBalances(uint128 deposited, uint128 withdrawn) public {
        deposited = uint128(bound(deposited, 1, 1_000_000 * LAI));
        withdrawn = uint128(bound(withdrawn, 1, deposited));
        _deposit(alice, deposited);
        vm.prank(alice);
        users.withdraw(withdrawn, alice);

        assertEq(users.balanceOf(alice), deposited - withdrawn);
        assertEq(token.balanceOf(alice), withdrawn);
        _assertCustody();
    }
}
