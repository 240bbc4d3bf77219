//! `llmchainctl`: the operator's command line for a coordinator.
//!
//! Every command is one or two gRPC calls over one shared connection ([`connect`]). Output is
//! an aligned table for people by default and, with `-o json`, the protobuf answer rendered
//! field for field by [`json`]. A coordinator that cannot be reached exits with code 2 (as
//! does a usage error); any other failure exits with code 1.

mod agent;
mod json;
mod keys;
mod tls;
mod token;

use std::{
    fmt,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use llmchain_proto::pb::{
    self, fleet_client::FleetClient, registry_client::RegistryClient, rollouts_client::RolloutsClient,
};
use llmchain_runtime::telemetry::{self, TracedChannel};
use serde::Serialize;
use serde_json::Value;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// LLMChain operator CLI: inspect and steer a coordinator over its gRPC API.
///
/// Exit codes: 0 success, 1 the coordinator refused or failed the request, 2 a usage error
/// or a coordinator that cannot be reached.
#[derive(Debug, Parser)]
#[command(name = "llmchainctl", version, about, long_about)]
struct Cli {
    /// Coordinator address and TLS identity (flags > LLMCHAIN_* > ctl.toml).
    #[command(flatten)]
    connect: tls::ConnectArgs,
    #[command(flatten)]
    config: tls::ConfigArg,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Seconds to wait for the coordinator to connect and to answer each request.
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts: the protobuf answer, fields under their protobuf names.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the services a coordinator serves and the health of each.
    Status,
    /// List the models in the registry with their latest version (Registry.ListModels).
    Models,
    /// List the published versions of one model, oldest first (Registry.ListVersions).
    Versions {
        /// Model name.
        model: String,
    },
    /// List agents with their labels, liveness, versions and savings, and fleet totals
    /// (Fleet.ListAgents and Fleet.GetFleetStats).
    ///
    /// JSON output: {"agents": [AgentInfo…], "stats": FleetStats}.
    Fleet {
        /// Only agents whose labels match, "key=value[,key=value…]"; repeatable.
        #[arg(long, short = 'l')]
        selector: Vec<String>,
    },
    /// Tell agents which version to run or pre-fetch (Fleet.Assign).
    ///
    /// The assignment is stored per agent and delivered now or when the agent next connects;
    /// a selector also reaches agents that first connect later.
    Assign {
        /// The version, MODEL:VERSION (e.g. smol:3).
        #[arg(long, value_parser = parse_version)]
        version: pb::ModelRef,
        #[command(flatten)]
        targets: Targets,
        /// Download and verify only; do not switch to the version.
        #[arg(long)]
        prefetch: bool,
        /// Allow moving agents to an older version on purpose.
        #[arg(long)]
        rollback: bool,
        /// With --rollback: the trainer-signed statement agents require to go back to this
        /// version (`llmchainctl keys sign-rollback`).
        #[arg(long, value_name = "FILE", requires = "rollback")]
        rollback_statement: Option<std::path::PathBuf>,
    },
    /// Offline root key, key-rotation documents and rollback statements.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Single-use bootstrap tokens for enrolling agents, trainers and operators.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Agent identities: revoke a certificate (Fleet.RevokeAgent).
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Enroll this operator or trainer with a bootstrap token: a key made here, a certificate
    /// from the coordinator's CA, written with a ctl.toml that uses them.
    Enroll(tls::EnrollArgs),
    /// Create, inspect and steer staged rollouts (Rollouts service).
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// List stored decision summaries, newest first, or follow new ones
    /// (Fleet.ListSummaries / Fleet.WatchSummaries).
    ///
    /// With --follow, JSON output is one Summary object per line.
    Summaries {
        /// Only summaries of this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only summaries of this model, MODEL or MODEL:VERSION.
        #[arg(long, value_parser = parse_model_filter)]
        model: Option<pb::ModelRef>,
        /// At most this many (the coordinator caps it at 1000; 0 means 1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Stream summaries as they arrive until interrupted (Ctrl-C), instead of listing.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

/// Which agents a command addresses: explicit ids or a label selector.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Targets {
    /// Agent id; repeatable, or comma-separated.
    #[arg(long = "agent", value_delimiter = ',')]
    agents: Vec<String>,
    /// Label selector "key=value[,key=value…]": every agent whose labels all match.
    #[arg(long)]
    selector: Option<String>,
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Start moving agents to a version in steps, each soaked under health gates.
    ///
    /// Example: `--version smol:3 --selector site=p7 --steps 1,50%,100% --soak 10m --max-drift 0.2`
    Create(Box<CreateArgs>),
    /// Show one rollout: every step with its state, and every gate with its measured value and
    /// threshold.
    Get {
        /// Rollout id.
        id: String,
    },
    /// List rollouts, newest first.
    List {
        /// Only rollouts of this model.
        #[arg(long)]
        model: Option<String>,
    },
    /// Pause a running rollout at its current step.
    Pause(ActionArgs),
    /// Resume a paused rollout.
    Resume(ActionArgs),
    /// Stop a rollout and move every updated agent back to its previous version. Agents
    /// accept the move only with a trainer-signed rollback statement (--statement); given for
    /// a rollout already rolled back, it sends the rollback again with the statement.
    Rollback(RollbackArgs),
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Target version, MODEL:VERSION.
    #[arg(long, value_parser = parse_version)]
    version: pb::ModelRef,
    #[command(flatten)]
    targets: Targets,
    /// Steps, comma-separated: N is an absolute agent count, N% a percentage of the selected
    /// agents (rounded up). The last step must reach 100%.
    #[arg(long, value_delimiter = ',', value_parser = parse_step, required = true)]
    steps: Vec<StepSize>,
    /// How long every step's gates must hold before the next step: e.g. 500ms, 60s, 10m, 1h
    /// (a bare number is seconds).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    soak: Duration,
    /// Highest bad-record rate (0-1) tolerated; 0 disables the gate.
    #[arg(long, default_value_t = 0.0)]
    max_bad_record_rate: f64,
    /// Highest p99 decision latency in milliseconds; 0 disables the gate.
    #[arg(long = "max-p99-ms", default_value_t = 0.0)]
    max_p99_ms: f64,
    /// Highest total-variation distance (0-1) between the target's and the previous version's
    /// decision distributions; 0 disables the gate.
    #[arg(long, default_value_t = 0.0)]
    max_drift: f64,
    /// Most load or self-test failures tolerated; 0 tolerates none.
    #[arg(long, default_value_t = 0)]
    max_load_failures: u32,
    /// Fewest decisions on the target before drift and latency gates are judged.
    #[arg(long, default_value_t = 0)]
    min_decisions: u64,
    /// Let every selected agent download the target before its step activates it.
    #[arg(long)]
    prefetch: bool,
    /// Create the rollout paused (start it with `rollout resume`).
    #[arg(long)]
    paused: bool,
}

#[derive(Debug, Args)]
struct ActionArgs {
    /// Rollout id.
    id: String,
    /// Why, recorded in the rollout's history.
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Debug, Args)]
struct RollbackArgs {
    #[command(flatten)]
    action: ActionArgs,
    /// Rollback statement for the previous version (`llmchainctl keys sign-rollback`).
    #[arg(long, value_name = "FILE")]
    statement: Option<std::path::PathBuf>,
}

/// `keys publish`: sends a root-signed trust document to the coordinator.
async fn keys_publish(conn: tls::Connection, timeout: u64, command: keys::KeysCommand) -> anyhow::Result<()> {
    let keys::KeysCommand::Publish { document } = command else { bail!("not an online keys command") };
    let statement = keys::read_statement(&document)?;
    let channel = telemetry::traced(connect(&conn, Duration::from_secs(timeout)).await?);
    let api = Api { channel, url: conn.url };
    let request = pb::PublishTrustDocumentRequest { document: Some(statement) };
    api.call(RegistryClient::new(api.channel.clone()).publish_trust_document(request)).await?;
    println!("published trust document {}", document.display());
    Ok(())
}

/// Size of one rollout step as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepSize {
    Agents(u32),
    Percent(u32),
}

