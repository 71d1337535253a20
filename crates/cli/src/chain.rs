//! `lattice chain …` and the chain options of `lattice nexus`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use lattice_chain::{
    Address, Chain, DeployParams, Embedded, PrivateKeySigner, Protocol, Rpc, U256,
};

/// Where the chain is and who operates it.
#[derive(Args, Clone, Debug)]
pub(crate) struct ChainArgs {
    /// JSON-RPC URL of an EVM node to use (e.g. anvil). Default: an embedded in-process chain
    /// whose state is kept beside the database.
    #[arg(long, env = "LATTICE_CHAIN_RPC")]
    pub(crate) chain_rpc: Option<String>,
    /// State file of the embedded chain (default: chain/state.json beside the database).
    #[arg(long)]
    chain_state: Option<PathBuf>,
    /// The operator's chain key: a hex secp256k1 secret (default: chain/operator.key beside the
    /// database, created for the embedded chain; required with --chain-rpc).
    #[arg(long)]
    chain_key_file: Option<PathBuf>,
    /// Where the contracts' addresses are recorded (default: chain/deployment-CHAINID.json).
    #[arg(long)]
    deployment_file: Option<PathBuf>,
    /// Seconds per status and reward epoch, for a new deployment.
    #[arg(long, default_value_t = 3600)]
    epoch_secs: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum NodeStake {
    Off,
    Require,
    Sponsor,
}

#[derive(Subcommand)]
pub(crate) enum ChainCommand {
    /// Deploy the protocol contracts (or show the existing deployment).
    Deploy,
    /// Contracts, block height, supply and settlement totals.
    Status,
    /// Mint LAI from the operator's allowance into ADDRESS's custody balance (credited
    /// off-chain by Nexus's deposit watcher).
    Faucet { address: Address, lai: u64 },
    /// Mint LAI from the operator's allowance and stake it into NODE's staking pool (the
    /// operator is the staker; a local network's way to try pools and their APY).
    Stake { node: Address, lai: u64 },
    /// Custody, wallet and node balances of ADDRESS.
    Balance { address: Address },
    /// Compare off-chain settled balances with on-chain ones (needs the Nexus database).
    Reconcile {
        /// Nexus's database URL (default: the SQLite file under the cache dir).
        #[arg(long, env = "LATTICE_DATABASE_URL")]
        database_url: Option<String>,
    },
}

/// Opens the chain and attaches to the protocol (deploying it on first use).
pub(crate) async fn open(args: &ChainArgs, dir: &Path, chain_id: u64) -> Result<Protocol> {
    let chain_dir = dir.join("chain");
    let (chain, key_file) = match &args.chain_rpc {
        Some(url) => {
            let key_file = args
                .chain_key_file
                .clone()
                .context("--chain-key-file is required with --chain-rpc")?;
            let rpc = Rpc::connect(url)
                .await
                .with_context(|| format!("connecting to {url}"))?;
            (Chain::Rpc(Arc::new(rpc)), key_file)
        }
        None => {
            let state = args
                .chain_state
                .clone()
                .unwrap_or_else(|| chain_dir.join("state.json"));
            let embedded = Embedded::open(&state, chain_id)?;
            (
                Chain::Embedded(Arc::new(embedded)),
                args.chain_key_file
                    .clone()
                    .unwrap_or_else(|| chain_dir.join("operator.key")),
            )
        }
    };
    let operator = load_or_create_key(&key_file, matches!(chain, Chain::Embedded(_)))?;
    let deployment = args
        .deployment_file
        .clone()
        .unwrap_or_else(|| chain_dir.join(format!("deployment-{}.json", chain.chain_id())));
    let params = DeployParams {
        epoch_length: args.epoch_secs.max(1),
        ..DeployParams::local(operator.address())
    };
    Ok(Protocol::open_or_deploy(chain, operator, &deployment, &params).await?)
}

fn load_or_create_key(path: &Path, create: bool) -> Result<PrivateKeySigner> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .trim_start_matches("0x")
            .parse::<PrivateKeySigner>()
            .with_context(|| format!("{} is not a hex secp256k1 key", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let key = PrivateKeySigner::random();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            lattice_link::write_private(path, &hex::encode(key.to_bytes()))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn lai(units: U256) -> String {
    let unit = U256::from(10u64).pow(U256::from(18u64));
    let (whole, frac) = units.div_rem(unit);
    let frac = format!("{frac:0>18}");
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        format!("{whole} LAI")
    } else {
        format!("{whole}.{frac} LAI")
    }
}

/// Mints `lai` whole LAI from the operator's allowance to the operator, who then spends it:
/// the operator's signer and the amount in units.
async fn mint_to_operator(
    p: &Protocol,
    args: &ChainArgs,
    dir: &Path,
    lai: u64,
) -> Result<(PrivateKeySigner, U256)> {
    let units = U256::from(lai) * U256::from(10u64).pow(U256::from(18u64));
    p.mint(p.operator(), units).await?;
    let operator = load_or_create_key(
        &args
            .chain_key_file
            .clone()
            .unwrap_or_else(|| dir.join("chain").join("operator.key")),
        false,
    )?;
    Ok((operator, units))
}

pub(crate) async fn run(
    cmd: ChainCommand,
    args: &ChainArgs,
    dir: &Path,
    chain_id: u64,
    default_db: &Path,
) -> Result<()> {
    let p = open(args, dir, chain_id).await?;
    let d = p.deployment();
    match cmd {
        ChainCommand::Deploy => {
            println!("{}", serde_json::to_string_pretty(d)?);
        }
        ChainCommand::Status => {
            println!("chain id      {}", p.chain().chain_id());
            println!("block         {}", p.chain().block_number().await?);
            println!("operator      {}", p.operator());
            println!("LAIToken      {}", d.token);
            println!("UserRegistry  {}", d.users);
            println!("NodeRegistry  {}", d.nodes);
            println!("NetworkStatus {}", d.status);
            println!("Tokenomics    {}", d.tokenomics);
            println!("epoch         {}", p.current_epoch().await?);
            println!("supply        {}", lai(p.total_supply().await?));
            println!("settled       {}", lai(p.total_settled().await?));
            println!("treasury      {}", lai(p.treasury_balance().await?));
        }
        ChainCommand::Faucet {
            address,
            lai: amount,
        } => {
            let (operator, units) = mint_to_operator(&p, args, dir, amount).await?;
            p.deposit_for(&operator, address, units).await?;
            println!("deposited {} into the custody of {address}", lai(units));
        }
        ChainCommand::Stake { node, lai: amount } => {
            let (operator, units) = mint_to_operator(&p, args, dir, amount).await?;
            p.stake(&operator, node, units).await?;
            let pool = p.pool(node).await?;
            println!(
                "staked {} into the pool of {node} (pool total {})",
                lai(units),
                lai(pool.staked)
            );
        }
        ChainCommand::Balance { address } => {
            println!("custody  {}", lai(p.user_balance(address).await?));
            println!("wallet   {}", lai(p.token_balance(address).await?));
            println!("earnings {}", lai(p.node_balance(address).await?));
            let n = p.node(address).await?;
            if n.registered {
                println!(
                    "node     stake {}, reputation {}, {}",
                    lai(n.stake),
                    n.reputation,
                    if n.active { "active" } else { "inactive" }
                );
                // The snapshot of the last ended epoch (posted by Nexus after it ends).
                if let Some(ended) = p.current_epoch().await?.checked_sub(1) {
                    let (root, uptime) = p.status_of(ended, address).await?;
                    if root.is_zero() {
                        println!("status   epoch {ended}: not posted");
                    } else {
                        println!("status   epoch {ended}: uptime {uptime} bps, root {root}");
                    }
                }
            }
        }
        ChainCommand::Reconcile { database_url } => {
            let url = database_url.unwrap_or_else(|| format!("sqlite://{}", default_db.display()));
            let db = lattice_accounts::Db::open(&url).await?;
            // Only reads, next to a Nexus that may be running: the shared writer (nothing kept in
            // memory) and no recovery of holds, so opening the store changes nothing.
            let accounts = lattice_accounts::Accounts::open(
                db,
                lattice_accounts::AccountsConfig {
                    ledger: lattice_accounts::LedgerConfig {
                        mode: lattice_accounts::LedgerMode::Shared,
                        owner: "lattice-chain-reconcile".into(),
                        recover_holds: false,
                        ..lattice_accounts::LedgerConfig::default()
                    },
                    ..lattice_accounts::AccountsConfig::default()
                },
            )
            .await?;
            let r = lattice_nexus::reconcile(&accounts, &p).await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            if !r.mismatches.is_empty() {
                bail!(
                    "{} balances differ between the ledger and the chain",
                    r.mismatches.len()
                );
            }
        }
    }
    Ok(())
}
