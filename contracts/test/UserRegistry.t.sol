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
    bytes32 internal constant WITHDRAWAL = keccak256("withdraw-1");
    address internal carol = makeAddr("carol");
    address internal dave = makeAddr("dave");

    event Registered(address indexed user, bytes32 indexed accountId);
    event Deposited(address indexed user, address indexed from, uint256 amount);
    event Withdrawn(address indexed user, address indexed to, uint256 amount);
    event Granted(bytes32 indexed grantId, uint256 users, uint256 total);
    event GrantAlreadyApplied(bytes32 indexed grantId);
    event WithdrawalBatch(bytes32 indexed batchId, uint256 users, uint256 total);
    event WithdrawalBatchAlreadyApplied(bytes32 indexed batchId);
    event WithdrawalShortfall(bytes32 indexed batchId, address indexed user, uint256 requested, uint256 paid);

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

    // ------------------------------------------------------------------ withdrawBatch

    function _withdrawBatch(bytes32 id, address[] memory who, address[] memory to, uint256[] memory amounts)
        internal
        returns (bool)
    {
        vm.prank(operator);
        return users.withdrawBatch(id, who, to, amounts);
    }

    function test_WithdrawBatch_PaysDestinationsFromCustodyAndEmits() public {
        _grant(GRANT, _pair(alice, bob), _pair(100, 200));

        vm.expectEmit(address(users));
        emit Withdrawn(alice, carol, 40);
        vm.expectEmit(address(users));
        emit Withdrawn(bob, dave, 200);
        vm.expectEmit(address(users));
        emit WithdrawalBatch(WITHDRAWAL, 2, 240);
        assertTrue(_withdrawBatch(WITHDRAWAL, _pair(alice, bob), _pair(carol, dave), _pair(40, 200)));

        assertEq(users.balanceOf(alice), 60);
        assertEq(users.balanceOf(bob), 0);
        assertEq(users.totalBalances(), 60);
        assertEq(token.balanceOf(carol), 40);
        assertEq(token.balanceOf(dave), 200);
        assertTrue(users.withdrawalApplied(WITHDRAWAL));
        _assertCustody();
    }

    function test_WithdrawBatch_AppliedOnce_SecondCallIsNoOp() public {
        _grant(GRANT, _pair(alice, bob), _pair(100, 200));
        _withdrawBatch(WITHDRAWAL, _pair(alice, bob), _pair(carol, dave), _pair(40, 50));

        vm.expectEmit(address(users));
        emit WithdrawalBatchAlreadyApplied(WITHDRAWAL);
        assertFalse(_withdrawBatch(WITHDRAWAL, _pair(alice, bob), _pair(carol, dave), _pair(40, 50)));

        assertEq(users.balanceOf(alice), 60);
        assertEq(users.balanceOf(bob), 150);
        assertEq(token.balanceOf(carol), 40);
        assertEq(token.balanceOf(dave), 50);
        _assertCustody();

        // Even malformed entries under an applied id are a no-op rather than a revert.
        address[] memory one = new address[](1);
        assertFalse(_withdrawBatch(WITHDRAWAL, one, _pair(carol, dave), _pair(1, 2)));
    }

    function test_WithdrawBatch_ShortfallPaysWhatCustodyHolds() public {
        _deposit(alice, 100);
        vm.prank(alice);
        users.withdraw(70, alice);

        vm.expectEmit(address(users));
        emit WithdrawalShortfall(WITHDRAWAL, alice, 50, 30);
        vm.expectEmit(address(users));
        emit WithdrawalShortfall(WITHDRAWAL, bob, 10, 0);
        vm.expectEmit(address(users));
        emit WithdrawalBatch(WITHDRAWAL, 2, 30);
        assertTrue(_withdrawBatch(WITHDRAWAL, _pair(alice, bob), _pair(carol, dave), _pair(50, 10)));

        assertEq(users.balanceOf(alice), 0);
        assertEq(token.balanceOf(carol), 30);
        assertEq(token.balanceOf(dave), 0);
        assertTrue(users.withdrawalApplied(WITHDRAWAL));
        _assertCustody();
    }

    function test_WithdrawBatch_SameUserTwiceDrawsOnRemainingBalance() public {
        _deposit(alice, 100);
        assertTrue(_withdrawBatch(WITHDRAWAL, _pair(alice, alice), _pair(carol, dave), _pair(80, 80)));
        assertEq(token.balanceOf(carol), 80);
        assertEq(token.balanceOf(dave), 20);
        assertEq(users.balanceOf(alice), 0);
        _assertCustody();
    }

    function test_WithdrawBatch_DoesNotTouchTheSettlementOrGrantIds() public {
        _grant(GRANT, _pair(alice, bob), _pair(100, 200));
        // The same 32 bytes as a grant id: the two id spaces are separate.
        assertTrue(_withdrawBatch(GRANT, _pair(alice, bob), _pair(carol, dave), _pair(1, 1)));
        assertFalse(_grant(GRANT, _pair(alice, bob), _pair(100, 200)));
        assertEq(users.balanceOf(alice), 99);
    }

    function test_Revert_When_WithdrawBatchLengthMismatch_IdNotConsumed() public {
        address[] memory one = new address[](1);
        one[0] = alice;
        vm.expectRevert(abi.encodeWithSelector(UserRegistry.LengthMismatch.selector, 1, 2));
        _withdrawBatch(WITHDRAWAL, one, one, _pair(1, 2));
        vm.expectRevert(abi.encodeWithSelector(UserRegistry.LengthMismatch.selector, 2, 1));
        _withdrawBatch(WITHDRAWAL, _pair(alice, bob), one, _pair(1, 2));
        assertFalse(users.withdrawalApplied(WITHDRAWAL));
    }

    function test_Revert_When_WithdrawBatchTooLarge() public {
        uint256 n = users.MAX_BATCH() + 1;
        vm.expectRevert(abi.encodeWithSelector(UserRegistry.BatchTooLarge.selector, n, n - 1));
        _withdrawBatch(WITHDRAWAL, new address[](n), new address[](n), new uint256[](n));
    }

    function test_Revert_When_WithdrawBatchToZeroOrCustody_IdNotConsumed() public {
        _deposit(alice, 100);
        vm.expectRevert(abi.encodeWithSelector(UserRegistry.BadDestination.selector, 1, address(0)));
        _withdrawBatch(WITHDRAWAL, _pair(alice, alice), _pair(carol, address(0)), _pair(1, 1));
        vm.expectRevert(abi.encodeWithSelector(UserRegistry.BadDestination.selector, 0, address(users)));
        _withdrawBatch(WITHDRAWAL, _pair(alice, alice), _pair(address(users), carol), _pair(1, 1));
        assertFalse(users.withdrawalApplied(WITHDRAWAL));
        assertEq(users.balanceOf(alice), 100);
        assertEq(token.balanceOf(carol), 0);
    }

    function test_Revert_When_WithdrawBatchByNonWithdrawer() public {
        _deposit(alice, 100);
        bytes32 role = users.WITHDRAWER_ROLE();
        vm.expectRevert(_unauthorized(stranger, role));
        vm.prank(stranger);
        users.withdrawBatch(WITHDRAWAL, _pair(alice, bob), _pair(carol, dave), _pair(1, 0));
        // Neither the settler nor the faucet role may release custody.
        vm.expectRevert(_unauthorized(settler, role));
        vm.prank(settler);
        users.withdrawBatch(WITHDRAWAL, _pair(alice, bob), _pair(carol, dave), _pair(1, 0));
        bytes32 faucet = users.FAUCET_ROLE();
        vm.prank(admin);
        users.grantRole(faucet, stranger);
        vm.expectRevert(_unauthorized(stranger, role));
        vm.prank(stranger);
        users.withdrawBatch(WITHDRAWAL, _pair(alice, bob), _pair(carol, dave), _pair(1, 0));
        assertEq(users.balanceOf(alice), 100);
    }

    function testFuzz_WithdrawBatch_PaysMinOfAskedAndHeld(uint128 held, uint128 asked, uint128 other) public {
        held = uint128(bound(held, 0, 1_000_000 * LAI));
        other = uint128(bound(other, 1, 1_000_000 * LAI));
        if (held != 0) _deposit(alice, held);
        _deposit(bob, other);
        uint256 paid = asked <= held ? asked : held;

        assertTrue(_withdrawBatch(WITHDRAWAL, _pair(alice, bob), _pair(carol, dave), _pair(asked, other)));
        assertFalse(_withdrawBatch(WITHDRAWAL, _pair(alice, bob), _pair(carol, dave), _pair(asked, other)));

        assertEq(token.balanceOf(carol), paid);
        assertEq(users.balanceOf(alice), held - paid);
        assertEq(token.balanceOf(dave), other);
        assertEq(users.balanceOf(bob), 0);
        assertEq(users.totalBalances(), held - paid);
        _assertCustody();
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