/// Health of one served service.
#[derive(Debug, Serialize)]
struct ServiceStatus {
    service: String,
    health: String,
}

/// The coordinator could not be reached: exit code 2.
#[derive(Debug)]
struct Unreachable {
    url: String,
    cause: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot reach the coordinator at {}: {}", self.url, self.cause)
    }
}

impl std::error::Error for Unreachable {}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Traced only when an OTLP endpoint is configured: otherwise nothing is exported and the
    // command's stderr stays free of log lines.
    let _telemetry = match std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Some(_) => match telemetry::init(&telemetry::TelemetryConfig::from_env("llmchainctl")) {
            Ok(guard) => Some(guard),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // The root of the trace of whatever the command asks for (a rollout's trace starts here).
    let span = tracing::info_span!("llmchainctl");
    match tracing::Instrument::instrument(run(cli), span).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Unreachable>().is_some() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Keys(k) = cli.command {
        if k.is_offline() {
            return keys::run_offline(k);
        }
        let conn = cli.connect.resolve(&cli.config)?;
        return keys_publish(conn, cli.timeout, k).await;
    }
    if let Command::Enroll(args) = cli.command {
        return tls::enroll(&cli.connect, &cli.config, args).await;
    }
    let timeout = Duration::from_secs(cli.timeout);
    let conn = cli.connect.resolve(&cli.config)?;
    let api = Api { channel: telemetry::traced(connect(&conn, timeout).await?), url: conn.url.clone() };
    let out = cli.output;
    match cli.command {
        Command::Status => {
            let rows = status(api.channel).await?;
            match out {
                Output::Json => print_json(&serde_json::to_value(&rows)?),
                Output::Table => {
                    let rows = rows.into_iter().map(|r| vec![r.service, r.health]).collect();
                    print_table(&["SERVICE", "HEALTH"], rows);
                }
            }
        }
        Command::Models => {
            let r = api
                .call(RegistryClient::new(api.channel.clone()).list_models(pb::ListModelsRequest {}))
                .await?;
            match out {
                Output::Json => print_json(&json::list_models(&r)),
                Output::Table => print_table(
                    &["MODEL", "LATEST", "VERSIONS"],
                    r.models
                        .iter()
                        .map(|m| {
                            vec![m.model.clone(), m.latest_version.to_string(), m.version_count.to_string()]
                        })
                        .collect(),
                ),
            }
        }
        Command::Versions { model } => {
            let req = pb::ListVersionsRequest { model };
            let r = api.call(RegistryClient::new(api.channel.clone()).list_versions(req)).await?;
            match out {
                Output::Json => print_json(&json::list_versions(&r)),
                Output::Table => print_table(
                    &["VERSION", "PARENT", "MODE", "TOTAL", "DELTA", "PUBLISHED", "METRICS"],
                    r.versions
                        .iter()
                        .map(|v| {
                            vec![
                                v.version.to_string(),
                                dash(v.parent_version),
                                v.mode.clone(),
                                human_bytes(v.total_bytes),
                                human_bytes(v.delta_bytes),
                                v.published_at.as_ref().map_or("-".into(), json::rfc3339),
                                v.metrics
                                    .iter()
                                    .map(|m| format!("{}={:.4}", m.name, m.value))
                                    .collect::<Vec<_>>()
                                    .join(" "),
                            ]
                        })
                        .collect(),
                ),
            }
        }
        Command::Fleet { selector } => fleet(&api, out, selector.join(",")).await?,
        Command::Keys(_) | Command::Enroll(_) => unreachable!("handled before connecting"),
        Command::Token(cmd) => token::run(&api, out, cmd).await?,
        Command::Agent(cmd) => agent::run(&api, out, cmd).await?,
        Command::Assign { version, targets, prefetch, rollback, rollback_statement } => {
            let rollback_statement = rollback_statement.as_deref().map(keys::read_statement).transpose()?;
            let (agent_ids, selector) = targets.into_parts();
            let req = pb::AssignRequest {
                agent_ids,
                selector,
                target: Some(version.clone()),
                activate: !prefetch,
                rollback,
                rollout_id: String::new(),
                rollback_statement,
            };
            let r = api.call(FleetClient::new(api.channel.clone()).assign(req)).await?;
            match out {
                Output::Json => print_json(&json::assign_response(&r)),
                Output::Table => {
                    let verb = if prefetch { "pre-fetch" } else { "run" };
                    println!(
                        "assigned {}:{} ({verb}) to {} agent(s){}",
                        version.model,
                        version.version,
                        r.agent_ids.len(),
                        if r.agent_ids.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", r.agent_ids.join(", "))
                        }
                    );
                }
            }
        }
        Command::Rollout(cmd) => rollout(&api, out, cmd).await?,
        Command::Summaries { agent, model, limit, follow } => {
            let req =
                pb::ListSummariesRequest { agent_id: agent.unwrap_or_default(), model, window: None, limit };
            summaries(&api, out, req, follow).await?;
        }
    }
    Ok(())
}

