//! An in-process EVM (revm) that keeps its state in two files.
//!
//! Every transaction is its own block, mined at once. After each block its logs are appended to
//! a log file (`<state>.logs`, one JSON line each, synced), then the state (accounts, code,
//! storage, the block counter and how many bytes of the log file are valid) is written to a
//! temporary file and renamed over the previous one. A crash leaves either the old or the new
//! state, never a mix: log lines past the length the state names are cut off when the chain
//! opens, so a restart continues from the last committed block. The logs grow with time but are
//! only ever appended; what is rewritten per block is the state, which grows with the protocol's
//! users and nodes, not with its history. Transactions carry no signatures: the sender is whoever
//! holds the embedding process, which is why this chain is for a local network. Its methods block
//! (EVM execution, file syncs): [`crate::Chain`] runs them on tokio's blocking threads.

use std::io::{Seek, SeekFrom, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use alloy::primitives::{Address, Bytes, TxKind, U256, keccak256};
use revm::context::result::{ExecutionResult, Output};
use revm::context::{Context, TxEnv};
use revm::database::{Cache, CacheDB, EmptyDB};
use revm::database_interface::WrapDatabaseRef;
use revm::handler::MainnetContext;
use revm::{ExecuteCommitEvm, ExecuteEvm, MainBuilder, MainContext};
use serde::{Deserialize, Serialize};

use crate::{ChainError, ChainLog, Receipt, revert_reason};

/// Gas limit of every block, like a mainnet block.
const BLOCK_GAS_LIMIT: u64 = 30_000_000;
/// Most gas one transaction may use: 2^24, the per-transaction cap of EIP-7825 (Osaka), which
/// revm enforces and settlement batches are sized for.
pub const TX_GAS_LIMIT: u64 = 1 << 24;

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
}

impl Embedded {
    /// Opens the chain persisted at `path`, or starts a new one there. Only one process may have
    /// it open at a time.
    pub fn open(path: &Path, chain_id: u64) -> Result<Self, ChainError> {
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::new(chain_id),
            Err(e) => return Err(err(e.to_string())),
        };
        let chain = Self {
            chain_id,
            path: Some(path.to_owned()),
            state: Mutex::new(State::new(chain_id)),
            _lock: Some(lock),
            head: AtomicU64::new(0),
        };
        let logs_path = logs_path(path);
        if state.logs.is_empty() {
            state.logs = read_logs(&logs_path, state.logs_bytes).map_err(err)?;
        } else {
            // Written before the logs had a file of their own: move them there once (a crash
            // in between finds them in the state file again and does it again).
            let lines = log_lines(&state.logs).map_err(err)?;
            state.logs_bytes = 0;
            state.logs_bytes = append_logs(&logs_path, &state, &lines).map_err(err)?;
            chain.persist(&mut state, &[])?;
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
        let saved = self.persist(&mut state, &[]);
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
            let result = evm.transact_commit(tx);
            // The state back whatever happened: a failed transaction changed nothing.
            let cache = std::mem::take(&mut evm.ctx.journaled_state.database.cache);
            (result, cache)
        }));
        let Ok((result, cache)) = run else {
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
                if let Err(e) = self.persist(&mut state, &new) {
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

    /// Appends a new block's logs (if any) to the log file, then writes the state naming the
    /// log file's new length. On an error the state in memory must keep its old `logs_bytes`.
    fn persist(&self, state: &mut State, new_logs: &[ChainLog]) -> Result<(), ChainError> {
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
        sync_dir(path).map_err(io)
    }
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
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    f.set_len(state.logs_bytes).map_err(io)?;
    f.seek(SeekFrom::Start(state.logs_bytes)).map_err(io)?;
    f.write_all(lines).map_err(io)?;
    f.sync_data().map_err(io)?;
    if state.logs_bytes == 0 {
        // Perhaps a new file: its directory entry must be durable too.
        sync_dir(path).map_err(io)?;
    }
    Ok(state.logs_bytes + lines.len() as u64)
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
