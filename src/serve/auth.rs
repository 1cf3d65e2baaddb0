//! API keys, as Evolution API takes them: the global key opens everything;
//! an instance's own token opens only that instance. Keys travel in the
//! `apikey` header (Evolution's) or as `Authorization: Bearer KEY`. Keys are
//! compared as BLAKE3 digests, in constant time. Without a global key (the
//! default, on 127.0.0.1 only) the API is open.
//!
//! Where the token digests live: in the log's auxiliary space on one host;
//! in a cluster, in a KV bucket of the cluster's NATS (`<namespace>-tokens`),
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

/// Where instance tokens live in the log's auxiliary space.
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
    Log(Log),
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
    /// Loads the instance tokens kept in the log.
    pub(crate) fn load(global: Option<&str>, log: Log) -> Result<Self, crate::log::LogError> {
        let mut tokens = HashMap::new();
        for (key, value) in log.aux_scan(TOKENS)? {
            let name = std::str::from_utf8(&key[TOKENS.len()..]).ok().and_then(|n| InstanceName::new(n).ok());
            if let (Some(name), Ok(digest)) = (name, <[u8; 32]>::try_from(value.as_slice())) {
                tokens.insert(name, blake3::Hash::from_bytes(digest));
            }
        }
        Ok(Self {
            global: global.map(|k| blake3::hash(k.as_bytes())),
            tokens: Mutex::new(tokens),
            store: Store::Log(log),
        })
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

    /// Sets `name`'s token (its digest is kept, never the token).
    ///
    /// Durable before it returns, as the creation it follows is (unless the
    /// log is `Buffered`; in a cluster, as the bucket's writes are): a client
    /// holding a token the service forgot after a crash would be locked out
    /// of its own instance.
    pub(crate) async fn set_token(&self, name: &InstanceName, token: &str) -> Result<(), ApiError> {
        let digest = blake3::hash(token.as_bytes());
        match &self.store {
            Store::Log(log) => {
                let mut key = TOKENS.to_vec();
                key.extend_from_slice(name.as_str().as_bytes());
                log.aux_apply(vec![(key, Some(digest.as_bytes().to_vec()))])?;
                if log.config().durability != crate::log::Durability::Buffered {
                    let log = log.clone();
                    tokio::task::spawn_blocking(move || log.sync_aux())
                        .await
                        .map_err(|e| ApiError::internal(format!("syncing the token: {e}")))??;
                }
            }
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
