//! The asset cache (contract, "Assets, compression, cookies"): `200` answers to `GET`s
//! of the `static` class that a shared cache may keep are held in memory, per tenant
//! and per response encoding, for their `max-age`, and served from there with `Age`
//! and `X-Cache: hit` — no worker, no upstream connection. Concurrent misses of one
//! URL are collapsed: one request fills, the others wait for it.
//!
//! Entries live in a map keyed by a 64-bit hash of (tenant, URL, encoding), checked
//! against the full key; their weights (bytes) go to pingora's sharded weighted LRU
//! (`pingora-lru`, the one pingora-cache evicts with), which evicts the least recently
//! used beyond `cache_assets`. pingora-cache itself is not used: its state machine
//! would replace portier's own response path (read-ahead, spooling, retries) and its
//! in-memory storage is documented as for tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use http::{header, Method};
use pingora::http::ResponseHeader;
use pingora::protocols::http::compression::Algorithm;
use pingora::proxy::Session;
use pingora_lru::Lru;
use portier_config::Class;
use tokio::sync::watch;

use portier_runtime::hash;

/// Shards of the LRU: one. Sharded, pingora-lru evicts from a random shard (power of
/// two choices), a good approximation with many thousands of entries but not with the
/// tens to hundreds of asset bundles a host has; the contract evicts the least recently
/// used. Hits take the lock only to read (see `HOT`).
const SHARDS: usize = 1;
/// A hit on an entry already among the most recently used this many needs no write
/// lock (`promote_top_n`); it is not moved up, so the order within them is approximate.
const HOT: usize = 4;

/// One cached response.
pub struct Entry {
    key: Box<str>,
    /// The config tenant it belongs to (entries of a removed tenant go at reload).
    owner: Arc<str>,
    header: ResponseHeader,
    body: Bytes,
    stored: Instant,
    /// `Age` the worker's answer already had.
    age0: Duration,
    ttl: Duration,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("key", &self.key).finish()
    }
}

impl Entry {
    fn age(&self) -> Duration {
        self.age0 + self.stored.elapsed()
    }

    fn fresh(&self) -> bool {
        self.age() < self.ttl
    }

    /// Bytes it costs (body and an estimate of the header).
    fn weight(&self) -> usize {
        self.body.len() + self.key.len() + 64 * self.header.headers.len() + 256
    }
}

/// What a cacheable request found.
pub enum Lookup {
    Hit(Arc<Entry>),
    /// A miss; this request fills the entry.
    Fill(Fill),
    /// Another request is filling the entry: wait for it.
    Wait(watch::Receiver<()>),
}

/// The right (and duty) to fill one entry: waiters are woken when it is dropped.
pub struct Fill {
    cache: Arc<AssetCache>,
    hash: u64,
    _done: watch::Sender<()>,
}

impl Drop for Fill {
    fn drop(&mut self) {
        self.cache.fills.remove(&self.hash);
    }
}

/// The key of a cacheable request, borrowed from it: a lookup allocates nothing.
pub struct KeyRef<'a> {
    hash: u64,
    name: &'a str,
    enc: &'static str,
    uri: &'a str,
    owner: &'a Arc<str>,
}

impl<'a> KeyRef<'a> {
    /// The key of `uri` (path and query) of tenant `name` (effective name; `owner` its
    /// config tenant), for responses in `encoding` (none: identity).
    pub fn new(
        owner: &'a Arc<str>,
        name: &'a str,
        uri: &'a str,
        encoding: Option<Algorithm>,
    ) -> KeyRef<'a> {
        let enc = encoding.map(|a| a.as_str()).unwrap_or("identity");
        let hash = hash::hash_parts(&[
            name.as_bytes(),
            b"\0",
            enc.as_bytes(),
            b"\0",
            uri.as_bytes(),
        ]);
        KeyRef {
            hash,
            name,
            enc,
            uri,
            owner,
        }
    }

    /// True when `stored` (a [`Key`]'s text) is this key.
    fn matches(&self, stored: &str) -> bool {
        let Some(rest) = stored.strip_prefix(self.name) else {
            return false;
        };
        let Some(rest) = rest
            .strip_prefix('\0')
            .and_then(|r| r.strip_prefix(self.enc))
        else {
            return false;
        };
        rest.strip_prefix('\0') == Some(self.uri)
    }

    pub fn to_owned(&self) -> Key {
        Key {
            hash: self.hash,
            text: format!("{}\0{}\0{}", self.name, self.enc, self.uri).into_boxed_str(),
            owner: self.owner.clone(),
        }
    }
}

