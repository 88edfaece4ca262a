//! Settings of the failure detector, the leases and the operations.

use std::time::Duration;

use duplex_types::Mode;

#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    /// A server silent this long is down; a lost master / primary is
    /// failed over after it.
    pub failover_timeout: Duration,
    /// How long a write lease lasts. Never longer than the timeout, so a
    /// lost holder's lease has lapsed by the time it is declared lost.
    pub lease: Duration,
    pub heartbeat_interval: Duration,
    /// No automatic failover when the standby is further behind than this.
    pub max_lag_on_failover: Duration,
    pub auto_failover: bool,
    /// Where events are sent (webhook, email).
    pub alerts: crate::notify::Alerts,
    /// How long a failback waits for the recovered servers to come back
    /// (and for reverse mirroring to nearly catch up) before giving up.
    pub rejoin_timeout: Duration,
    /// How long any other phase waits for servers before its way out.
    pub phase_timeout: Duration,
}

impl Config {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            failover_timeout: Duration::from_millis(1500),
            lease: Duration::from_secs(1),
            heartbeat_interval: Duration::from_millis(250),
            max_lag_on_failover: Duration::from_secs(30),
            auto_failover: true,
            alerts: crate::notify::Alerts::default(),
            rejoin_timeout: Duration::from_secs(3600),
            phase_timeout: Duration::from_secs(60),
        }
    }

    /// A holder silent this long is taken along when another holder of
    /// its site is declared lost: servers of one site usually die
    /// together, and one failover should move them all.
    pub fn suspect_after(&self) -> Duration {
        self.failover_timeout / 2
    }
}

/// Extra time allowed for clock-rate differences between machines.
pub const LEASE_MARGIN: Duration = Duration::from_millis(100);
