//! Any EVM node over JSON-RPC (anvil in the tests).

use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, Bytes};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::rpc::types::{Filter, TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::{RpcError, TransportErrorKind};

use crate::{ChainError, ChainLog, Receipt, revert_reason};

pub struct Rpc {
    url: reqwest::Url,
    chain_id: u64,
}

impl Rpc {
    /// Connects to `url` and learns its chain id.
    pub async fn connect(url: &str) -> Result<Self, ChainError> {
        let url: reqwest::Url = url
            .parse()
            .map_err(|e| ChainError::Rpc(format!("bad RPC URL {url}: {e}")))?;
        let provider = ProviderBuilder::new().connect_http(url.clone());
        let chain_id = provider.get_chain_id().await.map_err(rpc_error)?;
        Ok(Self { url, chain_id })
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    pub(crate) async fn send(
        &self,
        from: &PrivateKeySigner,
        to: Option<Address>,
        data: Bytes,
    ) -> Result<Receipt, ChainError> {
        let provider = ProviderBuilder::new()
            .wallet(EthereumWallet::from(from.clone()))
            .connect_http(self.url.clone());
        let mut tx = TransactionRequest::default()
            .with_from(from.address())
            .with_input(data)
            .with_chain_id(self.chain_id);
        match to {
            Some(to) => tx = tx.with_to(to),
            None => tx.set_create(),
        }
        // Gas estimation runs the transaction first, so a revert surfaces here with its reason.
        let receipt: TransactionReceipt = provider
            .send_transaction_sync(tx)
            .await
            .map_err(rpc_error)?;
        if !receipt.status() {
            return Err(ChainError::Reverted(format!(
                "transaction {} failed",
                receipt.transaction_hash
            )));
        }
        Ok(Receipt {
            hash: receipt.transaction_hash,
            block: receipt.block_number.unwrap_or_default(),
            gas_used: receipt.gas_used,
            logs: receipt.logs().iter().map(|l| l.inner.clone()).collect(),
            created: receipt.contract_address,
        })
    }

    pub(crate) async fn call(&self, to: Address, data: Bytes) -> Result<Bytes, ChainError> {
        let provider = ProviderBuilder::new().connect_http(self.url.clone());
        let tx = TransactionRequest::default().with_to(to).with_input(data);
        provider.call(tx).await.map_err(rpc_error)
    }

    pub(crate) async fn block_number(&self) -> Result<u64, ChainError> {
        let provider = ProviderBuilder::new().connect_http(self.url.clone());
        provider.get_block_number().await.map_err(rpc_error)
    }

    pub(crate) async fn logs(
        &self,
        address: Address,
        from: u64,
        to: u64,
    ) -> Result<Vec<ChainLog>, ChainError> {
        let provider = ProviderBuilder::new().connect_http(self.url.clone());
        let filter = Filter::new().address(address).from_block(from).to_block(to);
        let logs = provider.get_logs(&filter).await.map_err(rpc_error)?;
        logs.into_iter()
            .map(|l| {
                Ok(ChainLog {
                    block: l
                        .block_number
                        .ok_or_else(|| ChainError::Decode("log without a block".into()))?,
                    tx_hash: l
                        .transaction_hash
                        .ok_or_else(|| ChainError::Decode("log without a transaction".into()))?,
                    index: l.log_index.unwrap_or_default(),
                    log: l.inner,
                })
            })
            .collect()
    }
}

fn rpc_error(e: RpcError<TransportErrorKind>) -> ChainError {
    if let Some(payload) = e.as_error_resp() {
        if let Some(data) = payload.as_revert_data() {
            return ChainError::Reverted(revert_reason(&data));
        }
        return ChainError::Rpc(payload.message.to_string());
    }
    ChainError::Rpc(e.to_string())
}
