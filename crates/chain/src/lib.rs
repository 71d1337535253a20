//! The protocol's contracts from Rust.
//!
//! [`Chain`] runs transactions either on an **embedded** in-process EVM ([`Embedded`], revm with
//! its state persisted on disk — the default for `lattice up`) or on any EVM node over JSON-RPC
//! ([`Rpc`], e.g. anvil). [`Protocol`] deploys the five contracts (the committed artifacts in
//! `contracts/artifacts/`, so neither Node nor solc is needed to build) and wraps the calls Nexus
//! makes: idempotent faucet grants, usage settlement and withdrawals, node registration and status, balances.

mod bindings;
mod embedded;
mod protocol;
mod rpc;

pub use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
pub use alloy::signers::local::PrivateKeySigner;
pub use bindings::{LAIToken, NetworkStatus, NodeRegistry, Tokenomics, UserRegistry};
pub use embedded::{Embedded, TX_GAS_LIMIT};
pub use protocol::{
    DeployParams, Deployment, Deposit, FeeSplit, GrantEntry, NodeOffer, NodeState, PoolState,
    Protocol, SettleEntry, Shortfall, StakePosition, Submitted, WithdrawEntry, deposit_calls,
    stake_calls,
};
pub use rpc::Rpc;

use alloy::primitives::Log;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("transaction reverted: {0}")]
    Reverted(String),
    #[error("EVM error: {0}")]
    Evm(String),
    #[error("RPC error: {0}")]
    Rpc(String),
    #[error("state file {path}: {message}")]
    State { path: String, message: String },
    #[error("unexpected answer from the chain: {0}")]
    Decode(String),
    #[error("deployment file {path}: {message}")]
    Deployment { path: String, message: String },
}

/// What a mined transaction did.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub hash: B256,
    pub block: u64,
    pub gas_used: u64,
    pub logs: Vec<Log>,
    /// Set for contract creations.
    pub created: Option<Address>,
}

/// A log with where it was emitted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainLog {
    pub block: u64,
    pub tx_hash: B256,
    pub index: u64,
    pub log: Log,
}

/// An EVM chain: embedded or remote.
#[derive(Clone)]
pub enum Chain {
    Embedded(std::sync::Arc<Embedded>),
    Rpc(std::sync::Arc<Rpc>),
}

impl Chain {
    pub fn chain_id(&self) -> u64 {
        match self {
            Chain::Embedded(c) => c.chain_id(),
            Chain::Rpc(c) => c.chain_id(),
        }
    }

    /// "embedded" (in Nexus's process, no RPC endpoint for wallets) or "rpc".
    pub fn kind(&self) -> &'static str {
        match self {
            Chain::Embedded(_) => "embedded",
            Chain::Rpc(_) => "rpc",
        }
    }

    /// Sends a transaction from `from` (a call, or a creation when `to` is None) and waits until
    /// it is mined. A revert is an error carrying the decoded reason.
    pub async fn send(
        &self,
        from: &PrivateKeySigner,
        to: Option<Address>,
        data: Bytes,
    ) -> Result<Receipt, ChainError> {
        match self {
            Chain::Embedded(c) => {
                let (c, from) = (c.clone(), from.address());
                blocking(move || c.send(from, to, data)).await
            }
            Chain::Rpc(c) => c.send(from, to, data).await,
        }
    }

    /// A read-only call against the latest state.
    pub async fn call(&self, to: Address, data: Bytes) -> Result<Bytes, ChainError> {
        match self {
            Chain::Embedded(c) => {
                let c = c.clone();
                blocking(move || c.call(to, data)).await
            }
            Chain::Rpc(c) => c.call(to, data).await,
        }
    }

    pub async fn block_number(&self) -> Result<u64, ChainError> {
        match self {
            Chain::Embedded(c) => Ok(c.block_number()),
            Chain::Rpc(c) => c.block_number().await,
        }
    }

    /// Logs emitted by `address` in blocks `from..=to`.
    pub async fn logs(
        &self,
        address: Address,
        from: u64,
        to: u64,
    ) -> Result<Vec<ChainLog>, ChainError> {
        match self {
            Chain::Embedded(c) => {
                let c = c.clone();
                blocking(move || Ok(c.logs(address, from, to))).await
            }
            Chain::Rpc(c) => c.logs(address, from, to).await,
        }
    }
}

/// Runs the embedded chain's blocking work (EVM execution, file syncs) off the async runtime,
/// so requests sharing the runtime are not held up by a settlement transaction.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ChainError> + Send + 'static,
) -> Result<T, ChainError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ChainError::Evm(format!("the embedded chain's task failed: {e}")))?
}

/// Turns revert data into a readable reason, decoding the protocol's custom errors.
pub(crate) fn revert_reason(data: &[u8]) -> String {
    use alloy::sol_types::SolInterface;
    macro_rules! try_decode {
        ($($errors:ty),*) => {
            $(if let Ok(e) = <$errors>::abi_decode(data) {
                return format!("{e:?}");
            })*
        };
    }
    try_decode!(
        bindings::Tokenomics::TokenomicsErrors,
        bindings::UserRegistry::UserRegistryErrors,
        bindings::NodeRegistry::NodeRegistryErrors,
        bindings::NetworkStatus::NetworkStatusErrors,
        bindings::LAIToken::LAITokenErrors
    );
    if let Ok(reason) = alloy::sol_types::decode_revert_reason(data).ok_or(()) {
        return reason;
    }
    format!("0x{}", alloy::hex::encode(data))
}