/// One connection to the coordinator, shared by every call of a command.
struct Api {
    /// Every call through it carries the command's trace context.
    channel: TracedChannel,
    url: String,
}

impl Api {
    /// Awaits one unary call, naming an unreachable coordinator as such.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> anyhow::Result<T> {
        call.await.map(tonic::Response::into_inner).map_err(|s| self.status_error(s))
    }

    fn status_error(&self, s: tonic::Status) -> anyhow::Error {
        if s.code() == tonic::Code::Unavailable {
            Unreachable { url: self.url.clone(), cause: s.message().to_string() }.into()
        } else {
            anyhow::anyhow!("coordinator answered {:?}: {}", s.code(), s.message())
        }
    }
}

/// Connects once; every command shares this channel.
async fn connect(conn: &tls::Connection, timeout: Duration) -> anyhow::Result<Channel> {
    let addr = conn.url.as_str();
    let endpoint = conn
        .transport
        .endpoint(addr)
        .with_context(|| format!("invalid coordinator address {addr:?}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    endpoint.connect().await.map_err(|e| Unreachable { url: addr.to_string(), cause: error_chain(&e) }.into())
}

/// An error and its sources, "outer: inner: root".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

async fn status(channel: TracedChannel) -> anyhow::Result<Vec<ServiceStatus>> {
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

async fn fleet(api: &Api, out: Output, selector: String) -> anyhow::Result<()> {
    let mut client = FleetClient::new(api.channel.clone());
    let agents = api.call(client.list_agents(pb::ListAgentsRequest { selector })).await?;
    let stats = api.call(client.get_fleet_stats(pb::GetFleetStatsRequest { model: String::new() })).await?;
    if out == Output::Json {
        let agents = Value::Array(agents.agents.iter().map(json::agent_info).collect());
        print_json(&serde_json::json!({ "agents": agents, "stats": json::fleet_stats(&stats) }));
        return Ok(());
    }
    let now = SystemTime::now();
    let rows = agents
        .agents
        .iter()
        .map(|a| {
            let status = a.status.clone().unwrap_or_default();
            let state = match (a.revoked, a.online) {
                (true, _) => "revoked",
                (false, true) => "online",
                (false, false) => "offline",
            };
            let pending = match (&status.pending, status.download_total_bytes) {
                (Some(p), total) if p.version != 0 && total > 0 => {
                    format!("{} ({}%)", model_text(Some(p)), status.download_done_bytes * 100 / total)
                }
                (p, _) => model_text(p.as_ref()),
            };
            vec![
                a.agent_id.clone(),
                a.labels.iter().map(|l| format!("{}={}", l.key, l.value)).collect::<Vec<_>>().join(","),
                state.into(),
                model_text(status.running.as_ref()),
                pending,
                a.last_heartbeat.as_ref().map_or("-".into(), |t| age(now, t)),
                format!("{:.1}", status.decisions_per_second),
                human_bytes(a.bytes_saved),
            ]
        })
        .collect();
    print_table(&["AGENT", "LABELS", "STATE", "RUNNING", "PENDING", "HEARTBEAT", "DEC/S", "SAVED"], rows);
    println!(
        "\n{} agents, {} online; {} summaries; {} raw, {} sent as summaries, {} saved",
        stats.agents,
        stats.online_agents,
        stats.summaries,
        human_bytes(stats.raw_bytes),
        human_bytes(stats.summary_bytes),
        human_bytes(stats.bytes_saved),
    );
    Ok(())
}

async fn rollout(api: &Api, out: Output, cmd: RolloutCommand) -> anyhow::Result<()> {
    let mut client = RolloutsClient::new(api.channel.clone());
    let action = |a: ActionArgs| pb::RolloutAction { id: a.id, reason: a.reason, rollback_statement: None };
    let r = match cmd {
        RolloutCommand::Create(args) => api.call(client.create_rollout(args.into_request()?)).await?,
        RolloutCommand::Get { id } => api.call(client.get_rollout(pb::GetRolloutRequest { id })).await?,
        RolloutCommand::List { model } => {
            let req = pb::ListRolloutsRequest { model: model.unwrap_or_default() };
            let r = api.call(client.list_rollouts(req)).await?;
            match out {
                Output::Json => print_json(&json::list_rollouts(&r)),
                Output::Table => print_table(
                    &["ID", "TARGET", "STATE", "STEP", "CREATED"],
                    r.rollouts
                        .iter()
                        .map(|r| {
                            vec![
                                r.id.clone(),
                                model_text(r.spec.as_ref().and_then(|s| s.target.as_ref())),
                                state_text(
                                    pb::RolloutState::try_from(r.state).map(|s| s.as_str_name()),
                                    "ROLLOUT_STATE_",
                                ),
                                format!(
                                    "{}/{}",
                                    (r.current_step as usize + 1).min(r.steps.len()),
                                    r.steps.len()
                                ),
                                r.created_at.as_ref().map_or("-".into(), json::rfc3339),
                            ]
                        })
                        .collect(),
                ),
            }
            return Ok(());
        }
        RolloutCommand::Pause(a) => api.call(client.pause_rollout(action(a))).await?,
        RolloutCommand::Resume(a) => api.call(client.resume_rollout(action(a))).await?,
        RolloutCommand::Rollback(a) => {
            let rollback_statement = a.statement.as_deref().map(keys::read_statement).transpose()?;
            api.call(client.rollback_rollout(pb::RolloutAction { rollback_statement, ..action(a.action) }))
                .await?
        }
    };
    match out {
        Output::Json => print_json(&json::rollout(&r)),
        Output::Table => print_rollout(&r),
    }
    Ok(())
}

fn print_rollout(r: &pb::Rollout) {
    let spec = r.spec.clone().unwrap_or_default();
    let targets = if spec.agent_ids.is_empty() {
        format!("selector {:?}", spec.selector)
    } else {
        format!("agents {}", spec.agent_ids.join(","))
    };
    println!("rollout  {}", r.id);
    println!("target   {} ({targets})", model_text(spec.target.as_ref()));
    println!(
        "state    {}, step {} of {}",
        state_text(pb::RolloutState::try_from(r.state).map(|s| s.as_str_name()), "ROLLOUT_STATE_"),
        (r.current_step as usize + 1).min(r.steps.len()),
        r.steps.len()
    );
    println!("created  {}", r.created_at.as_ref().map_or("-".into(), json::rfc3339));
    println!();
    for s in &r.steps {
        let step = s.step.unwrap_or_default();
        let size =
            if step.agents > 0 { format!("{} agents", step.agents) } else { format!("{}%", step.percent) };
        let soak = Duration::from_secs(step.soak_seconds.into()) + Duration::from_millis(step.soak_ms.into());
        println!(
            "step {}  {size}, soak {soak:?}  {}  agents: {}{}",
            s.index + 1,
            state_text(pb::StepState::try_from(s.state).map(|s| s.as_str_name()), "STEP_STATE_"),
            if s.agent_ids.is_empty() { "-".into() } else { s.agent_ids.join(",") },
            if s.pending_agent_ids.is_empty() {
                String::new()
            } else {
                format!(" (waiting for {})", s.pending_agent_ids.join(","))
            },
        );
        if !s.gates.is_empty() {
            let rows = s
                .gates
                .iter()
                .map(|g| {
                    let verdict = match (g.judged, g.passed) {
                        (false, _) => "not judged yet",
                        (true, true) => "pass",
                        (true, false) => "FAIL",
                    };
                    vec![
                        format!("  {}", g.name),
                        format!("{:.4}", g.value),
                        format!("{:.4}", g.threshold),
                        verdict.into(),
                    ]
                })
                .collect();
            print_table(&["  GATE", "VALUE", "THRESHOLD", "VERDICT"], rows);
        }
    }
    if !r.history.is_empty() {
        println!("\nhistory");
        for e in &r.history {
            println!("  {}  {}", e.at.as_ref().map_or("-".into(), json::rfc3339), e.message);
        }
    }
}

async fn summaries(
    api: &Api,
    out: Output,
    req: pb::ListSummariesRequest,
    follow: bool,
) -> anyhow::Result<()> {
    const HEADER: [&str; 8] =
        ["AGENT", "SEQ", "WINDOW END", "MODEL", "RECORDS", "BAD", "P99 MS", "DECISIONS"];
    let mut client = FleetClient::new(api.channel.clone());
    if !follow {
        let r = api.call(client.list_summaries(req)).await?;
        match out {
            Output::Json => print_json(&json::list_summaries(&r)),
            Output::Table => print_table(&HEADER, r.summaries.iter().map(summary_row).collect()),
        }
        return Ok(());
    }
    let mut stream = api.call(client.watch_summaries(req)).await?;
    if out == Output::Table {
        println!("{}", HEADER.join("  "));
    }
    loop {
        let next = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            next = stream.message() => next.map_err(|s| api.status_error(s))?,
        };
        let Some(s) = next else { bail!("the coordinator closed the summary stream") };
        match out {
            Output::Json => println!("{}", json::summary(&s)),
            Output::Table => println!("{}", summary_row(&s).join("  ")),
        }
    }
}

fn summary_row(s: &pb::Summary) -> Vec<String> {
    vec![
        s.agent_id.clone(),
        s.seq.to_string(),
        s.window_end.as_ref().map_or("-".into(), json::rfc3339),
        model_text(s.model.as_ref()),
        s.records.to_string(),
        s.bad_records.to_string(),
        format!("{:.1}", s.latency_p99_ms),
        s.label_counts.iter().map(|c| format!("{}={}", c.label, c.count)).collect::<Vec<_>>().join(" "),
    ]
}

impl Targets {
    /// Agent ids and selector, exactly one of them non-empty.
    fn into_parts(self) -> (Vec<String>, String) {
        let agents = self.agents.into_iter().filter(|a| !a.is_empty()).collect();
        (agents, self.selector.unwrap_or_default())
    }
}

impl CreateArgs {
    fn into_request(self) -> anyhow::Result<pb::CreateRolloutRequest> {
        let soak_seconds = u32::try_from(self.soak.as_secs()).context("--soak is too long")?;
        let soak_ms = self.soak.subsec_millis();
        let steps = self
            .steps
            .iter()
            .map(|s| {
                let (agents, percent) = match *s {
                    StepSize::Agents(n) => (n, 0),
                    StepSize::Percent(p) => (0, p),
                };
                pb::RolloutStep { agents, percent, soak_seconds, soak_ms }
            })
            .collect();
        let (agent_ids, selector) = self.targets.into_parts();
        Ok(pb::CreateRolloutRequest {
            target: Some(self.version),
            agent_ids,
            selector,
            steps,
            gates: Some(pb::RolloutGates {
                max_load_failures: self.max_load_failures,
                max_bad_record_rate: self.max_bad_record_rate,
                max_latency_p99_ms: self.max_p99_ms,
                max_decision_drift: self.max_drift,
                min_probe_accuracy: 0.0,
                min_decisions: self.min_decisions,
            }),
            prefetch: self.prefetch,
            probe: Vec::new(),
            paused: self.paused,
        })
    }
}

/// Parses `MODEL:VERSION` (or `MODEL@VERSION`) with a version of at least 1.
fn parse_version(s: &str) -> Result<pb::ModelRef, String> {
    let (model, version) = s.rsplit_once([':', '@']).ok_or("expected MODEL:VERSION, e.g. smol:3")?;
    let version: u64 = version.parse().map_err(|_| format!("version {version:?} is not a number"))?;
    if model.is_empty() || version == 0 {
        return Err("expected MODEL:VERSION with a version of at least 1".into());
    }
    Ok(pb::ModelRef { model: model.into(), version })
}

/// Parses `MODEL` (every version) or `MODEL:VERSION`.
fn parse_model_filter(s: &str) -> Result<pb::ModelRef, String> {
    if s.contains([':', '@']) { parse_version(s) } else { Ok(pb::ModelRef { model: s.into(), version: 0 }) }
}

/// Parses a step: `N` agents or `N%`.
fn parse_step(s: &str) -> Result<StepSize, String> {
    let s = s.trim();
    if let Some(p) = s.strip_suffix('%') {
        match p.trim().parse::<u32>() {
            Ok(p @ 1..=100) => Ok(StepSize::Percent(p)),
            _ => Err(format!("{s:?} is not a percentage from 1% to 100%")),
        }
    } else {
        match s.parse::<u32>() {
            Ok(n @ 1..) => Ok(StepSize::Agents(n)),
            _ => Err(format!("{s:?} is neither an agent count (N >= 1) nor a percentage (N%)")),
        }
    }
}

/// Parses a duration: `500ms`, `60s`, `10m`, `1h`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{s:?} is not a duration like 500ms, 60s, 10m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("unknown unit {unit:?} in {s:?}: use ms, s, m or h")),
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("a JSON value always serialises"));
}

