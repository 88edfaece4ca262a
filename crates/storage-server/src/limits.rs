//! Per-account limits on the data API, so one account (a runaway agent, a
//! script in a loop, a stolen ticket) cannot take the server's threads,
//! disk and connections from every other account.
//!
//! Two limits, kept together in one map keyed by the verified account:
//! calls in flight (a call holds its place until its response body has
//! been sent, so a long download counts for as long as it streams) and
//! requests per second (a token bucket, written as GCRA: one instant per
//! account, refilled at the rate, holding at most one second's worth).
//! The key comes from a function the server supplies; for the storage
//! server it verifies the ticket, so a forged ticket naming another
//! account spends nothing of that account's budget, and a call with no
//! valid key passes through to a handler that refuses it anyway.
//!
//! Accounts idle long enough to be back at a full bucket with nothing in
//! flight are forgotten on a periodic sweep, so the map holds only
//! accounts active in the last few seconds.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

/// How often idle accounts are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// What one account may do at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Calls in flight (`--max-streams-per-account`).
    pub streams: NonZeroU32,
    /// Requests per second, and the burst allowed after a quiet second
    /// (`--max-requests-per-account`).
    pub rate: NonZeroU32,
}

/// Generous: a backup holds 2 upload streams and at most 8 chunk
/// queries at once, a restore 4 downloads, so one agent never meets it.
pub const DEFAULT_STREAMS: u32 = 32;
/// A restore asks for each file's chunks in one call, so a tree of small
/// files is the busiest an agent gets; it retries if it is slowed.
pub const DEFAULT_RATE: u32 = 1000;

/// Which limit refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Streams,
    Rate,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Streams => "streams",
            Limit::Rate => "rate",
        }
    }
}

/// A call refused for its account being over a limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub limit: Limit,
    /// The account, as the message names it.
    pub key: String,
    pub value: u32,
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        Status::resource_exhausted(match r.limit {
            Limit::Streams => format!(
                "account {} has {} calls in flight, the limit per account (--max-streams-per-account); \
                 retry when one finishes",
                r.key, r.value
            ),
            Limit::Rate => format!(
                "account {} made {} requests in the last second, the limit per account \
                 (--max-requests-per-account); retry in a moment",
                r.key, r.value
            ),
        })
    }
}

struct Entry {
    in_flight: u32,
    /// GCRA's theoretical arrival time: when the bucket would be full
    /// again. At or before now, the bucket is full.
    full_at: Instant,
}

struct State<K> {
    entries: HashMap<K, Entry>,
    next_sweep: Instant,
}

/// The keyed state behind both limits.
pub struct Limiter<K> {
    limits: Limits,
    /// Time one request costs: a second divided by the rate.
    interval: Duration,
    /// How far ahead of now `full_at` may run: one second's worth of
    /// requests, less the one being let in.
    tolerance: Duration,
    state: Mutex<State<K>>,
    refused_streams: AtomicU64,
    refused_rate: AtomicU64,
}

impl<K: Hash + Eq + Clone + Display> Limiter<K> {
    pub fn new(limits: Limits, now: Instant) -> Arc<Self> {
        let interval = Duration::from_secs(1) / limits.rate.get();
        Arc::new(Self {
            limits,
            interval,
            tolerance: interval * (limits.rate.get() - 1),
            state: Mutex::new(State {
                entries: HashMap::new(),
                next_sweep: now + SWEEP_INTERVAL,
            }),
            refused_streams: AtomicU64::new(0),
            refused_rate: AtomicU64::new(0),
        })
    }

    /// Calls refused by `limit` since start.
    pub fn refused(&self, limit: Limit) -> u64 {
        match limit {
            Limit::Streams => self.refused_streams.load(Ordering::Relaxed),
            Limit::Rate => self.refused_rate.load(Ordering::Relaxed),
        }
    }

    /// Accounts currently remembered.
    pub fn tracked(&self) -> usize {
        self.lock().entries.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        // Nothing panics while the lock is held, so a poisoned state is
        // still a consistent one.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets one call of `key` in at `now`, or says which limit it is over.
    /// A refused call spends nothing, so a client retrying against the
    /// limit does not push its own recovery further away.
    pub fn acquire(self: &Arc<Self>, key: K, now: Instant) -> Result<Permit<K>, Refusal> {
        let mut state = self.lock();
        if now >= state.next_sweep {
            state.entries.retain(|_, e| e.in_flight > 0 || e.full_at > now);
            state.next_sweep = now + SWEEP_INTERVAL;
        }
        let entry = state.entries.entry(key.clone()).or_insert(Entry {
            in_flight: 0,
            full_at: now,
        });
        if entry.in_flight >= self.limits.streams.get() {
            self.refused_streams.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal {
                limit: Limit::Streams,
                key: key.to_string(),
                value: self.limits.streams.get(),
            });
        }
        let start = entry.full_at.max(now);
        if start.duration_since(now) > self.tolerance {
            self.refused_rate.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal {
                limit: Limit::Rate,
                key: key.to_string(),
                value: self.limits.rate.get(),
            });
        }
        entry.full_at = start + self.interval;
        entry.in_flight += 1;
        drop(state);
        Ok(Permit {
            limiter: self.clone(),
            key: Some(key),
        })
    }

    fn release(&self, key: &K) {
        if let Some(entry) = self.lock().entries.get_mut(key) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
    }
}

