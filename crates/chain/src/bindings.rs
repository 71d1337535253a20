//! Typed bindings generated from the committed artifacts (ABI + creation bytecode).
#![allow(missing_docs, unreachable_pub, clippy::too_many_arguments)]

use alloy::sol;

sol!(
    #[derive(Debug, PartialEq, Eq)]
    LAIToken,
    "../../contracts/artifacts/LAIToken.json"
);
sol!(
    #[derive(Debug, PartialEq, Eq)]
    UserRegistry,
    "../../contracts/artifacts/UserRegistry.json"
);
sol!(
    #[derive(Debug, PartialEq, Eq)]
    NodeRegistry,
    "../../contracts/artifacts/NodeRegistry.json"
);
sol!(
    #[derive(Debug, PartialEq, Eq)]
    NetworkStatus,
    "../../contracts/artifacts/NetworkStatus.json"
);
sol!(
    #[derive(Debug, PartialEq, Eq)]
    Tokenomics,
    "../../contracts/artifacts/Tokenomics.json"
);
