//! Which coordinator leads, when several share their state in etcd
//! (docs/COORDINATOR_HA.md). Each keeps an etcd lease alive and registers
//! itself under it; the leader is whoever created the leader key under its
//! lease. Only the leader runs an engine (detector, operations, server
//! leases); the others redirect to it.
//!
//! The rule that keeps two from acting at once: a leader steps down when
//! its last acknowledged keep-alive was sent more than `ttl - margin` ago,
//! which is before etcd can have expired its lease; a follower can only
//! create the key once etcd has deleted it. So the old leader has stopped
//! granting before the new one can start, whatever the network does.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use duplex_etcd::{Etcd, absent, put};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::etcd::{ALIVE, LEADER_KEY, MEMBERS};

/// One coordinator, as the others and `duplexctl status` see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub site: String,
    pub addr: String,
}

impl Member {
    fn to_json(&self) -> Vec<u8> {
        json!({"name": self.name, "site": self.site, "addr": self.addr})
            .to_string()
            .into_bytes()
    }

    pub fn from_json(bytes: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        Some(Self {
            name: v["name"].as_str()?.to_owned(),
            site: v["site"].as_str().unwrap_or_default().to_owned(),
            addr: v["addr"].as_str()?.to_owned(),
        })
    }
}

/// Where this coordinator stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// It leads; its state writes are fenced on this revision.
    Leader { fence: i64 },
    /// Another leads (or nobody, during an election).
    Follower { leader: Option<Member> },
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// The etcd lease: how long a dead leader keeps the role.
    pub ttl: Duration,
    /// A leader stops this long before its lease could have expired.
    pub margin: Duration,
    /// How often the lease is renewed and the leader key checked.
    pub tick: Duration,
}

impl Settings {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            margin: ttl / 4,
            tick: ttl / 8,
        }
    }
}

/// Campaigns until `stop`, publishing where this coordinator stands.
/// `fence` is set while it leads (the store fences its writes on it).
pub fn spawn(
    etcd: Etcd,
    me: Member,
    settings: Settings,
    fence: Arc<AtomicI64>,
    stop: CancellationToken,
) -> watch::Receiver<Standing> {
    let (tx, rx) = watch::channel(Standing::Follower { leader: None });
    let campaign = Arc::new(Campaign {
        etcd,
        me,
        settings,
        fence,
        tx,
        renewed: std::sync::Mutex::new(Instant::now()),
    });
    tokio::spawn(campaign.clone().watchdog(stop.clone()));
    tokio::spawn(campaign.run(stop));
    rx
}

struct Campaign {
    etcd: Etcd,
    me: Member,
    settings: Settings,
    fence: Arc<AtomicI64>,
    tx: watch::Sender<Standing>,
    /// When the last acknowledged renewal of the held lease was sent (etcd
    /// counts its TTL from a moment no earlier than that).
    renewed: std::sync::Mutex<Instant>,
}

/// A lease this coordinator holds.
struct Held {
    id: i64,
    keep_alive: Option<duplex_etcd::KeepAlive>,
}

/// How often the watchdog checks the lease: a small part of the margin.
const WATCHDOG: Duration = Duration::from_millis(20);

impl Campaign {
    fn renewed(&self) -> Instant {
        self.renewed.lock().map_or_else(|_| Instant::now(), |r| *r)
    }

    fn set_renewed(&self, at: Instant) {
        if let Ok(mut r) = self.renewed.lock() {
            *r = at;
        }
    }

