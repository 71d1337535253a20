//! Deploying the protocol and the calls Nexus makes to it.

use std::path::Path;

use alloy::primitives::aliases::U96;
use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolCall, SolConstructor, SolEvent};
use serde::{Deserialize, Serialize};

use crate::bindings::{LAIToken, NetworkStatus, NodeRegistry, Tokenomics, UserRegistry};
use crate::{Chain, ChainError, Receipt};

/// Where the protocol's contracts live on a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub chain_id: u64,
    pub token: Address,
    pub users: Address,
    pub nodes: Address,
    pub status: Address,
    pub tokenomics: Address,
    /// Block of the first deployment transaction: where log scans start.
    pub block: u64,
}

/// Genesis parameters of a deployment.
#[derive(Debug, Clone)]
pub struct DeployParams {
    pub supply_cap: U256,
    /// What the faucet (UserRegistry's grants) may ever mint.
    pub faucet_budget: U256,
    /// What epoch rewards may ever mint.
    pub emission_budget: U256,
    pub emission_per_epoch: U256,
    /// What the operator may mint itself (stakes of local nodes, `lattice chain faucet`).
    pub operator_budget: U256,
    pub min_stake: U256,
    pub unbonding_delay: u64,
    pub epoch_length: u64,
    pub min_reputation: u16,
    /// Receives slashed stake.
    pub treasury: Address,
}

impl DeployParams {
    /// Parameters for a local network: 1e9 LAI cap, generous budgets, 10 LAI minimum stake,
    /// one-hour epochs, one-day unbonding.
    pub fn local(treasury: Address) -> Self {
        let lai = U256::from(10u64).pow(U256::from(18u64));
        Self {
            supply_cap: lai * U256::from(1_000_000_000u64),
            faucet_budget: lai * U256::from(100_000_000u64),
            emission_budget: lai * U256::from(100_000_000u64),
            emission_per_epoch: lai * U256::from(1_000u64),
            operator_budget: lai * U256::from(100_000_000u64),
            min_stake: lai * U256::from(10u64),
            unbonding_delay: 86_400,
            epoch_length: 3_600,
            min_reputation: 2_000,
            treasury,
        }
    }
}

/// One line of a settlement batch: what `user` pays `node`, netted over many requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleEntry {
    pub user: Address,
    pub node: Address,
    pub amount: U256,
    pub tokens: u64,
    pub requests: u32,
}

/// One line of a faucet grant batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantEntry {
    pub user: Address,
    pub amount: U256,
}

/// One line of a withdrawal batch: custody of `user` pays `amount` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithdrawEntry {
    pub user: Address,
    pub to: Address,
    pub amount: U256,
}

/// A withdrawal line the chain paid only in part (custody held less than asked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub user: Address,
    pub requested: U256,
    pub paid: U256,
}

/// What a node offers, as registered on-chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOffer {
    /// 0 = llm, 1 = knowledge, 2 = agent.
    pub kind: u8,
    pub models: Vec<String>,
    pub price_in: u128,
    pub price_out: u128,
    pub metadata_uri: String,
}

/// A node as the NodeRegistry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub registered: bool,
    pub active: bool,
    pub reputation: u16,
    pub stake: U256,
    pub models: Vec<String>,
}

/// A node's staking pool in Tokenomics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolState {
    /// Everything staked into the pool.
    pub staked: U256,
    /// Pool income received and not yet claimed by its stakers.
    pub unclaimed: U256,
}

/// How Tokenomics splits each settled charge, in basis points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeeSplit {
    pub node_bps: u16,
    pub pool_bps: u16,
    pub treasury_bps: u16,
}

/// One staker's position in a node's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StakePosition {
    pub amount: U256,
    /// Rewards earned and not yet claimed.
    pub pending_reward: U256,
}

/// The outcome of submitting an idempotent batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// False when the id had already been applied (this submission changed nothing).
    pub applied: bool,
    pub tx_hash: B256,
}

/// An on-chain deposit into a user's custody balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deposit {
    /// `txhash:logindex`, unique per event.
    pub id: String,
    pub block: u64,
    pub user: Address,
    pub from: Address,
    pub amount: U256,
}

fn role(name: &str) -> B256 {
    keccak256(name.as_bytes())
}

