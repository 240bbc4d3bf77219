//! Every end-to-end test of the workspace in one test binary: one link against libtorch
//! instead of one per file. nextest still runs each test in its own process; run one file's
//! tests with `cargo nextest run -p llmchain-tests -E 'test(/^agent_e2e::/)'` (or a plain
//! name filter such as `agent_e2e::`).

mod agent_e2e;
mod agent_mqtt;
mod agent_sync;
mod deploy;
mod foundation;
mod fuzz_regressions;
mod model_cli;
mod observability;
mod publish;
mod security_integrity;
mod security_pki;
mod system_faults;
mod traces;