/// The key of an entry being filled.
#[derive(Clone)]
pub struct Key {
    hash: u64,
    text: Box<str>,
    owner: Arc<str>,
}

/// The process's asset cache.
pub struct AssetCache {
    entries: DashMap<u64, Arc<Entry>>,
    lru: Lru<u64, SHARDS>,
    fills: DashMap<u64, watch::Receiver<()>>,
    capacity: AtomicUsize,
}

impl AssetCache {
    pub fn new(capacity: u64) -> Arc<AssetCache> {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        Arc::new(AssetCache {
            entries: DashMap::new(),
            lru: Lru::with_capacity(capacity, 1024),
            fills: DashMap::new(),
            capacity: AtomicUsize::new(capacity),
        })
    }

    pub fn enabled(&self) -> bool {
        self.capacity.load(Ordering::Relaxed) > 0
    }

    fn get(&self, key: &KeyRef<'_>) -> Option<Arc<Entry>> {
        let e = self.entries.get(&key.hash)?.clone();
        if !key.matches(&e.key) {
            return None;
        }
        if !e.fresh() {
            self.entries.remove(&key.hash);
            self.lru.remove(key.hash);
            return None;
        }
        self.lru.promote_top_n(key.hash, HOT);
        Some(e)
    }

    /// A hit, or the duty to fill, or someone else's fill to wait for.
    pub fn lookup(self: &Arc<Self>, key: &KeyRef<'_>) -> Lookup {
        if let Some(e) = self.get(key) {
            return Lookup::Hit(e);
        }
        match self.fills.entry(key.hash) {
            dashmap::Entry::Occupied(o) => Lookup::Wait(o.get().clone()),
            dashmap::Entry::Vacant(v) => {
                let (tx, rx) = watch::channel(());
                v.insert(rx);
                Lookup::Fill(Fill {
                    cache: self.clone(),
                    hash: key.hash,
                    _done: tx,
                })
            }
        }
    }

    fn insert(&self, entry: Entry, hash: u64) {
        let weight = entry.weight();
        // One entry may take at most an eighth of the cache.
        if weight > self.capacity.load(Ordering::Relaxed) / 8 {
            return;
        }
        self.entries.insert(hash, Arc::new(entry));
        self.lru.admit(hash, hash, weight);
        for (gone, _) in self.lru.evict_to_limit() {
            self.entries.remove(&gone);
        }
    }

