//! `llmchainctl agent revoke`: make an agent's certificate useless at once (Fleet.RevokeAgent).
//!
//! The coordinator stores the revocation; from then on every request with that certificate is
//! refused with `UNAUTHENTICATED`, and the agent's open session and streams end, on every
//! coordinator replica. The agent needs a new enrollment (a new token) to come back.

use clap::Subcommand;
use llmchain_proto::pb::{self, fleet_client::FleetClient};
use serde_json::json;

use super::{Api, Output};

/// `llmchainctl agent …`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Revoke an agent's certificate: its requests are refused and its session ends at once.
    Revoke {
        /// The agent id (its certificate's identity name).
        id: String,
        /// Why, for the audit trail (stored with the revocation).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Runs an agent command.
pub async fn run(api: &Api, out: Output, command: AgentCommand) -> anyhow::Result<()> {
    let AgentCommand::Revoke { id, reason } = command;
    let request = pb::RevokeAgentRequest { agent_id: id.clone(), reason: reason.clone() };
    api.call(FleetClient::new(api.channel.clone()).revoke_agent(request)).await?;
    match out {
        Output::Json => println!("{}", json!({ "agent_id": id, "revoked": true, "reason": reason })),
        Output::Table => println!("agent {id} revoked"),
    }
    Ok(())
}