/// The deployed protocol, driven by the operator's key.
#[derive(Clone)]
pub struct Protocol {
    chain: Chain,
    operator: PrivateKeySigner,
    deployment: Deployment,
    /// Held through the operator's multi-transaction sequences (mint, approve, register), which
    /// another caller's must not interleave with: `approve` sets the allowance, it does not add.
    sequence: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Protocol {
    pub fn attach(chain: Chain, operator: PrivateKeySigner, deployment: Deployment) -> Self {
        Self {
            chain,
            operator,
            deployment,
            sequence: Default::default(),
        }
    }

    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    pub fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    pub fn operator(&self) -> Address {
        self.operator.address()
    }

    /// Deploys the five contracts with `operator` as admin and wires their roles.
    pub async fn deploy(
        chain: Chain,
        operator: PrivateKeySigner,
        params: &DeployParams,
    ) -> Result<Self, ChainError> {
        let admin = operator.address();
        let create = |code: &Bytes, args: Vec<u8>| {
            let mut data = code.to_vec();
            data.extend(args);
            Bytes::from(data)
        };
        let created = |r: Receipt| {
            r.created
                .map(|a| (a, r.block))
                .ok_or_else(|| ChainError::Decode("creation without an address".into()))
        };
        let (token, block) = created(
            chain
                .send(
                    &operator,
                    None,
                    create(
                        &LAIToken::BYTECODE,
                        LAIToken::constructorCall::new((admin, params.supply_cap)).abi_encode(),
                    ),
                )
                .await?,
        )?;
        let (nodes, _) = created(
            chain
                .send(
                    &operator,
                    None,
                    create(
                        &NodeRegistry::BYTECODE,
                        NodeRegistry::constructorCall::new((
                            admin,
                            token,
                            params.treasury,
                            params.min_stake,
                            params.unbonding_delay,
                        ))
                        .abi_encode(),
                    ),
                )
                .await?,
        )?;
        let (status, _) = created(
            chain
                .send(
                    &operator,
                    None,
                    create(
                        &NetworkStatus::BYTECODE,
                        NetworkStatus::constructorCall::new((
                            admin,
                            nodes,
                            params.epoch_length,
                            params.min_reputation,
                        ))
                        .abi_encode(),
                    ),
                )
                .await?,
        )?;
        let (users, _) = created(
            chain
                .send(
                    &operator,
                    None,
                    create(
                        &UserRegistry::BYTECODE,
                        UserRegistry::constructorCall::new((admin, token)).abi_encode(),
                    ),
                )
                .await?,
        )?;
        let (tokenomics, _) = created(
            chain
                .send(
                    &operator,
                    None,
                    create(
                        &Tokenomics::BYTECODE,
                        Tokenomics::constructorCall::new((admin, token, users, status))
                            .abi_encode(),
                    ),
                )
                .await?,
        )?;
        let deployment = Deployment {
            chain_id: chain.chain_id(),
            token,
            users,
            nodes,
            status,
            tokenomics,
            block,
        };
        let p = Self::attach(chain, operator, deployment);
        let grant = |role_name: &str, to: Address| {
            UserRegistry::grantRoleCall {
                role: role(role_name),
                account: to,
            }
            .abi_encode()
        };
        let allowance = |minter: Address, amount: U256| {
            LAIToken::setMintAllowanceCall {
                minter,
                allowance: amount,
            }
            .abi_encode()
        };
        let wiring: [(Address, Vec<u8>); 11] = [
            (users, grant("SETTLER_ROLE", tokenomics)),
            (users, grant("FAUCET_ROLE", admin)),
            (users, grant("WITHDRAWER_ROLE", admin)),
            (token, allowance(users, params.faucet_budget)),
            (token, allowance(tokenomics, params.emission_budget)),
            (token, allowance(admin, params.operator_budget)),
            (nodes, grant("STATUS_ROLE", status)),
            (nodes, grant("REGISTRAR_ROLE", admin)),
            (status, grant("REPORTER_ROLE", admin)),
            (tokenomics, grant("SETTLER_ROLE", admin)),
            (
                tokenomics,
                Tokenomics::setEmissionCall {
                    emissionPerEpoch_: params.emission_per_epoch,
                }
                .abi_encode(),
            ),
        ];
        for (to, data) in wiring {
            p.send(to, data).await?;
        }
        Ok(p)
    }

    /// Attaches to the deployment recorded in `path` when its contracts exist on `chain`;
    /// otherwise deploys and records it there.
    pub async fn open_or_deploy(
        chain: Chain,
        operator: PrivateKeySigner,
        path: &Path,
        params: &DeployParams,
    ) -> Result<Self, ChainError> {
        let err = |message: String| ChainError::Deployment {
            path: path.display().to_string(),
            message,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let deployment: Deployment =
                    serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
                if deployment.chain_id != chain.chain_id() {
                    return Err(err(format!(
                        "is for chain {} but this chain is {}",
                        deployment.chain_id,
                        chain.chain_id()
                    )));
                }
                let p = Self::attach(chain, operator, deployment);
                // A chain that was reset (e.g. a new anvil) no longer has the contracts.
                if p.call(p.deployment.token, LAIToken::capCall {})
                    .await
                    .is_ok()
                {
                    return Ok(p);
                }
                tracing::warn!(path = %path.display(), "recorded contracts are gone from the chain; deploying again");
                let p = Self::deploy(p.chain, p.operator, params).await?;
                p.save(path)?;
                Ok(p)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let p = Self::deploy(chain, operator, params).await?;
                p.save(path)?;
                Ok(p)
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    fn save(&self, path: &Path) -> Result<(), ChainError> {
        let err = |message: String| ChainError::Deployment {
            path: path.display().to_string(),
            message,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let json = serde_json::to_vec_pretty(&self.deployment).map_err(|e| err(e.to_string()))?;
        std::fs::write(path, json).map_err(|e| err(e.to_string()))
    }

    async fn send(&self, to: Address, data: Vec<u8>) -> Result<Receipt, ChainError> {
        self.chain.send(&self.operator, Some(to), data.into()).await
    }

    async fn call<C: SolCall>(&self, to: Address, call: C) -> Result<C::Return, ChainError> {
        let out = self.chain.call(to, call.abi_encode().into()).await?;
        C::abi_decode_returns(&out).map_err(|e| ChainError::Decode(e.to_string()))
    }

    // ------------------------------------------------------------ settlement

    /// Submits settlement batch `id`; applying an id that was already applied changes nothing.
    pub async fn settle_batch(
        &self,
        id: B256,
        entries: &[SettleEntry],
    ) -> Result<Submitted, ChainError> {
        let entries = entries
            .iter()
            .map(|e| {
                Ok(Tokenomics::Entry {
                    user: e.user,
                    node: e.node,
                    amount: u128::try_from(e.amount)
                        .ok()
                        .and_then(|v| U96::try_from(v).ok())
                        .ok_or_else(|| {
                            ChainError::Decode(format!("amount {} exceeds uint96", e.amount))
                        })?,
                    tokens: e.tokens,
                    requests: e.requests,
                })
            })
            .collect::<Result<Vec<_>, ChainError>>()?;
        let receipt = self
            .send(
                self.deployment.tokenomics,
                Tokenomics::settleBatchCall {
                    batchId: id,
                    entries,
                }
                .abi_encode(),
            )
            .await?;
        applied::<Tokenomics::BatchSettled, Tokenomics::BatchAlreadySettled>(&receipt)
    }

    pub async fn batch_settled(&self, id: B256) -> Result<bool, ChainError> {
        self.call(
            self.deployment.tokenomics,
            Tokenomics::settledCall { batchId: id },
        )
        .await
    }

    /// Submits faucet grant batch `id` (minted into custody); applying an id that was already
    /// applied changes nothing.
    pub async fn grant_batch(
        &self,
        id: B256,
        entries: &[GrantEntry],
    ) -> Result<Submitted, ChainError> {
        let receipt = self
            .send(
                self.deployment.users,
                UserRegistry::grantBatchCall {
                    grantId: id,
                    users: entries.iter().map(|e| e.user).collect(),
                    amounts: entries.iter().map(|e| e.amount).collect(),
                }
                .abi_encode(),
            )
            .await?;
        applied::<UserRegistry::Granted, UserRegistry::GrantAlreadyApplied>(&receipt)
    }

    pub async fn grant_applied(&self, id: B256) -> Result<bool, ChainError> {
        self.call(
            self.deployment.users,
            UserRegistry::grantedCall { grantId: id },
        )
        .await
    }

    /// Submits withdrawal batch `id` (custody → destination wallets, for withdrawals already
    /// debited off-chain); applying an id that was already applied changes nothing. Lines the
    /// custody could only pay in part are returned as shortfalls.
    pub async fn withdraw_batch(
        &self,
        id: B256,
        entries: &[WithdrawEntry],
    ) -> Result<(Submitted, Vec<Shortfall>), ChainError> {
        let receipt = self
            .send(
                self.deployment.users,
                UserRegistry::withdrawBatchCall {
                    batchId: id,
                    users: entries.iter().map(|e| e.user).collect(),
                    to: entries.iter().map(|e| e.to).collect(),
                    amounts: entries.iter().map(|e| e.amount).collect(),
                }
                .abi_encode(),
            )
            .await?;
        let submitted = applied::<
            UserRegistry::WithdrawalBatch,
            UserRegistry::WithdrawalBatchAlreadyApplied,
        >(&receipt)?;
        let mut shortfalls = Vec::new();
        for log in &receipt.logs {
            if log.topics().first() != Some(&UserRegistry::WithdrawalShortfall::SIGNATURE_HASH) {
                continue;
            }
            let s = UserRegistry::WithdrawalShortfall::decode_log(log)
                .map_err(|e| ChainError::Decode(e.to_string()))?;
            shortfalls.push(Shortfall {
                user: s.user,
                requested: s.requested,
                paid: s.paid,
            });
        }
        Ok((submitted, shortfalls))
    }

    /// The transaction that applied withdrawal batch `id`, if its `WithdrawalBatch` event is
    /// in blocks `from..=to` (scanned in spans of 5,000 blocks).
    pub async fn withdrawal_tx(
        &self,
        id: B256,
        from: u64,
        to: u64,
    ) -> Result<Option<B256>, ChainError> {
        const SPAN: u64 = 5_000;
        let mut start = from;
        while start <= to {
            let end = to.min(start.saturating_add(SPAN - 1));
            for l in self.chain.logs(self.deployment.users, start, end).await? {
                let topics = l.log.topics();
                if topics.first() == Some(&UserRegistry::WithdrawalBatch::SIGNATURE_HASH)
                    && topics.get(1) == Some(&id)
                {
                    return Ok(Some(l.tx_hash));
                }
            }
            if end == u64::MAX {
                break;
            }
            start = end + 1;
        }
        Ok(None)
    }

    pub async fn withdrawal_applied(&self, id: B256) -> Result<bool, ChainError> {
        self.call(
            self.deployment.users,
            UserRegistry::withdrawalAppliedCall { batchId: id },
        )
        .await
    }

    // ------------------------------------------------------------ balances

    /// A user's balance in the protocol's custody.
    pub async fn user_balance(&self, user: Address) -> Result<U256, ChainError> {
        self.call(self.deployment.users, UserRegistry::balanceOfCall { user })
            .await
    }

    /// LAI held by an address itself (outside custody).
    pub async fn token_balance(&self, holder: Address) -> Result<U256, ChainError> {
        self.call(
            self.deployment.token,
            LAIToken::balanceOfCall { account: holder },
        )
        .await
    }

    pub async fn total_supply(&self) -> Result<U256, ChainError> {
        self.call(self.deployment.token, LAIToken::totalSupplyCall {})
            .await
    }

    /// A node's withdrawable earnings.
    pub async fn node_balance(&self, node: Address) -> Result<U256, ChainError> {
        self.call(
            self.deployment.tokenomics,
            Tokenomics::nodeBalanceCall { node },
        )
        .await
    }

    /// Everything settlement ever credited to a node.
    pub async fn node_earned(&self, node: Address) -> Result<U256, ChainError> {
        self.call(
            self.deployment.tokenomics,
            Tokenomics::nodeEarnedCall { node },
        )
        .await
    }

    /// Everything settlement ever moved out of users' custody.
    pub async fn total_settled(&self) -> Result<U256, ChainError> {
        self.call(self.deployment.tokenomics, Tokenomics::totalSettledCall {})
            .await
    }

    pub async fn treasury_balance(&self) -> Result<U256, ChainError> {
        self.call(
            self.deployment.tokenomics,
            Tokenomics::treasuryBalanceCall {},
        )
        .await
    }

    /// Mints from the operator's own allowance to `to`.
    pub async fn mint(&self, to: Address, amount: U256) -> Result<(), ChainError> {
        self.send(
            self.deployment.token,
            LAIToken::mintCall { to, amount }.abi_encode(),
        )
        .await?;
        Ok(())
    }

    /// Deposits `amount` of `from`'s LAI into `user`'s custody balance (approve + depositFor).
    pub async fn deposit_for(
        &self,
        from: &PrivateKeySigner,
        user: Address,
        amount: U256,
    ) -> Result<(), ChainError> {
        self.chain
            .send(
                from,
                Some(self.deployment.token),
                LAIToken::approveCall {
                    spender: self.deployment.users,
                    value: amount,
                }
                .abi_encode()
                .into(),
            )
            .await?;
        self.chain
            .send(
                from,
                Some(self.deployment.users),
                UserRegistry::depositForCall { user, amount }
                    .abi_encode()
                    .into(),
            )
            .await?;
        Ok(())
    }

    /// On-chain deposits in blocks `from..=to` (faucet grants are not deposits).
    pub async fn deposits(&self, from: u64, to: u64) -> Result<Vec<Deposit>, ChainError> {
        let logs = self.chain.logs(self.deployment.users, from, to).await?;
        let mut out = Vec::new();
        for l in logs {
            if l.log.topics().first() != Some(&UserRegistry::Deposited::SIGNATURE_HASH) {
                continue;
            }
            let d = UserRegistry::Deposited::decode_log(&l.log)
                .map_err(|e| ChainError::Decode(e.to_string()))?;
            out.push(Deposit {
                id: format!("{}:{}", l.tx_hash, l.index),
                block: l.block,
                user: d.user,
                from: d.from,
                amount: d.amount,
            });
        }
        Ok(out)
    }

    // ------------------------------------------------------------ nodes

    /// Registers `node` with `stake` LAI minted from the operator's allowance (the operator
    /// sponsors the node as registrar and gets the stake back when it is withdrawn).
    pub async fn sponsor_node(
        &self,
        node: Address,
        offer: &NodeOffer,
        stake: U256,
    ) -> Result<(), ChainError> {
        // A task of its own, so a caller that gives up midway (a handshake timeout) does not
        // leave tokens minted and approved but no node registered.
        let (p, offer) = (self.clone(), offer.clone());
        tokio::spawn(async move {
            let _one_at_a_time = p.sequence.lock().await;
            p.mint(p.operator(), stake).await?;
            p.send(
                p.deployment.token,
                LAIToken::approveCall {
                    spender: p.deployment.nodes,
                    value: stake,
                }
                .abi_encode(),
            )
            .await?;
            p.send(
                p.deployment.nodes,
                NodeRegistry::registerCall {
                    node,
                    offer: NodeRegistry::Offer {
                        kind: offer.kind,
                        models: offer.models,
                        priceIn: offer.price_in,
                        priceOut: offer.price_out,
                        metadataUri: offer.metadata_uri,
                    },
                    stake,
                }
                .abi_encode(),
            )
            .await?;
            Ok(())
        })
        .await
        .map_err(|e| ChainError::Evm(format!("sponsoring the node failed: {e}")))?
    }

    pub async fn node(&self, node: Address) -> Result<NodeState, ChainError> {
        let n = self
            .call(self.deployment.nodes, NodeRegistry::getNodeCall { node })
            .await?;
        Ok(NodeState {
            registered: n.registered,
            active: n.active,
            reputation: n.reputation,
            stake: n.stake,
            models: n.offer.models,
        })
    }

    /// Whether `node` is registered, active and holds at least the minimum stake.
    pub async fn node_active(&self, node: Address) -> Result<bool, ChainError> {
        self.call(self.deployment.nodes, NodeRegistry::isActiveCall { node })
            .await
    }

    /// A node's staking pool.
    pub async fn pool(&self, node: Address) -> Result<PoolState, ChainError> {
        let p = self
            .call(self.deployment.tokenomics, Tokenomics::poolsCall { node })
            .await?;
        Ok(PoolState {
            staked: p.staked,
            unclaimed: p.unclaimed,
        })
    }

    /// `staker`'s stake in `node`'s pool and the reward it could claim now.
    pub async fn stake_of(
        &self,
        node: Address,
        staker: Address,
    ) -> Result<StakePosition, ChainError> {
        let s = self
            .call(
                self.deployment.tokenomics,
                Tokenomics::stakesCall { node, staker },
            )
            .await?;
        let pending_reward = self
            .call(
                self.deployment.tokenomics,
                Tokenomics::pendingRewardCall { node, staker },
            )
            .await?;
        Ok(StakePosition {
            amount: s.amount,
            pending_reward,
        })
    }

    /// The fee split settlement applies on-chain.
    pub async fn split(&self) -> Result<FeeSplit, ChainError> {
        let s = self
            .call(self.deployment.tokenomics, Tokenomics::splitCall {})
            .await?;
        Ok(FeeSplit {
            node_bps: s.nodeBps,
            pool_bps: s.poolBps,
            treasury_bps: s.treasuryBps,
        })
    }

    /// Stakes `amount` of `from`'s LAI into `node`'s pool (approve + Tokenomics.stake).
    pub async fn stake(
        &self,
        from: &PrivateKeySigner,
        node: Address,
        amount: U256,
    ) -> Result<(), ChainError> {
        for (to, data) in stake_calls(&self.deployment, node, amount) {
            self.chain.send(from, Some(to), data).await?;
        }
        Ok(())
    }

    pub async fn min_stake(&self) -> Result<U256, ChainError> {
        self.call(self.deployment.nodes, NodeRegistry::minStakeCall {})
            .await
    }

    pub async fn current_epoch(&self) -> Result<u64, ChainError> {
        self.call(self.deployment.status, NetworkStatus::currentEpochCall {})
            .await
    }

    /// The Merkle root posted for `epoch` (zero until a snapshot is posted) and `node`'s uptime
    /// in it (basis points).
    pub async fn status_of(&self, epoch: u64, node: Address) -> Result<(B256, u16), ChainError> {
        let root = self
            .call(self.deployment.status, NetworkStatus::rootOfCall { epoch })
            .await?;
        let uptime = self
            .call(
                self.deployment.status,
                NetworkStatus::uptimeOfCall { epoch, node },
            )
            .await?;
        Ok((root, uptime))
    }

    /// Posts node status for `epoch`: (node, uptime bps, reputation bps) entries and their root.
    pub async fn post_status(
        &self,
        epoch: u64,
        root: B256,
        entries: &[(Address, u16, u16)],
    ) -> Result<(), ChainError> {
        self.send(
            self.deployment.status,
            NetworkStatus::postCall {
                epoch,
                root,
                entries: entries
                    .iter()
                    .map(|&(node, uptime, reputation)| NetworkStatus::Entry {
                        node,
                        uptimeBps: uptime,
                        reputation,
                    })
                    .collect(),
            }
            .abi_encode(),
        )
        .await?;
        Ok(())
    }
}

/// The two transactions that stake `amount` into `node`'s pool from any wallet:
/// `LAIToken.approve(tokenomics, amount)`, then `Tokenomics.stake(node, amount)`.
pub fn stake_calls(d: &Deployment, node: Address, amount: U256) -> [(Address, Bytes); 2] {
    [
        (
            d.token,
            LAIToken::approveCall {
                spender: d.tokenomics,
                value: amount,
            }
            .abi_encode()
            .into(),
        ),
        (
            d.tokenomics,
            Tokenomics::stakeCall { node, amount }.abi_encode().into(),
        ),
    ]
}

/// The two transactions that deposit `amount` from any wallet into `user`'s custody:
/// `LAIToken.approve(users, amount)`, then `UserRegistry.depositFor(user, amount)`.
pub fn deposit_calls(d: &Deployment, user: Address, amount: U256) -> [(Address, Bytes); 2] {
    [
        (
            d.token,
            LAIToken::approveCall {
                spender: d.users,
                value: amount,
            }
            .abi_encode()
            .into(),
        ),
        (
            d.users,
            UserRegistry::depositForCall { user, amount }
                .abi_encode()
                .into(),
        ),
    ]
}

/// Whether a receipt shows event `A` (applied) rather than `S` (skipped: already applied).
fn applied<A: SolEvent, S: SolEvent>(receipt: &Receipt) -> Result<Submitted, ChainError> {
    for log in &receipt.logs {
        let applied = match log.topics().first() {
            Some(t) if *t == A::SIGNATURE_HASH => true,
            Some(t) if *t == S::SIGNATURE_HASH => false,
            _ => continue,
        };
        return Ok(Submitted {
            applied,
            tx_hash: receipt.hash,
        });
    }
    Err(ChainError::Decode(
        "the receipt has neither the applied nor the skipped event".into(),
    ))
}
