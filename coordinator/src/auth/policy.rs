//! Which roles may call which RPC: one table, keyed by gRPC path.
//!
//! Every RPC of every service the coordinator serves has exactly one row (a unit test checks
//! the table against the compiled descriptors, so a new RPC cannot ship unlisted); a path that
//! is not in the table is refused. Per-identity rules that need the request itself (an agent's
//! own session, its own summaries, blobs of versions assigned to it) are checked by the
//! handlers with [`super::Caller`].

use super::Role;

/// Who may call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with or without a client certificate (enrollment, health, reflection).
    Public,
    /// Callers with a valid, unrevoked certificate of one of these roles.
    Roles(&'static [Role]),
}

const AGENT: &[Role] = &[Role::Agent];
const TRAINER: &[Role] = &[Role::Trainer];
const OPERATOR: &[Role] = &[Role::Operator];
const TRAINER_OPERATOR: &[Role] = &[Role::Trainer, Role::Operator];
const ALL: &[Role] = &[Role::Agent, Role::Trainer, Role::Operator];

/// The table: gRPC path → who may call it.
pub const METHODS: &[(&str, Access)] = &[
    // Registry: trainers publish; agents read only what is assigned to them (handlers check).
    ("/llmchain.v1.Registry/ListModels", Access::Roles(TRAINER_OPERATOR)),
    ("/llmchain.v1.Registry/ListVersions", Access::Roles(TRAINER_OPERATOR)),
    ("/llmchain.v1.Registry/GetManifest", Access::Roles(ALL)),
    ("/llmchain.v1.Registry/MissingBlobs", Access::Roles(ALL)),
    ("/llmchain.v1.Registry/PlanDelta", Access::Roles(ALL)),
    ("/llmchain.v1.Registry/UploadBlob", Access::Roles(TRAINER)),
    ("/llmchain.v1.Registry/PublishVersion", Access::Roles(TRAINER)),
    ("/llmchain.v1.Registry/FetchBlob", Access::Roles(ALL)),
    // Trust documents are signed by the offline root key: the coordinator only relays them, and
    // publishing one is an operator's act (`llmchainctl keys rotate`).
    ("/llmchain.v1.Registry/PublishTrustDocument", Access::Roles(OPERATOR)),
    ("/llmchain.v1.Registry/GetTrustDocument", Access::Roles(ALL)),
    // Fleet: agents hold their own session and report their own summaries (handlers check);
    // the trainer reads summaries for hard examples; operators do the rest.
    ("/llmchain.v1.Fleet/Enroll", Access::Public),
    ("/llmchain.v1.Fleet/Session", Access::Roles(AGENT)),
    ("/llmchain.v1.Fleet/ReportSummaries", Access::Roles(AGENT)),
    ("/llmchain.v1.Fleet/ListAgents", Access::Roles(OPERATOR)),
    ("/llmchain.v1.Fleet/ListSummaries", Access::Roles(TRAINER_OPERATOR)),
    ("/llmchain.v1.Fleet/WatchSummaries", Access::Roles(TRAINER_OPERATOR)),
    ("/llmchain.v1.Fleet/CreateBootstrapToken", Access::Roles(OPERATOR)),
    ("/llmchain.v1.Fleet/RevokeAgent", Access::Roles(OPERATOR)),
    ("/llmchain.v1.Fleet/Assign", Access::Roles(OPERATOR)),
    ("/llmchain.v1.Fleet/GetFleetStats", Access::Roles(OPERATOR)),
    // Rollouts: operators only.
    ("/llmchain.v1.Rollouts/CreateRollout", Access::Roles(OPERATOR)),
    ("/llmchain.v1.Rollouts/GetRollout", Access::Roles(OPERATOR)),
    ("/llmchain.v1.Rollouts/ListRollouts", Access::Roles(OPERATOR)),
    ("/llmchain.v1.Rollouts/PauseRollout", Access::Roles(OPERATOR)),
    ("/llmchain.v1.Rollouts/ResumeRollout", Access::Roles(OPERATOR)),
    ("/llmchain.v1.Rollouts/RollbackRollout", Access::Roles(OPERATOR)),
    // Standard services: load balancers and grpcurl need them without a certificate.
    ("/grpc.health.v1.Health/Check", Access::Public),
    ("/grpc.health.v1.Health/Watch", Access::Public),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Access::Public),
];

/// Who may call `path`; `None` for a path not in the table.
pub fn access(path: &str) -> Option<Access> {
    METHODS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use prost::Message;

    use super::*;

    #[test]
    fn every_rpc_of_every_service_has_exactly_one_row() {
        let set = prost_types::FileDescriptorSet::decode(llmchain_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut served = HashSet::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    served.insert(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
        assert!(served.len() >= 20, "descriptors list the services: {served:?}");
        let listed: HashSet<String> = METHODS.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(listed.len(), METHODS.len(), "a path is listed twice");
        let unlisted: Vec<_> = served.difference(&listed).collect();
        assert!(unlisted.is_empty(), "rpcs without a row: {unlisted:?}");
        let standard = listed.iter().filter(|p| p.starts_with("/grpc.")).count();
        assert_eq!(listed.len(), served.len() + standard, "rows for rpcs nobody serves");
    }

    #[test]
    fn publishing_is_the_trainers_and_administration_the_operators() {
        let roles = |path: &str| match access(path) {
            Some(Access::Roles(r)) => r.to_vec(),
            other => panic!("{path}: {other:?}"),
        };
        assert_eq!(roles("/llmchain.v1.Registry/PublishVersion"), vec![Role::Trainer]);
        assert_eq!(roles("/llmchain.v1.Registry/UploadBlob"), vec![Role::Trainer]);
        for admin in ["CreateBootstrapToken", "RevokeAgent", "Assign"] {
            assert_eq!(roles(&format!("/llmchain.v1.Fleet/{admin}")), vec![Role::Operator]);
        }
        assert_eq!(roles("/llmchain.v1.Rollouts/CreateRollout"), vec![Role::Operator]);
        assert_eq!(access("/llmchain.v1.Fleet/Enroll"), Some(Access::Public));
        assert_eq!(access("/llmchain.v1.Fleet/Nope"), None);
    }
}
