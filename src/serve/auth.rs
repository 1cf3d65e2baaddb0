//! API keys, as Evolution API takes them: the global key opens everything;
//! an instance's own token opens only that instance. Keys travel in the
//! `apikey` header (Evolution's) or as `Authorization: Bearer KEY`. Keys are
//! compared as BLAKE3 digests, in constant time. Without a global key (the
//! default, on 127.0.0.1 only) the API is open.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use axum::http::HeaderMap;

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

pub(crate) struct Auth {
    global: Option<blake3::Hash>,
    /// Each instance's token digest.
    tokens: Mutex<HashMap<InstanceName, blake3::Hash>>,
    log: Log,
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
        Ok(Self { global: global.map(|k| blake3::hash(k.as_bytes())), tokens: Mutex::new(tokens), log })
    }

    fn tokens(&self) -> MutexGuard<'_, HashMap<InstanceName, blake3::Hash>> {
        self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the service asks for keys at all.
    pub(crate) fn enabled(&self) -> bool {
        self.global.is_some()
    }

    /// Who the request's key says the caller is.
    pub(crate) fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
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
        let tokens = self.tokens();
        // A linear scan compares every token in constant time each; fleets hold thousands, not millions.
        let owner = tokens.iter().find(|(_, t)| **t == digest).map(|(n, _)| n.clone());
        owner.map(Caller::Instance).ok_or_else(ApiError::unauthorized)
    }

    /// The caller, who must hold the global key.
    pub(crate) fn global(&self, headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
        match self.caller(headers)? {
            Caller::Global => Ok(()),
            Caller::Instance(_) => Err(ApiError::forbidden(what)),
        }
    }

    /// The caller, who must hold the global key or `name`'s token.
    pub(crate) fn instance(&self, headers: &HeaderMap, name: &str) -> Result<Caller, ApiError> {
        match self.caller(headers)? {
            Caller::Instance(own) if own.as_str() != name => Err(ApiError::forbidden(&format!("instance {name}"))),
            caller => Ok(caller),
        }
    }

    /// Sets `name`'s token (its digest is kept, never the token).
    ///
    /// Durable before it returns, as the creation it follows is (unless the
    /// log is `Buffered`): a client holding a token the service forgot after
    /// a crash would be locked out of its own instance.
    pub(crate) async fn set_token(&self, name: &InstanceName, token: &str) -> Result<(), ApiError> {
        let digest = blake3::hash(token.as_bytes());
        let mut key = TOKENS.to_vec();
        key.extend_from_slice(name.as_str().as_bytes());
        self.log.aux_apply(vec![(key, Some(digest.as_bytes().to_vec()))])?;
        if self.log.config().durability != crate::log::Durability::Buffered {
            let log = self.log.clone();
            tokio::task::spawn_blocking(move || log.sync_aux())
                .await
                .map_err(|e| ApiError::internal(format!("syncing the token: {e}")))??;
        }
        self.tokens().insert(name.clone(), digest);
        Ok(())
    }

    /// Whether `token` is already some instance's (tokens must tell instances apart).
    pub(crate) fn token_taken(&self, token: &str) -> bool {
        let digest = blake3::hash(token.as_bytes());
        self.global == Some(digest) || self.tokens().values().any(|t| *t == digest)
    }
}

/// A fresh random token: 128 bits from the operating system, as 32 hex digits.
pub(crate) fn new_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| ApiError::internal(format!("no randomness for a token: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02X}")).collect())
}