    /// Steps down the moment the lease may be about to lapse, however long
    /// an etcd call in the campaign loop hangs.
    async fn watchdog(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(WATCHDOG);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.leading() && self.renewed().elapsed() + self.settings.margin >= self.settings.ttl {
                self.step_down("its etcd lease may lapse (no renewal acknowledged)");
            }
        }
    }

    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut held: Option<Held> = None;
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            held = self.step(held).await;
        }
        self.step_down("shutting down");
        // Hand over at once rather than after the TTL.
        if let Some(h) = held {
            let _ = tokio::time::timeout(self.settings.tick, self.etcd.revoke(h.id)).await;
        }
    }

    fn leading(&self) -> bool {
        matches!(*self.tx.borrow(), Standing::Leader { .. })
    }

    fn step_down(&self, why: &str) {
        if self.leading() {
            self.fence.store(0, Ordering::SeqCst);
            tracing::warn!(reason = why, "stepping down as coordinator leader");
            self.tx.send_replace(Standing::Follower { leader: None });
        }
    }

    /// One round: renew (or get) the lease, step down if it may lapse,
    /// else campaign or check the leader key.
    async fn step(&self, held: Option<Held>) -> Option<Held> {
        let bound = self.settings.tick;
        let mut h = match held {
            Some(h) => h,
            None => match self.fresh_lease().await {
                Ok(h) => h,
                Err(e) => {
                    self.step_down("etcd unreachable");
                    tracing::warn!(error = %e, "coordinator cannot get an etcd lease");
                    return None;
                }
            },
        };
        self.renew(&mut h, bound).await;
        if h.id == 0 {
            return None;
        }
        if self.renewed().elapsed() + self.settings.margin >= self.settings.ttl {
            self.step_down("its etcd lease may lapse (etcd unreachable)");
            // The lease may be gone already: start again with a new one.
            return None;
        }
        if let Err(e) = tokio::time::timeout(bound, self.contend(h.id))
            .await
            .unwrap_or(Err(duplex_etcd::EtcdError::StreamEnded("leader check")))
        {
            tracing::debug!(error = %e, "leader check failed");
        }
        Some(h)
    }

    async fn fresh_lease(&self) -> Result<Held, duplex_etcd::EtcdError> {
        let sent = Instant::now();
        let id = tokio::time::timeout(self.settings.ttl / 2, self.etcd.grant(self.settings.ttl))
            .await
            .map_err(|_| duplex_etcd::EtcdError::StreamEnded("lease grant"))??;
        // Known for good (status shows it down once its lease is gone), and
        // alive while its lease lasts.
        let known = format!("{MEMBERS}{}", self.me.name);
        let alive = format!("{ALIVE}{}", self.me.name);
        self.etcd
            .txn(
                Vec::new(),
                vec![
                    put(known.as_bytes(), self.me.to_json(), 0),
                    put(alive.as_bytes(), Vec::new(), id),
                ],
                Vec::new(),
            )
            .await?;
        self.set_renewed(sent);
        Ok(Held { id, keep_alive: None })
    }

    /// Renews the lease within `bound`. A renewal that times out drops its
    /// stream: an answer read later could not be matched to its request.
    async fn renew(&self, h: &mut Held, bound: Duration) {
        let sent = Instant::now();
        let renewed = tokio::time::timeout(bound, async {
            let ka = match h.keep_alive.as_mut() {
                Some(ka) => ka,
                None => h.keep_alive.insert(self.etcd.keep_alive(h.id).await?),
            };
            ka.renew().await
        })
        .await;
        match renewed {
            Ok(Ok(ttl)) if !ttl.is_zero() => self.set_renewed(sent),
            Ok(Ok(_)) => {
                // Expired in etcd: this lease is of no more use.
                self.step_down("its etcd lease expired");
                h.keep_alive = None;
                h.id = 0;
            }
            _ => h.keep_alive = None,
        }
    }

    /// Leads if the key is free; otherwise follows whoever holds it, and
    /// steps down if this leader's key was deleted or replaced.
    async fn contend(&self, lease: i64) -> Result<(), duplex_etcd::EtcdError> {
        let leading = match *self.tx.borrow() {
            Standing::Leader { fence } => Some(fence),
            Standing::Follower { .. } => None,
        };
        if let Some(fence) = leading {
            let current = self.etcd.get(LEADER_KEY.as_bytes()).await?;
            if current.is_none_or(|kv| kv.create_revision != fence) {
                self.step_down("the leader key is no longer its own");
            }
            return Ok(());
        }
        let won = self
            .etcd
            .txn(
                vec![absent(LEADER_KEY.as_bytes())],
                vec![put(LEADER_KEY.as_bytes(), self.me.to_json(), lease)],
                Vec::new(),
            )
            .await?;
        // An answer that took so long the lease may have lapsed meanwhile
        // is no win to act on: the key will expire with the lease.
        if won.succeeded && self.renewed().elapsed() + self.settings.margin < self.settings.ttl {
            let fence = won.header.map_or(0, |h| h.revision);
            self.fence.store(fence, Ordering::SeqCst);
            tracing::info!(fence, "this coordinator now leads");
            self.tx.send_replace(Standing::Leader { fence });
            return Ok(());
        }
        let leader = self
            .etcd
            .get(LEADER_KEY.as_bytes())
            .await?
            .and_then(|kv| Member::from_json(&kv.value));
        self.tx.send_if_modified(|standing| {
            let next = Standing::Follower { leader };
            let changed = *standing != next;
            *standing = next;
            changed
        });
        Ok(())
    }
}

