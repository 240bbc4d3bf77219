//! `llmchainctl`: the operator's command line for a coordinator.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// LLMChain operator CLI: inspect and steer a coordinator over its gRPC API.
#[derive(Debug, Parser)]
#[command(name = "llmchainctl", version, about, long_about)]
struct Cli {
    /// Coordinator gRPC address.
    #[arg(long, global = true, env = "LLMCHAIN_COORDINATOR", default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Seconds to wait for the coordinator to answer.
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the services a coordinator serves and the health of each.
    Status,
}

/// Health of one served service.
#[derive(Debug, Serialize)]
struct ServiceStatus {
    service: String,
    health: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let channel = connect(&cli.coordinator, Duration::from_secs(cli.timeout)).await?;
    match cli.command {
        Command::Status => {
            let rows = status(channel).await?;
            match cli.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Table => {
                    let width = rows.iter().map(|r| r.service.len()).max().unwrap_or(7).max(7);
                    println!("{:width$}  HEALTH", "SERVICE");
                    for r in rows {
                        println!("{:width$}  {}", r.service, r.health);
                    }
                }
            }
        }
    }
    Ok(())
}

async fn connect(addr: &str, timeout: Duration) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(addr.to_string())
        .with_context(|| format!("invalid coordinator address {addr:?}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    endpoint.connect().await.with_context(|| format!("coordinator at {addr} is unreachable"))
}

async fn status(channel: Channel) -> anyhow::Result<Vec<ServiceStatus>> {
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .context("reflection request failed")?
        .into_inner();
    let answer = answers.message().await?.context("reflection answered nothing")?;
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        anyhow::bail!("unexpected reflection answer");
    };
    let mut health = HealthClient::new(channel);
    let mut rows = Vec::new();
    for service in list.service {
        let name = service.name;
        let state = match health.check(HealthCheckRequest { service: name.clone() }).await {
            Ok(r) => format!("{:?}", r.into_inner().status()).to_uppercase(),
            // Reflection and health themselves are not registered as health entries.
            Err(s) if s.code() == tonic::Code::NotFound => "-".to_string(),
            Err(s) => format!("error: {}", s.message()),
        };
        rows.push(ServiceStatus { service: name, health: state });
    }
    Ok(rows)
}