/// Prints left-aligned columns separated by two spaces.
fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| if i == last { c.to_string() } else { format!("{c:<w$}", w = widths[i]) })
            .collect();
        println!("{}", text.join("  "));
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `model:version`, or `-` for none (unset or version 0).
fn model_text(m: Option<&pb::ModelRef>) -> String {
    match m {
        Some(m) if m.version != 0 => format!("{}:{}", m.model, m.version),
        _ => "-".into(),
    }
}

/// An enum value name without its prefix, lowercased.
fn state_text<E>(name: Result<&str, E>, prefix: &str) -> String {
    name.map_or("unknown".into(), |n| n.trim_start_matches(prefix).to_lowercase())
}

fn dash(n: u64) -> String {
    if n == 0 { "-".into() } else { n.to_string() }
}

/// How long ago `t` was, e.g. `3s ago`.
fn age(now: SystemTime, t: &prost_types::Timestamp) -> String {
    let Ok(then) = SystemTime::try_from(*t) else { return "-".into() };
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// Bytes with a binary unit, e.g. `1.5 MiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_steps_versions_and_durations() {
        assert_eq!(parse_step("1"), Ok(StepSize::Agents(1)));
        assert_eq!(parse_step("50%"), Ok(StepSize::Percent(50)));
        assert!(parse_step("0%").is_err() && parse_step("101%").is_err() && parse_step("x").is_err());
        assert_eq!(parse_version("smol:3"), Ok(pb::ModelRef { model: "smol".into(), version: 3 }));
        assert!(parse_version("smol").is_err() && parse_version("smol:0").is_err());
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_duration("5d").is_err());
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
