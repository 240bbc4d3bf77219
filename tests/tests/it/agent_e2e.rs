//! The edge agent with the real binaries: a coordinator process, `edge-agent run` processes,
//! versions published through the registry API, and the agent's link through a fault proxy.

use std::{collections::BTreeSet, time::Duration};

use llmchain_proto::pb;
use llmchain_tests::{
    eventually,
    fleet::{
        Coordinator, TrainerKey, agent_info, assign, assign_rollback, publish, spawn_agent, tiny_model,
        wait_running,
    },
    proxy::FaultProxy,
};

const MODEL: &str = "tiny-triage";

/// Every stored summary of `agent`, oldest first.
async fn summaries(c: &Coordinator, agent: &str) -> Vec<pb::Summary> {
    let mut fleet = c.fleet().await;
    let mut list = fleet
        .list_summaries(pb::ListSummariesRequest {
            agent_id: agent.into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .summaries;
    list.sort_by_key(|s| s.seq);
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_pulls_only_the_delta_refuses_bad_versions_and_rolls_back_on_command() {
    let dir = tempfile::tempdir().unwrap();
    let trainer = TrainerKey::generate(dir.path(), "trainer");
    let rogue = TrainerKey::generate(dir.path(), "rogue");
    // The coordinator accepts both keys; the agent trusts only the trainer's.
    let c = Coordinator::start(dir.path(), &[&trainer.public, &rogue.public], &[]);
    let v1 = publish(c.addr, &trainer.key, MODEL, 1, &tiny_model(7, &[])).await;
    let proxy = FaultProxy::start(c.addr).await.unwrap();
    let _agent =
        spawn_agent(dir.path(), "edge-1", &proxy.url(), &trainer.public, &["--source", "sim:rate=20"]);
    let mut fleet = c.fleet().await;

    assign(&mut fleet, "edge-1", MODEL, 1, false).await;
    wait_running(&mut fleet, "edge-1", MODEL, 1, Duration::from_secs(60)).await;

    // v2 changes two layers' tensors: exactly their blobs cross the link.
    let v2 = publish(
        c.addr,
        &trainer.key,
        MODEL,
        2,
        &tiny_model(7, &["layers.1.self_attn.q_proj", "layers.1.mlp.down_proj"]),
    )
    .await;
    let changed: Vec<_> =
        v2.tensors.iter().filter(|t| v1.tensor(&t.name).map(|o| o.digest) != Some(t.digest)).collect();
    assert_eq!(changed.len(), 2, "{changed:?}");
    let delta: u64 = changed.iter().map(|t| t.size).sum();
    let before = proxy.downstream_bytes();
    assign(&mut fleet, "edge-1", MODEL, 2, false).await;
    wait_running(&mut fleet, "edge-1", MODEL, 2, Duration::from_secs(60)).await;
    let moved = proxy.downstream_bytes() - before;
    assert!(moved >= delta, "{moved} bytes crossed the link, the changed tensors alone are {delta}");
    // Manifest, heartbeats' answers and framing are small next to one tensor; the full
    // model is ~13 MB.
    assert!(moved < delta + 256 * 1024, "{moved} bytes crossed the link for a {delta}-byte delta");
    assert!(v2.total_bytes() > 10 * delta);

    // A version signed by a key the agent does not trust is refused; v2 keeps running.
    let v3 = publish(c.addr, &rogue.key, MODEL, 3, &tiny_model(8, &[])).await;
    assert_eq!(v3.id.version, 3);
    assign(&mut fleet, "edge-1", MODEL, 3, false).await;
    let refused = eventually(Duration::from_secs(30), || {
        let mut fleet = fleet.clone();
        async move {
            let info = agent_info(&mut fleet, "edge-1").await?;
            let error = info.status?.last_error;
            (!error.is_empty()).then_some(error)
        }
    })
    .await
    .expect("the agent reports the refusal");
    assert!(refused.contains("trust") || refused.contains("key"), "{refused}");
    wait_running(&mut fleet, "edge-1", MODEL, 2, Duration::from_secs(5)).await;

    // A downgrade is refused unless it is a rollback.
    assign(&mut fleet, "edge-1", MODEL, 1, false).await;
    eventually(Duration::from_secs(10), || {
        let mut fleet = fleet.clone();
        async move {
            agent_info(&mut fleet, "edge-1").await?.status?.last_error.contains("rollback").then_some(())
        }
    })
    .await
    .expect("the downgrade is refused");
    wait_running(&mut fleet, "edge-1", MODEL, 2, Duration::from_secs(5)).await;
    // The rollback flag alone is not enough: the coordinator could set it. The trainer signs.
    assign(&mut fleet, "edge-1", MODEL, 1, true).await;
    eventually(Duration::from_secs(10), || {
        let mut fleet = fleet.clone();
        async move {
            let error = agent_info(&mut fleet, "edge-1").await?.status?.last_error;
            error.contains("no signed rollback statement").then_some(())
        }
    })
    .await
    .expect("an unsigned rollback is refused");
    wait_running(&mut fleet, "edge-1", MODEL, 2, Duration::from_secs(5)).await;
    assign_rollback(&mut fleet, "edge-1", MODEL, 1, &trainer.key).await;
    wait_running(&mut fleet, "edge-1", MODEL, 1, Duration::from_secs(30)).await;

    // Decisions flowed all along: summaries arrived, each naming the version that decided.
    let got = eventually(Duration::from_secs(20), || async {
        let s = summaries(&c, "edge-1").await;
        s.iter().any(|s| s.model.as_ref().is_some_and(|m| m.version == 2)).then_some(s)
    })
    .await
    .expect("summaries of v2 decisions");
    assert!(got.iter().all(|s| s.records > 0 && s.model.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_summaries_survive_sigkill_and_arrive_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let trainer = TrainerKey::generate(dir.path(), "trainer");
    let mut c = Coordinator::start(dir.path(), &[&trainer.public], &[]);
    publish(c.addr, &trainer.key, MODEL, 1, &tiny_model(3, &[])).await;
    let url = c.url();
    let args = ["--source", "sim:seed=5,rate=200", "--window-records", "20", "--batch-size", "8"];
    let mut agent = spawn_agent(dir.path(), "edge-2", &url, &trainer.public, &args);
    let mut fleet = c.fleet().await;
    assign(&mut fleet, "edge-2", MODEL, 1, false).await;
    wait_running(&mut fleet, "edge-2", MODEL, 1, Duration::from_secs(60)).await;
    eventually(Duration::from_secs(30), || async {
        (summaries(&c, "edge-2").await.len() >= 3).then_some(())
    })
    .await
    .expect("summaries while online");

    // The coordinator goes away; the agent keeps deciding and spools its summaries.
    c.kill();
    let spool = dir.path().join("edge-2/state/spool");
    let spooled = eventually(Duration::from_secs(30), || async {
        let n = std::fs::read_dir(&spool)
            .ok()?
            .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "summary")))
            .count();
        (n >= 5).then_some(n)
    })
    .await;
    assert!(
        spooled.is_some(),
        "the agent did not spool summaries while offline: {:?}",
        std::fs::read_dir(&spool).map(|d| d.count())
    );

    // SIGKILL the agent with its spool full, restart it (still offline: it serves its cached
    // version), then bring the coordinator back.
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    agent = spawn_agent(dir.path(), "edge-2", &url, &trainer.public, &args);
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.restart();
    let mut fleet = c.fleet().await;
    wait_running(&mut fleet, "edge-2", MODEL, 1, Duration::from_secs(30)).await;

    // Every sequence number arrives once, with no gaps: 1..=last.
    eventually(Duration::from_secs(60), || async {
        let info = agent_info(&mut c.fleet().await, "edge-2").await?;
        let depth = info.status?.spool_depth;
        let s = summaries(&c, "edge-2").await;
        (depth == 0 && s.len() >= 10).then_some(())
    })
    .await
    .expect("the spool drained");
    // The agent keeps reporting until it is gone; a report in flight when it is killed may
    // still be stored after. So stop it, then wait until the stored list and the aggregates
    // agree.
    drop(agent);
    let (all, stats) = eventually(Duration::from_secs(20), || {
        let (c, mut fleet) = (&c, fleet.clone());
        async move {
            let all = summaries(c, "edge-2").await;
            let stats = fleet
                .get_fleet_stats(pb::GetFleetStatsRequest { model: MODEL.into() })
                .await
                .ok()?
                .into_inner();
            (stats.summaries == all.len() as u64).then_some((all, stats))
        }
    })
    .await
    .expect("the fleet statistics count the stored summaries");
    let seqs: Vec<u64> = all.iter().map(|s| s.seq).collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "duplicates in {seqs:?}");
    let last = *seqs.last().unwrap();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "gaps in the sequence numbers");
    // The aggregates counted each summary once.
    assert_eq!(stats.raw_bytes, all.iter().map(|s| s.raw_bytes).sum::<u64>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let trainer = TrainerKey::generate(dir.path(), "trainer");
    let c = Coordinator::start(dir.path(), &[&trainer.public], &[]);
    publish(c.addr, &trainer.key, MODEL, 1, &tiny_model(11, &[])).await;
    // 1,000 records, every tenth malformed in one of several ways.
    let mut generator = llmchain_task::generate::Generator::new(llmchain_task::generate::GenConfig::base(9));
    let broken = [
        "{not json".to_string(),
        r#"{"device_id":"x","kind":"pump"}"#.to_string(),
        r#"{"device_id":7,"kind":"pump","ts":"2026-11-29T10:00:00Z","temp_c":"hot"}"#.to_string(),
        "[]".to_string(),
        r#"{"device_id":"pump-1","kind":"pump","ts":"2026-11-29T10:00:00Z","temp_c":[1,2,3,4,5,6]}"#
            .to_string(),
    ];
    let mut lines = Vec::new();
    for i in 0..1000 {
        if i % 10 == 9 {
            lines.push(broken[(i / 10) % broken.len()].replace('\n', " "));
        } else {
            lines.push(generator.next_labelled().0.to_json());
        }
    }
    let input = dir.path().join("records.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let source = format!("jsonl:{}", input.display());
    let decisions = dir.path().join("decisions.jsonl");
    let executor = format!("jsonl:{}", decisions.display());
    // Records wait in the source until the agent has a model: assign after it started.
    let agent = spawn_agent(
        dir.path(),
        "edge-3",
        &c.url(),
        &trainer.public,
        &["--source", &source, "--executor", &executor, "--window-records", "250", "--batch-size", "32"],
    );
    let mut fleet = c.fleet().await;
    assign(&mut fleet, "edge-3", MODEL, 1, false).await;
    let mut agent = agent;
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(s) = agent.child.try_wait().unwrap() {
                return s;
            }
            assert!(std::time::Instant::now() < deadline, "the agent did not finish the file");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "the agent exited with {status}");
    // Everything was reported before the agent exited.
    let all = summaries(&c, "edge-3").await;
    assert_eq!(all.iter().map(|s| s.records).sum::<u64>(), 1000, "{} summaries", all.len());
    assert_eq!(all.iter().map(|s| s.bad_records).sum::<u64>(), 100);
    let decided_in_summaries: u64 = all.iter().flat_map(|s| &s.label_counts).map(|l| l.count).sum();
    assert_eq!(decided_in_summaries, 900);
    let decided = std::fs::read_to_string(&decisions).unwrap().lines().count();
    assert_eq!(decided, 900, "one decision per good record");
}
