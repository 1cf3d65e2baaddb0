//! Rules versioned in the log: a log records the version of the rules it
//! was written under, `verify` replays each record under its own version,
//! and logs written before versions were recorded (the fixtures, made by the
//! builds of rules v1 and v2) still verify clean.

use std::path::Path;

use instance_lifecycle::engine::{Engine, EngineConfig};
use instance_lifecycle::log::{Event, Finding, InstanceSpec, Log, LogConfig, Note, RulesChoice};
use instance_lifecycle::machine::{
    Effect, Generation, Identity, Ignored, Input, Instance, InstanceName, Outcome, Policy, Preset, RulesVersion, Timer,
    TimerKind, Timestamp, step, step_under,
};

use crate::support::{copy_tree, lifecycle, stdout};

/// The fixture logs: (directory, the version that wrote them, the head `verify` prints).
const FIXTURES: [(&str, RulesVersion, &str); 2] = [
    ("log-rules-v1", RulesVersion::V1, "head: 94:c354b5ff9a557b13"),
    ("log-rules-v2", RulesVersion::V2, "head: 94:a18ab656165af5d2"),
];

fn fixture(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let dir = tempfile::tempdir().expect("dir");
    let to = dir.path().join(name);
    copy_tree(&from, &to);
    (dir, to)
}

/// A log written before this change (by the build of each older rules
/// version, `lifecycle simulate`) verifies clean, each record explained by
/// the version that wrote it; under today's rules alone it does not.
#[test]
fn logs_from_before_rules_versions_verify_clean() {
    for (name, version, head) in FIXTURES {
        let (_dir, log_dir) = fixture(name);
        let path = log_dir.to_str().expect("utf-8");
        let out = lifecycle(&["verify", path]);
        let text = stdout(&out);
        assert!(out.status.success(), "{name}: {text}");
        assert!(text.contains("clean: 94 records of 12 instances"), "{name}: {text}");
        assert!(text.contains(head), "{name}: {text}");
        assert!(text.contains(&format!("under {version}")), "{name}: the note names {version}: {text}");

        let out = lifecycle(&["verify", path, "--rules", "current"]);
        let text = stdout(&out);
        assert!(!out.status.success(), "{name}: today's rules decide some of its records differently: {text}");
        assert!(text.contains("first divergence"), "{name}: {text}");

        let log = Log::open_copy(&log_dir).expect("open").0;
        assert_eq!(log.rules_versions().expect("read"), vec![], "{name}: it recorded no version");
        let report = log.verify_recorded(&Policy::default());
        assert!(report.is_clean(), "{name}: {:?}", report.findings);
        let Some(Note::UnversionedRules { by_version }) =
            report.notes.iter().find(|n| matches!(n, Note::UnversionedRules { .. }))
        else {
            panic!("{name}: no note on unversioned records: {:?}", report.notes)
        };
        assert!(by_version.get(&version).is_some_and(|n| *n > 0), "{name}: {by_version:?}");
        assert!(by_version.keys().all(|v| *v >= version), "{name}: nothing older than its writer: {by_version:?}");
        let current = log.verify_under(None, &Policy::default(), RulesChoice::Current);
        assert!(current.first_divergence().is_some(), "{name}");
        assert!(current.notes.contains(&Note::CurrentRules), "{name}");
    }
}

/// A log written by the build of rules v3 (commit db3bd9c), which recorded
/// its version, verifies clean record by record under v3 — and under
/// today's rules too: v4 and v5 only added inputs such a log cannot hold.
#[test]
fn a_log_written_under_rules_v3_verifies_clean_under_its_own_and_todays_rules() {
    versioned_fixture_verifies_clean("log-rules-v3", "94:df6da18eea5abf14", RulesVersion::V3);
}

