//! API keys, as Evolution API takes them: the global key opens everything;
//! an instance's own token opens only that instance. Keys travel in the
//! `apikey` header (Evolution's) or as `Authorization: Bearer KEY`. Keys are
//! compared as BLAKE3 digests, in constant time. Without a global key (the
//! default, on 127.0.0.1 only) the API is open.
//!
//! Where the token digests live: on one host, in the log — committed in the
//! instance's `Created` record with it (one commit), kept beside its spec,
//! and gone when the instance is purged (logs written before kept them in
//! the auxiliary space: still read, and dropped once their instance is
//! gone); in a cluster, in a KV bucket of the cluster's NATS (`<namespace>-tokens`),
//! so that a token works on every host, after any restart or failover. Each
//! host mirrors the bucket (a watch) and asks it directly for a digest it
//! does not know yet (a token made on another host a moment ago).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_nats::jetstream::kv;
use axum::http::HeaderMap;
use futures_util::StreamExt;

use super::error::ApiError;
use crate::log::Log;
use crate::machine::InstanceName;

/// Where instance tokens lived in the log's auxiliary space before they
/// were committed with the `Created` record (read, never written).
const TOKENS: &[u8] = b"serve/token/";

/// Who a request is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Caller {
    /// The global key, or no key needed.
    Global,
    /// The token of this instance.
    Instance(InstanceName),
}

/// Where the digests are kept.
enum Store {
    /// In the log, with each instance's `Created` record.
    Log,
    /// Keys `n.<instance token>` (the instance's digest, hex) and
    /// `d.<digest hex>` (the instance it opens): a digest opens an instance
    /// only while the instance's own key names it, so a replaced token never opens it again.
    Kv(Box<kv::Store>),
}

pub(crate) struct Auth {
    global: Option<blake3::Hash>,
    /// Each instance's token digest (in a cluster, as mirrored from the bucket).
    tokens: Mutex<HashMap<InstanceName, blake3::Hash>>,
    store: Store,
}

fn hex(hash: &blake3::Hash) -> String {
    hash.to_hex().to_string()
}

impl Auth {
    /// Loads the instance tokens kept in the log: the digests committed with
    /// `Created` records, and those an older version kept in the auxiliary
    /// space for instances the log still holds and whose record has none
    /// (the others — purged since, or superseded — are deleted).
    pub(crate) fn load(global: Option<&str>, log: &Log) -> Result<Self, crate::log::LogError> {
        let mut tokens: HashMap<InstanceName, blake3::Hash> =
            log.tokens()?.into_iter().map(|(name, digest)| (name, blake3::Hash::from_bytes(digest.0))).collect();
        let mut stale = Vec::new();
        for (key, value) in log.aux_scan(TOKENS)? {
            let name = std::str::from_utf8(&key[TOKENS.len()..]).ok().and_then(|n| InstanceName::new(n).ok());
            match (name, <[u8; 32]>::try_from(value.as_slice())) {
                // Superseded by a record's token, or its instance gone: dropped.
                (Some(name), Ok(digest)) if !tokens.contains_key(&name) && log.spec(&name)?.is_some() => {
                    tokens.insert(name, blake3::Hash::from_bytes(digest));
                }
                _ => stale.push((key, None)),
            }
        }
        if !stale.is_empty() {
            tracing::info!(count = stale.len(), "dropping the tokens of instances no longer in the log");
            log.aux_apply(stale)?;
        }
        Ok(Self { global: global.map(|k| blake3::hash(k.as_bytes())), tokens: Mutex::new(tokens), store: Store::Log })
    }

    /// The tokens of a cluster, in its `<namespace>-tokens` bucket (created if
    /// missing), mirrored into this host from now on.
    pub(crate) async fn cluster(
        global: Option<&str>,
        cluster: &crate::cluster::Cluster,
    ) -> Result<Arc<Self>, crate::cluster::ClusterError> {
        let js = cluster.jetstream();
        let nats = |op: &'static str, e: &dyn std::fmt::Display| crate::cluster::ClusterError::Nats {
            url: cluster.url().to_owned(),
            op,
            message: e.to_string(),
        };
        let bucket = js
            .create_or_update_key_value(kv::Config {
                bucket: format!("{}-tokens", cluster.namespace()),
                description: "instance-lifecycle: instance token digests (n.<instance>, d.<digest>)".into(),
                history: 1,
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("creating the token bucket", &e))?;
        let watch = bucket.watch_with_history("n.>").await.map_err(|e| nats("watching the token bucket", &e))?;
        let auth = Arc::new(Self {
            global: global.map(|k| blake3::hash(k.as_bytes())),
            tokens: Mutex::default(),
            store: Store::Kv(Box::new(bucket)),
        });
        tokio::spawn(mirror(Arc::downgrade(&auth), watch));
        Ok(auth)
    }