/// A place among an account's calls in flight, given back on drop.
pub struct Permit<K: Hash + Eq + Clone + Display> {
    limiter: Arc<Limiter<K>>,
    key: Option<K>,
}

impl<K: Hash + Eq + Clone + Display> Drop for Permit<K> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.limiter.release(&key);
        }
    }
}

/// A response body that holds its call's permit until it has been sent
/// whole (or dropped, when the client goes away).
struct Held<K: Hash + Eq + Clone + Display> {
    inner: Body,
    permit: Option<Permit<K>>,
}

impl<K: Hash + Eq + Clone + Display + Unpin> http_body::Body for Held<K> {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Finds the key a request acts for; None lets it through unlimited (it
/// has no valid credential, and its handler will say so).
pub type KeyFn<K> = Arc<dyn Fn(&http::HeaderMap) -> BoxFuture<Option<K>> + Send + Sync>;

/// The tower layer applying a [`Limiter`] to one service.
pub struct PerKey<K> {
    limiter: Arc<Limiter<K>>,
    key: KeyFn<K>,
}

impl<K> Clone for PerKey<K> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            key: self.key.clone(),
        }
    }
}

impl<K> PerKey<K> {
    pub fn new(limiter: Arc<Limiter<K>>, key: KeyFn<K>) -> Self {
        Self { limiter, key }
    }
}

impl<S, K> tower::Layer<S> for PerKey<K> {
    type Service = Limited<S, K>;

    fn layer(&self, inner: S) -> Limited<S, K> {
        Limited {
            inner,
            layer: self.clone(),
        }
    }
}

pub struct Limited<S, K> {
    inner: S,
    layer: PerKey<K>,
}

impl<S: Clone, K> Clone for Limited<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

/// Routes are found by the wrapped service's name.
impl<S: NamedService, K> NamedService for Limited<S, K> {
    const NAME: &'static str = S::NAME;
}

