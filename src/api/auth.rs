//! `Authorization: Bearer KEY`. Keys are stored as sha256 hashes; each key belongs to one
//! tenant, and every resource lookup is scoped to it. Each key has a token-bucket rate limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use rand::Rng;
use sha2::{Digest, Sha256};

use super::AppState;
use super::problem::ApiError;
use crate::store::{Store, StoreError};

/// Hex sha256 of a key: what the store keeps.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random key, `cp_` + 40 hex digits.
pub fn generate_key() -> String {
    let bytes: [u8; 20] = rand::thread_rng().r#gen();
    format!("cp_{}", hex::encode(bytes))
}

/// Creates a tenant named `name` with a new key; returns the key (shown once).
pub async fn create_key(store: &dyn Store, name: &str) -> Result<String, StoreError> {
    let key = generate_key();
    let tenant = store.create_tenant(name).await?;
    store
        .create_api_key(&tenant.id, name, &hash_key(&key))
        .await?;
    Ok(key)
}

/// At start: make the configured key valid, or when there is no key at all create one.
/// Returns a key to print once, if one was created.
pub async fn bootstrap_key(
    store: &dyn Store,
    configured: Option<&str>,
) -> Result<Option<String>, StoreError> {
    if let Some(key) = configured {
        if store.tenant_for_key(&hash_key(key)).await?.is_none() {
            let tenant = store.create_tenant("default").await?;
            store
                .create_api_key(&tenant.id, "configured", &hash_key(key))
                .await?;
        }
        return Ok(None);
    }
    if store.count_api_keys().await? == 0 {
        return Ok(Some(create_key(store, "default").await?));
    }
    Ok(None)
}

/// The caller's tenant, from its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing_api_key",
                    "send Authorization: Bearer KEY",
                )
            })?;
        let key = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing_api_key",
                    "the Authorization header must be `Bearer KEY`",
                )
            })?;
        let hash = hash_key(key);
        let cached = state
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
            .cloned();
        let tenant = match cached {
            Some(tenant) => tenant,
            None => {
                let tenant = state.store.tenant_for_key(&hash).await?.ok_or_else(|| {
                    ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "invalid_api_key",
                        "this API key is not known",
                    )
                })?;
                state
                    .keys
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(hash.clone(), tenant.clone());
                tenant
            }
        };
        if let Err(wait) = state.rate.check(&hash) {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "more than {} requests per second with this key; retry in {wait:.2} s",
                    state.limits.rate_per_second
                ),
            );
            e.retry_after = Some(wait.ceil().max(1.0) as u64);
            return Err(e);
        }
        Ok(Tenant(tenant))
    }
}

/// Token buckets per key hash: `burst` requests at once, refilled at `per_second`.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: f64) -> Self {
        RateLimiter {
            per_second,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(seconds to wait)` when the key has no token left.
    pub fn check(&self, key: &str) -> Result<(), f64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - *tokens) / self.per_second)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hash_stably_and_differ() {
        let (a, b) = (generate_key(), generate_key());
        assert!(a.starts_with("cp_") && a.len() == 43 && a != b);
        assert_eq!(hash_key(&a), hash_key(&a));
        assert_eq!(hash_key("abc").len(), 64);
    }

    #[test]
    fn bucket_allows_the_burst_then_says_how_long_to_wait() {
        let limiter = RateLimiter::new(10.0, 3.0);
        for _ in 0..3 {
            limiter.check("k").unwrap();
        }
        let wait = limiter.check("k").unwrap_err();
        assert!(wait > 0.0 && wait <= 0.1, "{wait}");
        limiter.check("other").unwrap();
    }
}