    fn tokens(&self) -> MutexGuard<'_, HashMap<InstanceName, blake3::Hash>> {
        self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the service asks for keys at all.
    pub(crate) fn enabled(&self) -> bool {
        self.global.is_some()
    }

    /// The instance a digest opens, as the mirror knows it.
    fn known(&self, digest: &blake3::Hash) -> Option<InstanceName> {
        // A linear scan compares every token in constant time each; fleets hold thousands, not millions.
        self.tokens().iter().find(|(_, t)| *t == digest).map(|(n, _)| n.clone())
    }

    /// The instance a digest opens, asking the bucket when the mirror does
    /// not know it (a token made on another host a moment ago).
    async fn holder(&self, digest: &blake3::Hash) -> Result<Option<InstanceName>, ApiError> {
        if let Some(name) = self.known(digest) {
            return Ok(Some(name));
        }
        let Store::Kv(bucket) = &self.store else { return Ok(None) };
        let unavailable = |e: &dyn std::fmt::Display| {
            ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "cluster_unavailable", format!("tokens: {e}"))
        };
        let Some(name) = bucket.get(format!("d.{}", hex(digest))).await.map_err(|e| unavailable(&e))? else {
            return Ok(None);
        };
        let Some(name) = std::str::from_utf8(&name).ok().and_then(|n| InstanceName::new(n).ok()) else {
            return Ok(None);
        };
        let current =
            bucket.get(format!("n.{}", crate::cluster::token_of(&name))).await.map_err(|e| unavailable(&e))?;
        if current.as_deref() != Some(hex(digest).as_bytes()) {
            return Ok(None); // a replaced token
        }
        self.tokens().insert(name.clone(), *digest);
        Ok(Some(name))
    }

    /// Who the request's key says the caller is.
    pub(crate) async fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let Some(global) = self.global else { return Ok(Caller::Global) };
        let key = headers
            .get("apikey")
            .and_then(|v| v.to_str().ok())
            .or_else(|| headers.get("authorization").and_then(|v| v.to_str().ok()?.strip_prefix("Bearer ")))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(ApiError::unauthorized)?;
        let digest = blake3::hash(key.as_bytes());
        if digest == global {
            return Ok(Caller::Global);
        }
        self.holder(&digest).await?.map(Caller::Instance).ok_or_else(ApiError::unauthorized)
    }

    /// The caller, who must hold the global key.
    pub(crate) async fn global(&self, headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
        match self.caller(headers).await? {
            Caller::Global => Ok(()),
            Caller::Instance(_) => Err(ApiError::forbidden(what)),
        }
    }

    /// The caller, who must hold the global key or `name`'s token.
    pub(crate) async fn instance(&self, headers: &HeaderMap, name: &str) -> Result<Caller, ApiError> {
        match self.caller(headers).await? {
            Caller::Instance(own) if own.as_str() != name => Err(ApiError::forbidden(&format!("instance {name}"))),
            caller => Ok(caller),
        }
    }

    /// Takes in the token `name` was just created with (its digest is kept,
    /// never the token). On one host the digest was committed with the
    /// `Created` record ([`super::instances::Instances::create`]); in a
    /// cluster it is written to the bucket here, durable before this returns
    /// (a client holding a token the service forgot would be locked out of
    /// its own instance).
    pub(crate) async fn created(&self, name: &InstanceName, token: &str) -> Result<(), ApiError> {
        let digest = blake3::hash(token.as_bytes());
        match &self.store {
            Store::Log => {}
            Store::Kv(bucket) => {
                let failed = |e: &dyn std::fmt::Display| {
                    ApiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "cluster_unavailable",
                        format!("keeping the token: {e}"),
                    )
                };
                let own = format!("n.{}", crate::cluster::token_of(name));
                let old = bucket.get(&own).await.map_err(|e| failed(&e))?;
                // The digest's key first: alone it opens nothing (the instance's key must name it).
                bucket
                    .put(format!("d.{}", hex(&digest)), name.as_str().to_owned().into())
                    .await
                    .map_err(|e| failed(&e))?;
                bucket.put(&own, hex(&digest).into()).await.map_err(|e| failed(&e))?;
                if let Some(old) = old.filter(|o| o.as_ref() != hex(&digest).as_bytes()) {
                    let _ = bucket.purge(format!("d.{}", String::from_utf8_lossy(&old))).await;
                }
            }
        }
        self.tokens().insert(name.clone(), digest);
        Ok(())
    }

    /// Whether `token` is already some instance's (tokens must tell instances apart).
    pub(crate) async fn token_taken(&self, token: &str) -> Result<bool, ApiError> {
        let digest = blake3::hash(token.as_bytes());
        Ok(self.global == Some(digest) || self.holder(&digest).await?.is_some())
    }
}