/// How a coordinator stands, as `duplexctl status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Leader,
    Follower,
    Down,
}

impl Seen {
    pub fn as_str(self) -> &'static str {
        match self {
            Seen::Leader => "leader",
            Seen::Follower => "follower",
            Seen::Down => "down",
        }
    }
}

/// Every coordinator that ever joined, and how it stands now.
pub async fn members(etcd: &Etcd) -> Result<Vec<(Member, Seen)>, duplex_etcd::EtcdError> {
    let (known, _) = etcd.prefix(MEMBERS.as_bytes()).await?;
    let (alive, _) = etcd.prefix(ALIVE.as_bytes()).await?;
    let alive: std::collections::BTreeSet<Vec<u8>> = alive
        .into_iter()
        .map(|kv| kv.key[ALIVE.len()..].to_vec())
        .collect();
    let leader = etcd
        .get(LEADER_KEY.as_bytes())
        .await?
        .and_then(|kv| Member::from_json(&kv.value));
    Ok(known
        .iter()
        .filter_map(|kv| Member::from_json(&kv.value))
        .map(|m| {
            let seen = if leader.as_ref().is_some_and(|l| l.name == m.name) {
                Seen::Leader
            } else if alive.contains(m.name.as_bytes()) {
                Seen::Follower
            } else {
                Seen::Down
            };
            (m, seen)
        })
        .collect())
}

/// What answers the coordinator API now: this coordinator's engine while
/// it leads, else the leader to redirect to.
#[derive(Clone)]
pub enum Term {
    Leading(crate::engine::Engine),
    Following(Option<Member>),
}

pub use duplex_rpc::leader::LEADER_METADATA;

impl Term {
    /// The engine, or the status that sends the caller to the leader.
    pub fn engine(&self) -> Result<crate::engine::Engine, tonic::Status> {
        match self {
            Term::Leading(engine) => Ok(engine.clone()),
            Term::Following(Some(leader)) => {
                let mut status = tonic::Status::unavailable(format!(
                    "this coordinator follows; {} at {} leads: ask it",
                    leader.name, leader.addr
                ));
                if let Ok(value) = leader.addr.parse() {
                    status.metadata_mut().insert(LEADER_METADATA, value);
                }
                Err(status)
            }
            Term::Following(None) => {
                let mut status = tonic::Status::unavailable(
                    "no coordinator leads right now (an election is under way); try again in a few seconds",
                );
                // Present but empty: a coordinator that follows, leader unknown.
                status
                    .metadata_mut()
                    .insert(LEADER_METADATA, tonic::metadata::MetadataValue::from_static(""));
                Err(status)
            }
        }
    }
}

/// Starts an engine for each term this coordinator leads and stops it the
/// moment it steps down; publishes what answers the API.
pub fn terms(
    mut standing: watch::Receiver<Standing>,
    start: impl Fn(CancellationToken) -> Result<crate::engine::Engine, tonic::Status> + Send + 'static,
    stop: CancellationToken,
) -> watch::Receiver<Term> {
    let (tx, rx) = watch::channel(Term::Following(None));
    tokio::spawn(async move {
        // The running term: its fence and how to stop it.
        let mut term: Option<(i64, CancellationToken)> = None;
        loop {
            // Leading without an engine (it could not start): try again soon.
            let mut retry = false;
            let now = standing.borrow_and_update().clone();
            match now {
                // The same term: nothing to do. Another (a step-down and a
                // new win seen as one change): stop the old engine first.
                Standing::Leader { fence } if term.as_ref().is_some_and(|(f, _)| *f == fence) => {}
                Standing::Leader { fence } => {
                    if let Some((_, old)) = term.take() {
                        tx.send_replace(Term::Following(None));
                        old.cancel();
                    }
                    let token = stop.child_token();
                    match start(token.clone()) {
                        Ok(engine) => {
                            term = Some((fence, token));
                            tx.send_replace(Term::Leading(engine));
                        }
                        Err(status) => {
                            tracing::error!(%status, "cannot start leading; trying again");
                            token.cancel();
                            retry = true;
                        }
                    }
                }
                Standing::Follower { leader } => {
                    // Stop answering as leader first, then stop the engine.
                    tx.send_replace(Term::Following(leader));
                    if let Some((_, token)) = term.take() {
                        token.cancel();
                    }
                }
            }
            let pause = async {
                if retry {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                changed = standing.changed() => if changed.is_err() { return },
                () = pause => {}
            }
        }
    });
    rx
}
