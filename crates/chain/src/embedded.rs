//! An in-process EVM (revm) that keeps its state in three files.
//!
//! Every transaction is its own block, mined at once. After each block its logs are appended to
//! a log file (`<state>.logs`, one JSON line each, synced), then what the block changed (the
//! accounts it touched, the storage slots it changed, the block counter and how many bytes of
//! the log file are valid) is appended to a journal (`<state>.journal`, one JSON line per block,
//! synced): that line is the block's commit. The whole state (accounts, code, storage) is a
//! snapshot (`<state>`, written to a temporary file and renamed over the previous one) taken when
//! the journal has grown past the snapshot's size, after which the journal starts again; opening
//! reads the snapshot and replays the journal's lines after it. So the work per block is in
//! proportion to what the block changed, not to the state, which grows with history (every
//! settlement batch's id is kept on-chain). A crash leaves a torn last line at most, in the
//! journal or the log file: both are cut back to the last committed block when the chain opens.
//! Transactions carry no signatures: the sender is whoever holds the embedding process, which is
//! why this chain is for a local network. Its methods block (EVM execution, file syncs):
//! [`crate::Chain`] runs them on tokio's blocking threads.

use std::io::{Seek, SeekFrom, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use alloy::primitives::{Address, Bytes, TxKind, U256, keccak256};
use revm::context::result::{ExecutionResult, Output};
use revm::context::{Context, TxEnv};
use revm::database::{AccountState, Cache, CacheDB, EmptyDB};
use revm::database_interface::WrapDatabaseRef;
use revm::handler::MainnetContext;
use revm::primitives::KECCAK_EMPTY;
use revm::state::{AccountInfo, EvmState};
use revm::{ExecuteCommitEvm, ExecuteEvm, MainBuilder, MainContext};
use serde::{Deserialize, Serialize};

use crate::{ChainError, ChainLog, Receipt, revert_reason};

/// Gas limit of every block, like a mainnet block.
const BLOCK_GAS_LIMIT: u64 = 30_000_000;
/// Most gas one transaction may use: 2^24, the per-transaction cap of EIP-7825 (Osaka), which
/// revm enforces and settlement batches are sized for.
pub const TX_GAS_LIMIT: u64 = 1 << 24;
/// The journal is folded into a new snapshot once it is larger than the snapshot and than this.
const MIN_JOURNAL_BYTES: u64 = 256 * 1024;

#[derive(Serialize, Deserialize)]
struct State {
    chain_id: u64,
    block: u64,
    timestamp: u64,
    /// Seconds added to the wall clock (tests move time forward to end epochs).
    time_offset: u64,
    cache: Cache,
    /// Every log, in block order (kept in memory for queries). On disk they live in the log
    /// file; a state file from before that held them here, and is moved over when opened.
    #[serde(default, skip_serializing)]
    logs: Vec<ChainLog>,
    /// Bytes of the log file that belong to committed blocks.
    #[serde(default)]
    logs_bytes: u64,
    /// How many changes (blocks and clock moves) this state holds: journal lines up to it are in
    /// the snapshot already.
    #[serde(default)]
    seq: u64,
    /// Bytes of the journal that belong to committed changes, and the last snapshot's size.
    #[serde(skip)]
    journal_bytes: u64,
    #[serde(skip)]
    snapshot_bytes: u64,
    /// Why this state can no longer be trusted to match the disk (the EVM panicked mid-block, or
    /// a block was executed but could not be saved): every later call is refused, and reopening
    /// the chain reloads the last saved block.
    #[serde(skip)]
    broken: Option<String>,
}

pub struct Embedded {
    chain_id: u64,
    path: Option<PathBuf>,
    state: Mutex<State>,
    /// Held for as long as this process owns the state file: two writers would fork the chain.
    _lock: Option<std::fs::File>,
    /// The last saved block, readable without waiting for a transaction that holds the state.
    head: AtomicU64,
    /// Journal size past which it is folded into a snapshot; `None`: the snapshot's size (at
    /// least [`MIN_JOURNAL_BYTES`]), so the snapshots' cost per block stays in proportion to a
    /// journal line.
    journal_cap: Option<u64>,
}

impl Embedded {
    /// Opens the chain persisted at `path`, or starts a new one there. Only one process may have
    /// it open at a time.
    pub fn open(path: &Path, chain_id: u64) -> Result<Self, ChainError> {
        Self::open_with(path, chain_id, None)
    }

    fn open_with(path: &Path, chain_id: u64, journal_cap: Option<u64>) -> Result<Self, ChainError> {
        let err = |message: String| ChainError::State {
            path: path.display().to_string(),
            message,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let lock =
            std::fs::File::create(path.with_extension("lock")).map_err(|e| err(e.to_string()))?;
        if lock.try_lock().is_err() {
            return Err(err(
                "is in use by another process (a running Nexus owns its embedded chain)".into(),
            ));
        }
        let mut had_snapshot = true;
        let mut state = match std::fs::read(path) {
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
                if state.chain_id != chain_id {
                    return Err(err(format!(
                        "holds chain {} but chain {chain_id} was asked for",
                        state.chain_id
                    )));
                }
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                had_snapshot = false;
                State::new(chain_id)
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let chain = Self {
            chain_id,
            path: Some(path.to_owned()),
            state: Mutex::new(State::new(chain_id)),
            _lock: Some(lock),
            head: AtomicU64::new(0),
            journal_cap,
        };
        let (logs_path, journal) = (logs_path(path), journal_path(path));
        if state.logs.is_empty() {
            state.journal_bytes = replay_journal(&journal, &mut state).map_err(err)?;
            state.logs = read_logs(&logs_path, state.logs_bytes).map_err(err)?;
        } else {
            // Written before the logs had a file of their own (and before the journal, so a
            // journal beside it is not its own): move them there once (a crash in between finds
            // them in the state file again and does it again).
            let lines = log_lines(&state.logs).map_err(err)?;
            state.logs_bytes = 0;
            state.logs_bytes = append_logs(&logs_path, &state, &lines).map_err(err)?;
            state.journal_bytes = len_of(&journal);
            had_snapshot = false;
        }
        // Every open starts from a whole snapshot (a new chain's names its chain id) and an
        // empty journal.
        if !had_snapshot || state.journal_bytes > 0 {
            chain.snapshot(&mut state)?;
        } else {
            state.snapshot_bytes = len_of(path);
        }
        if state.journal_bytes > 0 {
            truncate(&journal).map_err(|e| err(format!("{}: {e}", journal.display())))?;
            state.journal_bytes = 0;
        }
        chain.head.store(state.block, Ordering::Release);
        *chain.lock() = state;
        Ok(chain)
    }

    /// A chain that lives only in memory.
    pub fn in_memory(chain_id: u64) -> Self {
        Self {
            chain_id,
            path: None,
            state: Mutex::new(State::new(chain_id)),
            _lock: None,
            head: AtomicU64::new(0),
            journal_cap: None,
        }
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    pub fn block_number(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Moves this chain's clock forward (block timestamps are the wall clock plus this offset).
    pub fn advance_time(&self, seconds: u64) -> Result<(), ChainError> {
        let mut state = self.lock();
        state.usable()?;
        let before = state.time_offset;
        state.time_offset = state.time_offset.saturating_add(seconds);
        let saved = self.persist(&mut state, &[], Vec::new());
        if saved.is_err() {
            state.time_offset = before;
        }
        saved
    }

    pub(crate) fn send(
        &self,
        from: Address,
        to: Option<Address>,
        data: Bytes,
    ) -> Result<Receipt, ChainError> {
        let mut state = self.lock();
        state.usable()?;
        let block = state.block + 1;
        let timestamp = state.now();
        let hash = keccak256(
            [
                &self.chain_id.to_be_bytes()[..],
                &block.to_be_bytes(),
                from.as_slice(),
                &data,
            ]
            .concat(),
        );
        let tx = tx_env(
            self.chain_id,
            from,
            to.map_or(TxKind::Create, TxKind::Call),
            data,
        )?;
        let db = CacheDB {
            cache: std::mem::take(&mut state.cache),
            db: EmptyDB::default(),
        };
        let chain_id = self.chain_id;
        let run = catch_unwind(AssertUnwindSafe(move || {
            let mut evm = block_context(chain_id, block, timestamp)
                .with_db(db)
                .build_mainnet();
            // `transact_commit`, with what the block changed noted before it is committed.
            let (result, changes) = match evm.transact(tx) {
                Ok(out) => {
                    let changes = changes_of(&out.state);
                    evm.commit(out.state);
                    (Ok(out.result), changes)
                }
                Err(e) => (Err(e), Vec::new()),
            };
            // The state back whatever happened: a failed transaction changed nothing.
            let cache = std::mem::take(&mut evm.ctx.journaled_state.database.cache);
            (result, changes, cache)
        }));
        let Ok((result, changes, cache)) = run else {
            // The state went down with the panic; the disk still has the last block.
            state.broken = Some(format!("the EVM panicked executing block {block}"));
            return Err(ChainError::Evm(format!(
                "the EVM panicked executing block {block}; reopen the chain"
            )));
        };
        state.cache = cache;
        let result = result.map_err(|e| ChainError::Evm(format!("{e:?}")))?;
        match result {
            ExecutionResult::Success {
                gas, logs, output, ..
            } => {
                let created = match output {
                    Output::Create(_, address) => address,
                    Output::Call(_) => None,
                };
                state.block = block;
                state.timestamp = timestamp;
                let new: Vec<ChainLog> = logs
                    .iter()
                    .enumerate()
                    .map(|(i, log)| ChainLog {
                        block,
                        tx_hash: hash,
                        index: i as u64,
                        log: log.clone(),
                    })
                    .collect();
                let before = state.logs_bytes;
                if let Err(e) = self.persist(&mut state, &new, changes) {
                    state.logs_bytes = before;
                    // Executed in memory but not saved: what callers read from here on would
                    // not survive a restart, so nothing more is served until one.
                    state.broken = Some(format!("block {block} was executed but not saved: {e}"));
                    return Err(e);
                }
                state.logs.extend(new);
                self.head.store(block, Ordering::Release);
                Ok(Receipt {
                    hash,
                    block,
                    gas_used: gas.tx_gas_used(),
                    logs,
                    created,
                })
            }
            ExecutionResult::Revert { output, .. } => {
                Err(ChainError::Reverted(revert_reason(&output)))
            }
            ExecutionResult::Halt { reason, .. } => {
                Err(ChainError::Reverted(format!("halted: {reason:?}")))
            }
        }
    }

    pub(crate) fn call(&self, to: Address, data: Bytes) -> Result<Bytes, ChainError> {
        let tx = tx_env(self.chain_id, Address::ZERO, TxKind::Call(to), data)?;
        let mut state = self.lock();
        state.usable()?;
        // A read runs against the state by reference (nothing is copied, nothing committed):
        // the lock is held for the call, like a transaction holds it.
        let db = CacheDB {
            cache: std::mem::take(&mut state.cache),
            db: EmptyDB::default(),
        };
        let (block, timestamp, chain_id) = (state.block, state.now(), self.chain_id);
        let result = catch_unwind(AssertUnwindSafe(|| {
            block_context(chain_id, block, timestamp)
                .with_db(WrapDatabaseRef(&db))
                .build_mainnet()
                .transact(tx)
        }));
        // Read by reference, so the state is intact even if the EVM panicked.
        state.cache = db.cache;
        drop(state);
        let result = result.map_err(|_| ChainError::Evm("the EVM panicked in a call".into()))?;
        let result = result
            .map_err(|e| ChainError::Evm(format!("{e:?}")))?
            .result;
        match result {
            ExecutionResult::Success { output, .. } => Ok(output.into_data()),
            ExecutionResult::Revert { output, .. } => {
                Err(ChainError::Reverted(revert_reason(&output)))
            }
            ExecutionResult::Halt { reason, .. } => {
                Err(ChainError::Reverted(format!("halted: {reason:?}")))
            }
        }
    }

    pub(crate) fn logs(&self, address: Address, from: u64, to: u64) -> Vec<ChainLog> {
        let state = self.lock();
        // Logs are stored in block order: find the first one at or after `from`.
        let start = state.logs.partition_point(|l| l.block < from);
        state.logs[start..]
            .iter()
            .take_while(|l| l.block <= to)
            .filter(|l| l.log.address == address)
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The EVM's panics are caught under the lock, and a state that may differ from the disk
        // is marked `broken`, so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a new block's logs (if any) to the log file, then the change — the block's (or the
    /// clock's) new values and `changes` — to the journal, which commits it; folds the journal
    /// into a new snapshot when it has grown past the snapshot. On an error the state in memory
    /// must keep its old `logs_bytes` (the caller restores it); nothing else was changed.
    fn persist(
        &self,
        state: &mut State,
        new_logs: &[ChainLog],
        changes: Vec<AccountChange>,
    ) -> Result<(), ChainError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let err = |message: String| ChainError::State {
            path: path.display().to_string(),
            message,
        };
        if !new_logs.is_empty() {
            let lines = log_lines(new_logs).map_err(err)?;
            state.logs_bytes = append_logs(&logs_path(path), state, &lines).map_err(err)?;
        }
        let entry = JournalEntry {
            seq: state.seq + 1,
            block: state.block,
            timestamp: state.timestamp,
            time_offset: state.time_offset,
            logs_bytes: state.logs_bytes,
            accounts: changes,
        };
        let mut line = serde_json::to_vec(&entry).map_err(|e| err(e.to_string()))?;
        line.push(b'\n');
        let journal = journal_path(path);
        state.journal_bytes = append_at(&journal, state.journal_bytes, &line).map_err(err)?;
        state.seq = entry.seq;
        let cap = self
            .journal_cap
            .unwrap_or(state.snapshot_bytes.max(MIN_JOURNAL_BYTES));
        if state.journal_bytes > cap {
            // The change is committed already; a snapshot that fails is tried again later.
            match self.snapshot(state) {
                Ok(()) => {
                    // Lines the snapshot holds are skipped when the chain opens, so a crash
                    // before the journal is emptied loses nothing.
                    match truncate(&journal) {
                        Ok(()) => state.journal_bytes = 0,
                        Err(e) => {
                            tracing::warn!(error = %e, "the embedded chain's journal could not be emptied")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the embedded chain's snapshot failed; its journal keeps growing")
                }
            }
        }
        Ok(())
    }

    /// Writes the whole state (temporary file, then rename).
    fn snapshot(&self, state: &mut State) -> Result<(), ChainError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let err = |message: String| ChainError::State {
            path: path.display().to_string(),
            message,
        };
        let bytes = serde_json::to_vec(&*state).map_err(|e| err(e.to_string()))?;
        let io = |e: std::io::Error| err(e.to_string());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        sync_dir(path).map_err(io)?;
        state.snapshot_bytes = bytes.len() as u64;
        Ok(())
    }
}

/// One journal line: a committed block's (or clock move's) new values and what it changed.
#[derive(Serialize, Deserialize)]
struct JournalEntry {
    seq: u64,
    block: u64,
    timestamp: u64,
    time_offset: u64,
    logs_bytes: u64,
    accounts: Vec<AccountChange>,
}

/// What a block did to one account, as `CacheDB::commit` applies it.
#[derive(Serialize, Deserialize)]
struct AccountChange {
    address: Address,
    /// Selfdestructed: the account is gone and its storage with it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    destroyed: bool,
    /// Created in this block: its storage starts empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    created: bool,
    /// Balance, nonce and code hash; the code itself only when the account was created.
    info: AccountInfo,
    /// The storage slots whose value changed, with their new values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    storage: Vec<(U256, U256)>,
}

/// What an executed transaction changed, in a stable order (a line reads the same every time).
fn changes_of(state: &EvmState) -> Vec<AccountChange> {
    let mut out: Vec<AccountChange> = state
        .iter()
        .filter(|(_, a)| a.is_touched())
        .map(|(address, a)| {
            let created = a.is_created();
            let mut info = a.info.clone();
            if !created {
                // Known already: kept once, in the snapshot's contracts.
                info.code = None;
            }
            let mut storage: Vec<(U256, U256)> = a
                .storage
                .iter()
                .filter(|(_, slot)| slot.is_changed())
                .map(|(k, slot)| (*k, slot.present_value))
                .collect();
            storage.sort_unstable();
            AccountChange {
                address: *address,
                destroyed: a.is_selfdestructed(),
                created,
                info,
                storage,
            }
        })
        .collect();
    out.sort_unstable_by_key(|c| c.address);
    out
}

/// Applies a journal line's account change to the cache, as `CacheDB::commit` did when the block
/// ran (the cache keeps an account's code beside its info, and in its contracts by hash).
fn apply_change(cache: &mut Cache, change: AccountChange) {
    if change.destroyed {
        let account = cache.accounts.entry(change.address).or_default();
        account.storage.clear();
        account.account_state = AccountState::NotExisting;
        account.info = AccountInfo::default();
        return;
    }
    let mut info = change.info;
    match &info.code {
        Some(code) if !code.is_empty() => {
            if info.code_hash == KECCAK_EMPTY {
                info.code_hash = code.hash_slow();
            }
            cache
                .contracts
                .entry(info.code_hash)
                .or_insert_with(|| code.clone());
        }
        Some(_) => {}
        None => {
            if info.code_hash != KECCAK_EMPTY && !info.code_hash.is_zero() {
                info.code = cache.contracts.get(&info.code_hash).cloned();
            }
        }
    }
    if info.code_hash.is_zero() {
        info.code_hash = KECCAK_EMPTY;
    }
    let account = cache.accounts.entry(change.address).or_default();
    account.info = info;
    account.account_state = if change.created {
        account.storage.clear();
        AccountState::StorageCleared
    } else if account.account_state.is_storage_cleared() {
        AccountState::StorageCleared
    } else {
        AccountState::Touched
    };
    account.storage.extend(change.storage);
}

/// The EVM context of a block of this chain (no nonce checks, no base fee).
fn block_context(chain_id: u64, block: u64, timestamp: u64) -> MainnetContext<EmptyDB> {
    Context::mainnet()
        .modify_cfg_chained(|cfg| {
            cfg.chain_id = chain_id;
            cfg.disable_nonce_check = true;
        })
        .modify_block_chained(|b| {
            b.number = U256::from(block);
            b.timestamp = U256::from(timestamp);
            b.gas_limit = BLOCK_GAS_LIMIT;
            b.basefee = 0;
        })
}

/// A transaction (or read) with the per-transaction gas cap and no gas price.
fn tx_env(chain_id: u64, caller: Address, kind: TxKind, data: Bytes) -> Result<TxEnv, ChainError> {
    TxEnv::builder()
        .caller(caller)
        .kind(kind)
        .data(data)
        .gas_limit(TX_GAS_LIMIT)
        .gas_price(0)
        .chain_id(Some(chain_id))
        .build()
        .map_err(|e| ChainError::Evm(format!("{e:?}")))
}

/// The log file beside a state file.
fn logs_path(state: &Path) -> PathBuf {
    state.with_extension("logs")
}

/// Logs as JSON lines.
fn log_lines(logs: &[ChainLog]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for log in logs {
        serde_json::to_writer(&mut out, log).map_err(|e| e.to_string())?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Writes `lines` after the valid part of the log file (anything a failed write left beyond it
/// is dropped first) and syncs it; returns the file's new valid length.
fn append_logs(path: &Path, state: &State, lines: &[u8]) -> Result<u64, String> {
    append_at(path, state.logs_bytes, lines)
}

/// Writes `bytes` at `valid` (the length of the file's committed part: anything a failed write
/// left beyond it is dropped first) and syncs the file; returns its new valid length.
fn append_at(path: &Path, valid: u64, bytes: &[u8]) -> Result<u64, String> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    f.set_len(valid).map_err(io)?;
    f.seek(SeekFrom::Start(valid)).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_data().map_err(io)?;
    if valid == 0 {
        // Perhaps a new file: its directory entry must be durable too.
        sync_dir(path).map_err(io)?;
    }
    Ok(valid + bytes.len() as u64)
}

/// A file's length (0 when it is missing).
fn len_of(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Empties a file (durably).
fn truncate(path: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(0)?;
    f.sync_data()
}

/// The journal beside a state file.
fn journal_path(state: &Path) -> PathBuf {
    state.with_extension("journal")
}

/// Replays the journal's committed lines after the snapshot's into `state`; returns the
/// journal's committed length. A last line a crash left torn (no newline, or not a whole entry)
/// is cut off; a line out of sequence is an error (the files do not belong together).
fn replay_journal(path: &Path, state: &mut State) -> Result<u64, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut valid = 0usize;
    while let Some(end) = bytes[valid..].iter().position(|b| *b == b'\n') {
        let Ok(entry) = serde_json::from_slice::<JournalEntry>(&bytes[valid..valid + end]) else {
            break;
        };
        if entry.seq > state.seq {
            if entry.seq != state.seq + 1 {
                return Err(format!(
                    "{}: change {} follows change {}",
                    path.display(),
                    entry.seq,
                    state.seq
                ));
            }
            state.seq = entry.seq;
            state.block = entry.block;
            state.timestamp = entry.timestamp;
            state.time_offset = entry.time_offset;
            state.logs_bytes = entry.logs_bytes;
            for change in entry.accounts {
                apply_change(&mut state.cache, change);
            }
        }
        valid += end + 1;
    }
    if valid < bytes.len() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.set_len(valid as u64)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.sync_data()
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(valid as u64)
}

/// The logs of committed blocks: the first `valid` bytes of the log file (what lies beyond was
/// appended for a block whose state never landed, and is cut off).
fn read_logs(path: &Path, valid: u64) -> Result<Vec<ChainLog>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && valid == 0 => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let valid_len = usize::try_from(valid).unwrap_or(usize::MAX);
    if bytes.len() < valid_len {
        return Err(format!(
            "{} holds {} bytes but the state names {valid}",
            path.display(),
            bytes.len()
        ));
    }
    let logs = bytes[..valid_len]
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).map_err(|e| format!("{}: {e}", path.display())))
        .collect::<Result<Vec<ChainLog>, String>>()?;
    if bytes.len() > valid_len {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.set_len(valid)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.sync_data()
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(logs)
}

/// Makes a rename or a new file in `file`'s directory durable.
fn sync_dir(file: &Path) -> std::io::Result<()> {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

impl State {
    fn usable(&self) -> Result<(), ChainError> {
        match &self.broken {
            None => Ok(()),
            Some(why) => Err(ChainError::Evm(format!(
                "the embedded chain stopped ({why}); restart to reload it from disk"
            ))),
        }
    }

    fn new(chain_id: u64) -> Self {
        Self {
            chain_id,
            block: 0,
            timestamp: 0,
            time_offset: 0,
            cache: Cache::default(),
            logs: Vec::new(),
            logs_bytes: 0,
            seq: 0,
            journal_bytes: 0,
            snapshot_bytes: 0,
            broken: None,
        }
    }

    /// The next block's timestamp: the clock (plus offset), never earlier than the last block.
    fn now(&self) -> u64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        wall.saturating_add(self.time_offset).max(self.timestamp)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use alloy::primitives::B256;
    use alloy::signers::local::PrivateKeySigner;

    use super::*;
    use crate::{Chain, DeployParams, GrantEntry, Protocol};

    /// What a block writes is its own changes, however much history the state holds (every
    /// grant batch's id stays in `UserRegistry.granted`); the journal is folded into snapshots,
    /// which do grow; reopening replays the journal after the last snapshot, cutting off a torn
    /// line.
    #[tokio::test(flavor = "current_thread")]
    async fn a_block_writes_its_changes_and_the_journal_folds_into_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let journal = journal_path(&path);
        let deployment_file = dir.path().join("deployment.json");
        let operator = PrivateKeySigner::random();
        let params = DeployParams::local(Address::repeat_byte(0xee));
        let user = Address::repeat_byte(1);
        let open = || {
            let chain = Arc::new(Embedded::open_with(&path, 9, Some(16 * 1024)).unwrap());
            Protocol::open_or_deploy(
                Chain::Embedded(chain),
                operator.clone(),
                &deployment_file,
                &params,
            )
        };
        let p = open().await.unwrap();
        let grant = |p: &Protocol, i: u64| {
            let p = p.clone();
            async move {
                let entry = GrantEntry {
                    user,
                    amount: U256::from(1),
                };
                assert!(
                    p.grant_batch(B256::from(U256::from(i)), &[entry])
                        .await
                        .unwrap()
                        .applied
                );
            }
        };
        let (mut lines, mut snapshots) = (Vec::new(), Vec::new());
        for i in 1..=60 {
            let (journal_before, snapshot_before) = (len_of(&journal), len_of(&path));
            grant(&p, i).await;
            if len_of(&path) != snapshot_before {
                snapshots.push(len_of(&path));
            } else {
                lines.push(len_of(&journal) - journal_before);
            }
        }
        assert!(snapshots.len() >= 3, "folded {} times", snapshots.len());
        assert!(
            snapshots.windows(2).all(|w| w[1] > w[0]),
            "the state grows with history: {snapshots:?}"
        );
        let (lo, hi) = (lines.iter().min().unwrap(), lines.iter().max().unwrap());
        assert!(
            hi - lo < 128 && *hi < 4096,
            "a grant's journal line stays the size of its changes: {lo}..{hi} bytes"
        );
        let block = p.chain().block_number().await.unwrap();
        assert_eq!(p.user_balance(user).await.unwrap(), U256::from(60));
        drop(p);

        // A crash mid-append: a torn last line is cut off, the committed ones are replayed (and
        // folded into a snapshot: every open starts with an empty journal).
        assert!(
            len_of(&journal) > 0,
            "the journal has lines after the last snapshot"
        );
        let snapshot = len_of(&path);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&journal)
            .unwrap();
        f.write_all(b"{\"seq\":999,\"block\":").unwrap();
        drop(f);
        let p = open().await.unwrap();
        assert_eq!(len_of(&journal), 0);
        assert!(len_of(&path) > snapshot);
        assert_eq!(p.chain().block_number().await.unwrap(), block);
        assert_eq!(p.user_balance(user).await.unwrap(), U256::from(60));
        // The ids granted before are still known (a replayed grant is refused), new ones apply.
        let again = p
            .grant_batch(
                B256::from(U256::from(7)),
                &[GrantEntry {
                    user,
                    amount: U256::from(1),
                }],
            )
            .await
            .unwrap();
        assert!(!again.applied);
        grant(&p, 61).await;
        assert_eq!(p.user_balance(user).await.unwrap(), U256::from(61));
    }
}