    /// After a reload: the new total size, and the entries of tenants no longer
    /// configured (or with caching turned off) dropped. Entries of the others stay.
    pub fn reconfigure(&self, config: &portier_config::Config) {
        let capacity = usize::try_from(config.defaults.cache_assets).unwrap_or(usize::MAX);
        self.capacity.store(capacity, Ordering::Relaxed);
        self.lru.set_weight_limit(capacity);
        let keep = |owner: &str| {
            config
                .tenants
                .iter()
                .any(|t| &*t.name == owner && t.settings.cache_assets > 0)
        };
        let gone: Vec<u64> = self
            .entries
            .iter()
            .filter(|e| capacity == 0 || !keep(&e.owner))
            .map(|e| *e.key())
            .collect();
        for h in gone {
            self.entries.remove(&h);
            self.lru.remove(h);
        }
        for (h, _) in self.lru.evict_to_limit() {
            self.entries.remove(&h);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// A request's part in the cache: none, a miss (filling or not), or a hit.
#[derive(Default)]
pub enum CacheState {
    #[default]
    None,
    Miss {
        key: Key,
        fill: Option<Fill>,
    },
    Hit,
}

impl CacheState {
    /// The access log's `cache` field.
    pub fn log(&self) -> Option<&'static str> {
        match self {
            CacheState::None => None,
            CacheState::Miss { .. } => Some("miss"),
            CacheState::Hit => Some("hit"),
        }
    }
}

/// A request the cache may answer: a body-less `GET` of the `static` class.
pub fn cacheable_request(session: &Session, class: Class) -> bool {
    let req = session.req_header();
    class == Class::Static
        && req.method == Method::GET
        && !req.headers.contains_key(header::TRANSFER_ENCODING)
        && crate::io::forward::content_length(req).unwrap_or(0) == 0
        && !req.headers.contains_key(header::RANGE)
}

/// The lifetime a shared cache may keep this worker response for, or `None` when it
/// may not: a `200` whose `Cache-Control` has `s-maxage`/`max-age` > 0 (not `private`,
/// `no-store`, `no-cache`), without `Set-Cookie`, varying by nothing but
/// `Accept-Encoding`.
pub fn lifetime(resp: &ResponseHeader) -> Option<Duration> {
    if resp.status.as_u16() != 200 || resp.headers.contains_key(header::SET_COOKIE) {
        return None;
    }
    let vary_ok = resp
        .headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .all(|t| t.is_empty() || t.eq_ignore_ascii_case("accept-encoding"));
    if !vary_ok {
        return None;
    }
    let mut max_age = None;
    let mut s_maxage = None;
    for v in resp.headers.get_all(header::CACHE_CONTROL) {
        let Ok(v) = v.to_str() else { return None };
        for d in v.split(',') {
            let d = d.trim().to_ascii_lowercase();
            let (name, value) = d.split_once('=').unwrap_or((&d, ""));
            let secs = || value.trim().trim_matches('"').parse::<u64>().ok();
            match name.trim() {
                "private" | "no-store" | "no-cache" => return None,
                "max-age" => max_age = secs(),
                "s-maxage" => s_maxage = secs(),
                _ => {}
            }
        }
    }
    s_maxage
        .or(max_age)
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

fn age_of(resp: &ResponseHeader) -> Duration {
    resp.headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or_default()
}

/// A response being captured for the cache.
pub struct Capture {
    key: Key,
    fill: Fill,
    header: ResponseHeader,
    age0: Duration,
    ttl: Duration,
    body: BytesMut,
    limit: usize,
}

impl Capture {
    /// Starts capturing a response whose headers (as sent to the client) are `header`
    /// and whose worker answer allowed `ttl`.
    pub fn start(
        cache: &AssetCache,
        key: Key,
        fill: Fill,
        header: &ResponseHeader,
        ttl: Duration,
    ) -> Capture {
        let limit = cache.capacity.load(Ordering::Relaxed) / 8;
        let age0 = age_of(header);
        let mut header = header.clone();
        header.remove_header("x-request-id");
        header.remove_header(&header::STRICT_TRANSPORT_SECURITY);
        Capture {
            key,
            fill,
            header,
            age0,
            ttl,
            body: BytesMut::new(),
            limit,
        }
    }

    /// One chunk as sent to the client; `false` when the response is too big to keep.
    pub fn push(&mut self, chunk: &[u8]) -> bool {
        if self.body.len() + chunk.len() > self.limit {
            return false;
        }
        self.body.extend_from_slice(chunk);
        true
    }

    /// The whole response arrived: store it (and wake the waiters).
    pub fn finish(self, cache: &AssetCache) {
        let Capture {
            key,
            fill,
            mut header,
            age0,
            ttl,
            body,
            ..
        } = self;
        let body = body.freeze();
        header.remove_header(&header::TRANSFER_ENCODING);
        if header
            .insert_header(header::CONTENT_LENGTH, body.len().to_string())
            .is_err()
        {
            return;
        }
        cache.insert(
            Entry {
                key: key.text,
                owner: key.owner,
                header,
                body,
                stored: Instant::now(),
                age0,
                ttl,
            },
            key.hash,
        );
        drop(fill);
    }
}

/// Writes a cached response (`Age`, `X-Cache: hit`) to the client.
pub async fn serve(
    session: &mut Session,
    entry: &Entry,
    request_id: &http::HeaderValue,
    hsts: Option<&str>,
) -> pingora::Result<()> {
    let mut h = entry.header.clone();
    h.insert_header(header::AGE, entry.age().as_secs().to_string())?;
    h.insert_header("x-cache", "hit")?;
    h.insert_header("x-request-id", request_id.clone())?;
    if let Some(hsts) = hsts {
        h.insert_header(header::STRICT_TRANSPORT_SECURITY, hsts)?;
    }
    session.write_response_header(Box::new(h), false).await?;
    session
        .write_response_body(Some(entry.body.clone()), true)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(cc: &str) -> ResponseHeader {
        let mut r = ResponseHeader::build(200, None).unwrap();
        r.insert_header("cache-control", cc).unwrap();
        r
    }

    #[test]
    fn what_a_shared_cache_may_keep() {
        let year = Some(Duration::from_secs(31_536_000));
        assert_eq!(
            lifetime(&worker("public, max-age=31536000, immutable")),
            year
        );
        assert_eq!(
            lifetime(&worker("max-age=60, s-maxage=120")),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            lifetime(&worker("public")),
            None,
            "no lifetime to keep it for"
        );
        assert_eq!(lifetime(&worker("max-age=0")), None);
        assert_eq!(lifetime(&worker("private, max-age=600")), None);
        assert_eq!(lifetime(&worker("no-cache, max-age=600")), None);
        assert_eq!(lifetime(&worker("no-store")), None);
        let mut r = worker("max-age=600");
        r.insert_header("set-cookie", "a=b").unwrap();
        assert_eq!(lifetime(&r), None);
        let mut r = worker("max-age=600");
        r.insert_header("vary", "Accept-Encoding").unwrap();
        assert!(lifetime(&r).is_some());
        r.insert_header("vary", "Accept-Encoding, Cookie").unwrap();
        assert_eq!(lifetime(&r), None);
        let mut r = worker("max-age=600");
        r.set_status(404).unwrap();
        assert_eq!(lifetime(&r), None);
    }

    fn fill_entry(cache: &Arc<AssetCache>, key: &KeyRef<'_>, size: usize, ttl: Duration) {
        let Lookup::Fill(fill) = cache.lookup(key) else {
            panic!("expected a fill");
        };
        let w = worker("max-age=60");
        let mut c = Capture::start(cache, key.to_owned(), fill, &w, ttl);
        assert!(c.push(&vec![b'x'; size]));
        c.finish(cache);
    }

    #[test]
    fn hits_misses_collapsing_expiry_and_eviction() {
        let cache = AssetCache::new(1 << 20);
        let owner: Arc<str> = Arc::from("acme");
        let beta: Arc<str> = Arc::from("beta");
        let k = |uri| KeyRef::new(&owner, "acme", uri, None);
        let a = k("/web/assets/1/a.js");
        // The first miss fills; a second one waits; the fill wakes it.
        let Lookup::Fill(fill) = cache.lookup(&a) else {
            panic!()
        };
        let Lookup::Wait(mut rx) = cache.lookup(&a) else {
            panic!()
        };
        let w = worker("max-age=60");
        let mut c = Capture::start(&cache, a.to_owned(), fill, &w, Duration::from_secs(60));
        assert!(c.push(b"hello"));
        c.finish(&cache);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(
            rt.block_on(rx.changed()).is_err(),
            "the filler is gone: waiters wake"
        );
        let Lookup::Hit(e) = cache.lookup(&a) else {
            panic!()
        };
        assert_eq!(&e.body[..], b"hello");
        assert_eq!(e.header.headers.get("content-length").unwrap(), "5");
        // Another tenant, another encoding, another URL of the same length: other entries.
        let other = KeyRef::new(&beta, "beta", "/web/assets/1/a.js", None);
        assert!(matches!(cache.lookup(&other), Lookup::Fill(_)));
        let gz = KeyRef::new(&owner, "acme", "/web/assets/1/a.js", Some(Algorithm::Gzip));
        assert!(matches!(cache.lookup(&gz), Lookup::Fill(_)));
        assert!(!a.matches("acme\0identity\0/web/assets/1/b.js"));
        assert!(a.matches("acme\0identity\0/web/assets/1/a.js"));
        // Expiry.
        let b = k("/web/static/b.css");
        fill_entry(&cache, &b, 10, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(cache.lookup(&b), Lookup::Fill(_)), "expired");
        // Eviction: 1 MiB in all, 100 KiB entries: the least recently used go.
        let uris: Vec<String> = (0..20).map(|i| format!("/web/assets/{i}")).collect();
        for uri in &uris {
            fill_entry(&cache, &k(uri), 100 << 10, Duration::from_secs(60));
            // Keep the first one recently used.
            assert!(matches!(cache.lookup(&a), Lookup::Hit(_)));
        }
        assert!(cache.len() < 12, "{}", cache.len());
        assert!(
            matches!(cache.lookup(&a), Lookup::Hit(_)),
            "recently used stays"
        );
        assert!(
            matches!(cache.lookup(&k(&uris[0])), Lookup::Fill(_)),
            "oldest went"
        );
        // Too big for the cache (over an eighth): not kept.
        let big = k("/web/assets/big");
        let Lookup::Fill(fill) = cache.lookup(&big) else {
            panic!()
        };
        let mut c = Capture::start(&cache, big.to_owned(), fill, &w, Duration::from_secs(60));
        assert!(!c.push(&vec![0; 200 << 10]));
    }
}