/// Keeps a cluster host's mirror of the token bucket: every instance's
/// digest as its `n.` key says, until the service is dropped.
async fn mirror(auth: Weak<Auth>, mut watch: kv::Watch) {
    while let Some(entry) = watch.next().await {
        let Ok(entry) = entry else { continue };
        let Some(auth) = auth.upgrade() else { return };
        let Some(name) = entry.key.strip_prefix("n.").and_then(crate::cluster::name_of) else { continue };
        let digest = std::str::from_utf8(&entry.value).ok().and_then(|h| blake3::Hash::from_hex(h).ok());
        match (entry.operation, digest) {
            (kv::Operation::Put, Some(digest)) => {
                auth.tokens().insert(name, digest);
            }
            _ => {
                auth.tokens().remove(&name);
            }
        }
    }
}

/// A fresh random token: 128 bits from the operating system, as 32 hex digits.
pub(crate) fn new_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| ApiError::internal(format!("no randomness for a token: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02X}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Digest, Event, InstanceSpec};
    use crate::machine::{Instance, Timestamp};

    fn name(n: &str) -> InstanceName {
        InstanceName::new(n).expect("valid name")
    }

    /// Tokens come from the `Created` records; those an older version kept in
    /// the auxiliary space still open instances the log holds, and are
    /// dropped for instances it no longer holds (purged since).
    #[test]
    fn tokens_load_from_created_records_and_legacy_ones_of_gone_instances_are_dropped() {
        let log = Log::in_memory().expect("log");
        let spec = InstanceSpec { url: "ws://127.0.0.1:9/".into() };
        let token = Some(Digest::of(b"new-token"));
        log.append(&name("new"), 1, Timestamp(0), Event::Created { spec: spec.clone(), token }, &Instance::new())
            .expect("create");
        log.append(&name("old"), 1, Timestamp(0), Event::Created { spec, token: None }, &Instance::new())
            .expect("create");
        let legacy = |n: &str, t: &str| {
            let mut key = TOKENS.to_vec();
            key.extend_from_slice(n.as_bytes());
            (key, Some(blake3::hash(t.as_bytes()).as_bytes().to_vec()))
        };
        log.aux_apply(vec![legacy("old", "old-token"), legacy("gone", "gone-token"), legacy("new", "stale")])
            .expect("legacy tokens");
        let auth = Auth::load(Some("global"), &log).expect("load");
        assert_eq!(auth.known(&blake3::hash(b"new-token")), Some(name("new")));
        assert_eq!(auth.known(&blake3::hash(b"old-token")), Some(name("old")), "a legacy token still opens");
        assert_eq!(auth.known(&blake3::hash(b"stale")), None, "the record's token wins over a legacy one");
        assert_eq!(auth.known(&blake3::hash(b"gone-token")), None);
        let left: Vec<_> = log.aux_scan(TOKENS).expect("scan").into_iter().map(|(k, _)| k).collect();
        assert_eq!(left, vec![b"serve/token/old".to_vec()], "the gone and the superseded ones are deleted");
    }
}