/// A fixture log that recorded its rules version `version`: `verify` finds
/// it clean (94 records of 12 instances, head `head`) under its recorded
/// rules and under `--rules current`, and the log reads back that version
/// alone, with no stretch left unversioned.
fn versioned_fixture_verifies_clean(name: &str, head: &str, version: RulesVersion) {
    let (_dir, log_dir) = fixture(name);
    let path = log_dir.to_str().expect("utf-8");
    for args in [vec!["verify", path], vec!["verify", path, "--rules", "current"]] {
        let out = lifecycle(&args);
        let text = stdout(&out);
        assert!(out.status.success(), "{name} {args:?}: {text}");
        assert!(text.contains("clean: 94 records of 12 instances"), "{name} {args:?}: {text}");
        assert!(text.contains(&format!("head: {head}")), "{name} {args:?}: {text}");
    }
    let log = Log::open_copy(&log_dir).expect("open").0;
    assert_eq!(
        log.rules_versions().expect("read").into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        vec![version],
        "{name}"
    );
    let report = log.verify_recorded(&Policy::default());
    assert!(report.is_clean(), "{name}: {:?}", report.findings);
    assert!(!report.notes.iter().any(|n| matches!(n, Note::UnversionedRules { .. })), "{name}: {:?}", report.notes);
}

/// An engine records the version of its rules with its policy, once, and
/// a log that says a version this build does not know is reported, not trusted.
#[tokio::test]
async fn a_log_records_its_rules_version_and_an_unknown_one_is_a_finding() {
    let dir = tempfile::tempdir().expect("dir");
    let config = || EngineConfig { compaction: None, ..EngineConfig::default() };
    for run in 0..2 {
        let engine = Engine::open(dir.path(), config()).await.expect("open");
        let name = format!("a{run}");
        engine.create(&name, InstanceSpec { url: "ws://127.0.0.1:9/".into() }).await.expect("create");
        engine.shutdown().await.expect("shutdown");
        drop(engine);
        let log = Log::open_copy(dir.path()).expect("open").0;
        let versions = log.rules_versions().expect("read");
        assert_eq!(versions, vec![(1, RulesVersion::CURRENT)], "run {run}: recorded once, from the start");
        assert!(log.verify_recorded(&Policy::default()).is_clean());
    }
    let log = Log::open(dir.path(), LogConfig::default()).expect("writer");
    log.set_rules(RulesVersion(99)).expect("record");
    let (tip, _) = log.tip();
    assert_eq!(log.rules_versions().expect("read").last(), Some(&(tip + 1, RulesVersion(99))));
    log.append(&InstanceName::new("b").expect("name"), 1, Timestamp(0), Event::created("ws://x:1/"), &Instance::new())
        .expect("append");
    let report = log.verify_recorded(&Policy::default());
    assert!(
        report
            .findings
            .iter()
            .any(|f| matches!(f, Finding::UnknownRules { version: RulesVersion(99), from } if *from == tip + 1)),
        "{:?}",
        report.findings
    );
}

/// Version 1 is today's table without the heartbeat (the transport kept it):
/// no heartbeat timer or ping in any effect, everything else the same.
#[test]
fn rules_v1_is_the_table_without_heartbeat_upkeep() {
    let name = InstanceName::new("a").expect("name");
    let policy = Policy::preset(Preset::Whatsapp);
    let mut instance = Instance::new();
    let now = Timestamp(1_000);
    let mut saw_heartbeat = false;
    let inputs = |g| {
        vec![
            Input::Connect,
            Input::TransportOpened { generation: g, identity: instance_lifecycle::machine::Identity::new("x").ok() },
            Input::Logout,
        ]
    };
    for input in inputs(instance.generation.next()) {
        let input = match input {
            Input::TransportOpened { identity, .. } => {
                Input::TransportOpened { generation: instance.generation, identity }
            }
            other => other,
        };
        let (today, v1) = (
            step(&name, &instance, &input, &policy, now),
            step_under(RulesVersion::V1, &name, &instance, &input, &policy, now),
        );
        let (Outcome::Transition(today), Outcome::Transition(v1)) = (today, v1) else {
            panic!("{input:?} moves under both")
        };
        let heartbeat = |e: &Effect| match e {
            Effect::ArmTimer { timer, .. } | Effect::CancelTimer { timer } => {
                matches!(timer.kind, TimerKind::Heartbeat | TimerKind::PongDeadline)
            }
            Effect::SendPing { .. } => true,
            _ => false,
        };
        saw_heartbeat |= today.effects.iter().any(heartbeat);
        assert!(!v1.effects.iter().any(heartbeat), "{input:?}: {:?}", v1.effects);
        let rest: Vec<_> = today.effects.iter().filter(|e| !heartbeat(e)).cloned().collect();
        assert_eq!((v1.to.clone(), v1.generation, v1.effects.clone()), (today.to.clone(), today.generation, rest));
        instance.apply(&today);
    }
    assert!(saw_heartbeat, "today's table arms the heartbeat when the connection opens");

    // Open, its heartbeat timer due: today's table pings (upkeep); v1 had no such timer.
    let opened = {
        let mut open = Instance::new();
        for input in
            [Input::Connect, Input::TransportOpened { generation: Generation(1), identity: Identity::new("x").ok() }]
        {
            let Outcome::Transition(t) = step(&name, &open, &input, &policy, now) else { panic!("{input:?}") };
            open.apply(&t);
        }
        open
    };
    let beat = Input::TimerFired { timer: Timer { kind: TimerKind::Heartbeat, generation: opened.generation } };
    let Outcome::Effects(today) = step(&name, &opened, &beat, &policy, now) else { panic!("upkeep today") };
    assert!(today.iter().any(|e| matches!(e, Effect::SendPing { .. })), "{today:?}");
    assert!(
        matches!(
            step_under(RulesVersion::V1, &name, &opened, &beat, &policy, now),
            Outcome::Ignored(Ignored::NotExpected)
        ),
        "v1: no ping, no timer: nothing to do"
    );
    let v2 = step_under(RulesVersion::V2, &name, &opened, &beat, &policy, now);
    assert_eq!(v2, Outcome::Effects(today), "v2 already had the heartbeat in the table");
}

