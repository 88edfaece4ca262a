//! A deterministic simulation of the coordinator's engine, in process.
//!
//! The real engine (the same owner task, rules and store code, over an
//! in-memory redb) runs against simulated servers on tokio's paused clock.
//! Each seed draws a schedule of faults: SIGKILL and SIGSTOP of any server
//! or of a whole site, servers cut off from the coordinator, standbys that
//! fall behind, coordinator restarts at any moment, and operator commands
//! interleaved. After every step the invariants are checked:
//!
//! - at most one server takes writes as master, and as primary (per site
//!   in active-active mode), at any moment;
//! - no write is lost beyond `max_lag_on_failover` unless an operator
//!   forced the failover;
//! - a held server is never assigned a master or primary role;
//! - epochs never go back;
//! - a running operation that has not moved for a while says what it
//!   waits for, and once every fault heals, every operation ends and the
//!   platform takes writes again.
//!
//! A failing seed is printed; `DUPLEX_SIM_SEED=N` replays just that one.
//! `DUPLEX_SIM_SCHEDULES` sets how many run (default 1000).

mod sim;

#[test]
fn thousands_of_fault_schedules_keep_every_invariant() {
    if let Ok(seed) = std::env::var("DUPLEX_SIM_SEED") {
        let seed: u64 = seed
            .parse()
            .unwrap_or_else(|_| panic!("DUPLEX_SIM_SEED must be a number"));
        if let Err(e) = sim::run_seed(seed) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let schedules: u64 = std::env::var("DUPLEX_SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let (failures, elapsed) = sim::run_many(sim::BASE_SEED, schedules);
    println!(
        "simulation: {schedules} schedules in {:.1} s ({:.0} per second), {} failed",
        elapsed.as_secs_f64(),
        schedules as f64 / elapsed.as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "invariant violated (replay with DUPLEX_SIM_SEED=N):\n{}",
        failures.join("\n\n")
    );
}
