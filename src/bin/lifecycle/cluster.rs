//! `lifecycle cluster URL`: an operator's view of a cluster on NATS
//! JetStream — every instance's owner now, its last state, who owned it,
//! and the verification of its stream (the log of record). Reads only.

use std::collections::BTreeMap;
use std::process::ExitCode;

use instance_lifecycle::cluster::ClusterReader;
use instance_lifecycle::machine::{Policy, Preset};

use crate::output::{Failure, fail, paint, say};

pub async fn run(url: &str, namespace: &str, policy: Option<Preset>, json: bool) -> Result<ExitCode, Failure> {
    let policy = policy.map(Policy::preset);
    let reader = ClusterReader::connect(url, namespace).await.map_err(|e| fail(e.to_string()))?;
    let names = reader.names().await.map_err(|e| fail(e.to_string()))?;
    let mut by_owner: BTreeMap<String, usize> = BTreeMap::new();
    let mut broken = 0usize;
    if !json {
        say!("{:<24} {:<16} {:<12} {:>8} {:>10}  owners", "instance", "owner", "state", "records", "takeovers");
    }
    for name in &names {
        let check = reader.verify(name, policy.as_ref()).await.map_err(|e| fail(e.to_string()))?;
        let owner = reader.owner_of(name).await.map_err(|e| fail(e.to_string()))?;
        let counted = owner.as_ref().map_or_else(|| "without an owner".to_owned(), |o| format!("owned by {o}"));
        *by_owner.entry(counted).or_default() += 1;
        broken += usize::from(!check.violations.is_empty());
        let state = check.last.as_ref().map(|i| i.state.kind());
        if json {
            let violations: Vec<String> = check.violations.iter().map(ToString::to_string).collect();
            let line = serde_json::json!({
                "instance": name, "owner": owner, "state": state.map(|k| k.to_string()),
                "records": check.records, "takeovers": check.takeovers, "owners": check.owners,
                "violations": violations,
            });
            say!("{line}");
        } else {
            // Padded first, painted after: escape codes take no columns.
            let shown =
                state.map_or_else(|| format!("{:<12}", "—"), |k| format!("{}{:<12}{:#}", paint(k), k, paint(k)));
            say!(
                "{:<24} {:<16} {} {:>8} {:>10}  {}",
                name.as_str(),
                owner.as_deref().unwrap_or("—"),
                shown,
                check.records,
                check.takeovers,
                check.owners.join(" → ")
            );
            for v in &check.violations {
                say!("  ✗ {v}");
            }
        }
    }
    if !json {
        let owners: Vec<String> = by_owner.iter().map(|(o, n)| format!("{n} {o}")).collect();
        say!(
            "{} instances: {}; {}",
            names.len(),
            owners.join(", "),
            if broken == 0 { "every stream verifies".to_owned() } else { format!("{broken} streams broken") }
        );
        if policy.is_none() {
            say!("(ownership and order checked; add --policy PRESET to replay every transition through the rules too)");
        }
    }
    Ok(if broken == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