/// Before version 3 full jitter reached only the current exponential step,
/// so every first retry fell at `base`; from version 3 it reaches the next.
#[test]
fn rules_before_v3_drew_the_first_retry_at_base() {
    let policy = Policy::preset(Preset::Whatsapp);
    let base = policy.backoff.base;
    let names: Vec<_> = (0..50).map(|i| InstanceName::new(format!("n{i}")).expect("name")).collect();
    for v in [RulesVersion::V1, RulesVersion::V2] {
        assert!(names.iter().all(|n| policy.backoff_delay_under(v, n, 1) == base), "{v}");
    }
    let spread: std::collections::BTreeSet<_> =
        names.iter().map(|n| policy.backoff_delay_under(RulesVersion::V3, n, 1)).collect();
    assert!(spread.len() > 10, "v3 spreads the first retries: {spread:?}");
    assert!(
        names.iter().all(|n| policy.backoff_delay(n, 3) == policy.backoff_delay_under(RulesVersion::CURRENT, n, 3))
    );
}

/// Appends `name`'s first records as `rules` decides them: created, connect, opened.
fn write_under(log: &Log, rules: RulesVersion, name: &str) {
    let name = InstanceName::new(name).expect("name");
    let policy = Policy::default();
    let mut instance = Instance::new();
    let mut seq = log.next_seq(&name);
    log.append(&name, seq, Timestamp(0), Event::created("ws://127.0.0.1:9/"), &instance).expect("created");
    for input in [Input::Connect, Input::TransportOpened { generation: instance.generation.next(), identity: None }] {
        let input = match input {
            Input::TransportOpened { .. } => Input::TransportOpened {
                generation: instance.generation,
                identity: instance_lifecycle::machine::Identity::new("id").ok(),
            },
            other => other,
        };
        let Outcome::Transition(t) = step_under(rules, &name, &instance, &input, &policy, Timestamp(1)) else {
            panic!("{input:?} moves")
        };
        let from = instance.clone();
        instance.apply(&t);
        seq += 1;
        let event = Event::Transition { from, input, effects: t.effects };
        log.append(&name, seq, Timestamp(1), event, &instance).expect("transition");
    }
}

/// Records are replayed under the version the log recorded for them, a
/// known one as itself and an unknown one under today's rules (with a finding).
#[test]
fn each_stretch_is_replayed_under_its_recorded_version() {
    let log = Log::in_memory().expect("log");
    log.set_rules(RulesVersion::V1).expect("v1");
    write_under(&log, RulesVersion::V1, "old");
    log.set_rules(RulesVersion::CURRENT).expect("current");
    write_under(&log, RulesVersion::CURRENT, "new");
    let report = log.verify_recorded(&Policy::default());
    assert!(report.is_clean(), "each under its own version: {:?}", report.findings);
    assert!(!report.notes.iter().any(|n| matches!(n, Note::UnversionedRules { .. })), "{:?}", report.notes);
    let current = log.verify_under(None, &Policy::default(), RulesChoice::Current);
    assert!(
        matches!(current.first_divergence(), Some(Finding::Divergence { instance, rules: RulesVersion::CURRENT, .. }) if instance.as_str() == "old"),
        "{:?}",
        current.findings
    );

    // A version this build does not know (older than v1 here) is replayed under today's rules.
    let unknown = Log::in_memory().expect("log");
    unknown.set_rules(RulesVersion(0)).expect("v0");
    write_under(&unknown, RulesVersion::V1, "a");
    let report = unknown.verify_recorded(&Policy::default());
    assert!(report.findings.iter().any(|f| matches!(f, Finding::UnknownRules { version: RulesVersion(0), from: 1 })));
    assert!(
        matches!(report.first_divergence(), Some(Finding::Divergence { rules: RulesVersion::CURRENT, .. })),
        "{:?}",
        report.findings
    );
}