impl<S, K, B> tower::Service<http::Request<B>> for Limited<S, K>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    K: Hash + Eq + Clone + Display + Send + Sync + Unpin + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call; the fresh one
        // stays behind for the next (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let key = (self.layer.key)(request.headers());
        let limiter = self.layer.limiter.clone();
        Box::pin(async move {
            let Some(key) = key.await else {
                return inner.call(request).await;
            };
            let permit = match limiter.acquire(key, Instant::now()) {
                Ok(permit) => permit,
                Err(refusal) => {
                    tracing::debug!(
                        account = %refusal.key,
                        limit = refusal.limit.as_str(),
                        "call refused: account over its limit"
                    );
                    return Ok(Status::from(refusal).into_http());
                }
            };
            let response = inner.call(request).await?;
            Ok(response.map(|inner| {
                Body::new(Held {
                    inner,
                    permit: Some(permit),
                })
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(streams: u32, rate: u32) -> Limits {
        Limits {
            streams: NonZeroU32::new(streams).expect("nonzero"),
            rate: NonZeroU32::new(rate).expect("nonzero"),
        }
    }

    #[test]
    fn streams_are_counted_per_account_and_given_back_on_drop() {
        let t = Instant::now();
        let l = Limiter::new(limits(2, 1000), t);
        let a1 = l.acquire(7u64, t).expect("first");
        let _a2 = l.acquire(7, t).expect("second");
        let refused = l.acquire(7, t).err().expect("over the limit");
        assert_eq!(refused.limit, Limit::Streams);
        let status = Status::from(refused);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().starts_with("account 7 has 2 calls in flight")
                && status.message().contains("--max-streams-per-account"),
            "{}",
            status.message()
        );
        // Another account is not affected.
        let _b = l.acquire(8, t).expect("another account");
        drop(a1);
        let _a3 = l.acquire(7, t).expect("a place was given back");
        assert_eq!(l.refused(Limit::Streams), 1);
        assert_eq!(l.refused(Limit::Rate), 0);
    }

    #[test]
    fn rate_allows_a_burst_of_one_second_then_refills_at_the_rate() {
        let t = Instant::now();
        let l = Limiter::new(limits(1000, 10), t);
        for i in 0..10 {
            drop(l.acquire(1u64, t).unwrap_or_else(|_| panic!("burst request {i}")));
        }
        let refused = l.acquire(1, t).err().expect("burst spent");
        assert_eq!(refused.limit, Limit::Rate);
        assert!(
            Status::from(refused)
                .message()
                .contains("10 requests in the last second"),
        );
        // Refused calls spend nothing: one interval later, one more.
        drop(l.acquire(2, t).expect("another account has its own bucket"));
        let later = t + Duration::from_millis(100);
        drop(l.acquire(1, later).expect("refilled by one"));
        assert!(l.acquire(1, later).is_err());
        // A quiet second refills the whole burst, no more.
        let quiet = later + Duration::from_secs(5);
        for _ in 0..10 {
            drop(l.acquire(1, quiet).expect("full burst again"));
        }
        assert!(l.acquire(1, quiet).is_err());
        assert_eq!(l.refused(Limit::Rate), 3);
    }

    #[test]
    fn a_rate_of_one_allows_one_per_second() {
        let t = Instant::now();
        let l = Limiter::new(limits(10, 1), t);
        drop(l.acquire(1u64, t).expect("first"));
        assert!(l.acquire(1, t + Duration::from_millis(999)).is_err());
        drop(l.acquire(1, t + Duration::from_secs(1)).expect("a second later"));
    }

    #[test]
    fn idle_accounts_are_forgotten_busy_ones_kept() {
        let t = Instant::now();
        let l = Limiter::new(limits(10, 100), t);
        let held = l.acquire(1u64, t).expect("held");
        for k in 2..1000u64 {
            drop(l.acquire(k, t).expect("one call each"));
        }
        assert_eq!(l.tracked(), 999);
        let later = t + SWEEP_INTERVAL;
        drop(l.acquire(5000, later).expect("triggers a sweep"));
        // Kept: the one with a call in flight, and the one just seen.
        assert_eq!(l.tracked(), 2);
        drop(held);
        let _ = l.acquire(1, later).expect("still counted right");
    }

    /// A response body that yields `frames` frames, one per poll, so a
    /// test can stop part way through.
    struct Frames(usize);

    impl http_body::Body for Frames {
        type Data = bytes::Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(b"x")))))
        }
    }

    #[derive(Clone)]
    struct Streaming;

    impl tower::Service<http::Request<()>> for Streaming {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            std::future::ready(Ok(http::Response::new(Body::new(Frames(3)))))
        }
    }

    fn request(account: Option<&str>) -> http::Request<()> {
        let mut r = http::Request::new(());
        if let Some(a) = account {
            r.headers_mut()
                .insert("account", http::HeaderValue::from_str(a).expect("header"));
        }
        r
    }

    fn status_of(response: &http::Response<Body>) -> Option<tonic::Code> {
        Status::from_header_map(response.headers()).map(|s| s.code())
    }

    #[tokio::test(start_paused = true)]
    async fn a_streaming_response_holds_its_place_until_its_body_ends() {
        use http_body_util::BodyExt;
        use tower::{Layer, Service};
        let limiter = Limiter::new(limits(1, 1000), Instant::now());
        // The test's "ticket": a plain header; none passes unlimited.
        let key: KeyFn<String> = Arc::new(|h: &http::HeaderMap| {
            let account = h.get("account").and_then(|v| v.to_str().ok()).map(str::to_owned);
            Box::pin(async move { account })
        });
        let mut svc = PerKey::new(limiter.clone(), key).layer(Streaming);
        std::future::poll_fn(|cx| svc.poll_ready(cx))
            .await
            .expect("ready");
        let first = svc.call(request(Some("7"))).await.expect("infallible");
        assert_eq!(status_of(&first), None);
        let mut body = first.into_body();
        body.frame().await.expect("a frame").expect("data");
        // Headers sent, body still streaming: the place is still held.
        let second = svc.call(request(Some("7"))).await.expect("infallible");
        assert_eq!(status_of(&second), Some(tonic::Code::ResourceExhausted));
        let other = svc.call(request(Some("8"))).await.expect("infallible");
        assert_eq!(status_of(&other), None);
        let anonymous = svc.call(request(None)).await.expect("infallible");
        assert_eq!(status_of(&anonymous), None);
        while body.frame().await.is_some() {}
        let third = svc.call(request(Some("7"))).await.expect("infallible");
        assert_eq!(status_of(&third), None);
        // A client that goes away mid-stream gives its place back too.
        drop(third);
        let fourth = svc.call(request(Some("7"))).await.expect("infallible");
        assert_eq!(status_of(&fourth), None);
        assert_eq!(limiter.refused(Limit::Streams), 1);
    }
}
