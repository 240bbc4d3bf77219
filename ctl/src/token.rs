//! `llmchainctl token create`: single-use bootstrap tokens (Fleet.CreateBootstrapToken).
//!
//! The coordinator stores only the token's hash; the token itself is printed once, alone on
//! stdout in table mode so scripts can capture it (`T=$(llmchainctl token create …)`), with
//! its expiry on stderr.

use std::time::{Duration, SystemTime};

use clap::{Subcommand, ValueEnum};
use llmchain_proto::pb::{self, fleet_client::FleetClient};
use serde_json::json;

use super::{Api, Output};

/// Role a token enrolls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// An edge agent.
    Agent,
    /// A trainer (publishes versions).
    Trainer,
    /// An operator (rollouts, tokens, revocations).
    Operator,
}

impl From<RoleArg> for pb::Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Agent => pb::Role::Agent,
            RoleArg::Trainer => pb::Role::Trainer,
            RoleArg::Operator => pb::Role::Operator,
        }
    }
}

/// `llmchainctl token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a single-use bootstrap token for enrolling one identity.
    Create {
        /// Role of the identity it enrolls.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The only name it enrolls (e.g. the agent id) [default: any name the enrolling side
        /// asks for].
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. `15m`, `1h`, `2d` (at most 7 days).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 1h: {e}"))?;
    if ttl < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(ttl)
}

/// Runs a token command.
pub async fn run(api: &Api, out: Output, command: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Create { role, name, ttl } = command;
    let ttl_seconds = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
    let request = pb::CreateBootstrapTokenRequest {
        role: pb::Role::from(role).into(),
        name: name.clone().unwrap_or_default(),
        ttl_seconds,
    };
    let answer = api.call(FleetClient::new(api.channel.clone()).create_bootstrap_token(request)).await?;
    let expires = answer
        .expires_at
        .and_then(|t| SystemTime::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default();
    match out {
        Output::Json => println!(
            "{}",
            json!({
                "token": answer.token,
                "role": format!("{role:?}").to_lowercase(),
                "name": name.unwrap_or_default(),
                "expires_at": expires,
            })
        ),
        Output::Table => {
            println!("{}", answer.token);
            eprintln!("single-use {:?} token, expires {expires}", role);
        }
    }
    Ok(())
}