/// Rules before v4 knew nothing of a peer's reconnect request, an invalid
/// session or a protocol's heartbeat schedule: replayed under them, those
/// inputs change nothing; under v4 each one decides.
#[test]
fn rules_before_v4_ignore_the_protocol_session_inputs() {
    use instance_lifecycle::machine::{
        Generation, Identity, Ignored, Input, Instance, Outcome, State, Timestamp, step_under,
    };
    let g = Generation(2);
    let open = Instance {
        generation: g,
        state: State::Open { identity: Identity::new("s 1 wss://r").expect("id"), since: Timestamp(0), retries: 0 },
    };
    let name = instance_lifecycle::machine::InstanceName::new("v4").expect("name");
    let inputs = [
        Input::ReconnectRequested { generation: g },
        Input::SessionInvalid { generation: g, retry_after: std::time::Duration::from_secs(2) },
        Input::HeartbeatDue { generation: g, after: std::time::Duration::from_secs(41) },
    ];
    let handshaking = Instance {
        generation: g,
        state: State::Connecting { phase: instance_lifecycle::machine::Phase::Handshaking, retries: 0, resume: None },
    };
    for (instance, input) in inputs.iter().map(|i| (&open, i)).chain(inputs[..2].iter().map(|i| (&handshaking, i))) {
        for old in [RulesVersion::V1, RulesVersion::V2, RulesVersion::V3] {
            let o = step_under(old, &name, instance, input, &Policy::default(), Timestamp(1));
            assert_eq!(o, Outcome::Ignored(Ignored::NotExpected), "{old} + {input:?} in {}", instance.state);
        }
        let o = step_under(RulesVersion::V4, &name, instance, input, &Policy::default(), Timestamp(1));
        assert!(matches!(o, Outcome::Transition(_) | Outcome::Effects(_)), "v4 + {input:?}: {o:?}");
    }
}

/// Rules before v5 did not restart a handshake's connect deadline at a step
/// taken after a fleet-wide wait: replayed under them, the step changes
/// nothing; under v5 it re-arms the deadline.
#[test]
fn rules_before_v5_ignore_the_handshake_step() {
    use instance_lifecycle::machine::{
        Effect, Generation, Ignored, Input, Instance, Outcome, Phase, State, Timer, TimerKind, Timestamp, step_under,
    };
    let g = Generation(2);
    let handshaking =
        Instance { generation: g, state: State::Connecting { phase: Phase::Handshaking, retries: 0, resume: None } };
    let name = instance_lifecycle::machine::InstanceName::new("v5").expect("name");
    let input = Input::HandshakeStep { generation: g };
    let policy = Policy::default();
    for old in [RulesVersion::V1, RulesVersion::V2, RulesVersion::V3, RulesVersion::V4] {
        let o = step_under(old, &name, &handshaking, &input, &policy, Timestamp(1));
        assert_eq!(o, Outcome::Ignored(Ignored::NotExpected), "{old}");
    }
    let o = step_under(RulesVersion::V5, &name, &handshaking, &input, &policy, Timestamp(1));
    let timer = Timer { kind: TimerKind::Connect, generation: g };
    assert_eq!(o, Outcome::Effects(vec![Effect::ArmTimer { timer, after: policy.timeouts.connect }]));
}

/// A log written under rules v4 verifies clean under its recorded rules and
/// today's too: v5 only added an input such a log cannot hold.
#[test]
fn a_log_written_under_rules_v4_verifies_clean_under_its_own_and_todays_rules() {
    versioned_fixture_verifies_clean("log-rules-v4", "94:64537129d47b6aa3", RulesVersion::V4);
}
