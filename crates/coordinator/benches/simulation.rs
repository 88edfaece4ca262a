//! Simulation throughput, written to docs/BENCHMARKS.md: how many seeded
//! fault schedules the deterministic simulation runs per second, and how
//! many ran without an invariant violation.
//!
//!     cargo bench -p duplex-coordinator --bench simulation

#[path = "../tests/sim/mod.rs"]
mod sim;

use duplex_tests::bench::{machine, write_section};

const SCHEDULES: u64 = 5_000;

fn main() {
    let (failures, elapsed) = sim::run_many(sim::BASE_SEED, SCHEDULES);
    let rate = SCHEDULES as f64 / elapsed.as_secs_f64();
    let clean = SCHEDULES - failures.len() as u64;
    eprintln!(
        "{SCHEDULES} schedules in {:.1} s, {clean} clean",
        elapsed.as_secs_f64()
    );
    for f in &failures {
        eprintln!("{f}");
    }
    let body = format!(
        "## Coordinator simulation\n\n\
         `cargo bench -p duplex-coordinator --bench simulation` on {machine}.\n\n\
         The real engine (owner task, rules, redb store in memory) against a simulated two-site\n\
         platform on tokio's paused clock; each schedule is about 100 s of simulated time with 2–8\n\
         faults (SIGKILL or SIGSTOP of a server or a whole site, cut-offs from the coordinator,\n\
         lagging standbys, coordinator restarts, lost pushes, operator commands), then healing.\n\
         Invariants are checked every 50 ms of simulated time.\n\n\
         | schedules | seconds | schedules per second | without a violation |\n\
         | ---: | ---: | ---: | ---: |\n\
         | {SCHEDULES} | {:.1} | {rate:.0} | {clean} |\n\n\
         The test suite runs the first 1,000 of these seeds on every CI run.\n",
        elapsed.as_secs_f64(),
        machine = machine(),
    );
    let path = write_section("simulation", &body);
    eprintln!("wrote {}", path.display());
}
