//! Account server replication figures, written to docs/BENCHMARKS.md:
//! write rate and latency in sync and async mode with a slave attached,
//! the slave's lag under that load, and the time to promote a slave that
//! is 0 or 100,000 entries past its last snapshot.
//!
//!     cargo build --release --bins && cargo bench -p duplex-tests --bench account_replication

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use duplex_proto::v1::PromoteRequest;
use duplex_proto::v1::account_replication_client::AccountReplicationClient;
use duplex_tests::accounts::{self, account, admin, bulk_create, register_storage, status, wait_in_sync};
use duplex_tests::bench::{machine, write_section};
use duplex_tests::{runtime, wait_for};

const WRITES: usize = 2000;

struct LoadResult {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_lag: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn load(mode: &str) -> LoadResult {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let _enter = rt.enter();
    let master = accounts::start(dir.path(), "account-a", &["--replication", mode]);
    let slave = accounts::start(dir.path(), "account-b", &["--master", &master.addr]);
    rt.block_on(register_storage(&master.addr));
    wait_in_sync(&rt, &master.addr, &slave.addr, Duration::from_secs(30));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (addr, stop) = (master.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let rt = runtime();
            let mut max = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let s = rt.block_on(status(&addr));
                max = max.max(s.slaves.first().and_then(|sl| sl.lag).map_or(0, |l| l.records));
                std::thread::sleep(Duration::from_millis(10));
            }
            max
        })
    };
    let mut latencies = Vec::with_capacity(WRITES);
    let start = Instant::now();
    rt.block_on(async {
        let mut client = admin(&master.addr);
        for i in 0..WRITES {
            let t = Instant::now();
            client
                .create_account(account(&format!("bench{i}")))
                .await
                .unwrap();
            latencies.push(t.elapsed());
        }
    });
    let elapsed = start.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let max_lag = sampler.join().unwrap();
    latencies.sort();
    LoadResult {
        per_sec: WRITES as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        max_lag,
    }
}

/// Promotes a synced slave whose log holds `behind` entries past the
/// master's last snapshot; returns promote-to-first-acknowledged-write time.
fn promote_time(behind: usize) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let _enter = rt.enter();
    let mut master = accounts::start(dir.path(), "account-a", &["--snapshot-interval", "1s"]);
    rt.block_on(async {
        register_storage(&master.addr).await;
        bulk_create(&master.addr, "base", 100_000 - behind).await;
    });
    let lsn = rt.block_on(status(&master.addr)).lsn;
    wait_for("the snapshot", Duration::from_secs(60), || {
        (rt.block_on(status(&master.addr)).snapshot_lsn >= lsn).then_some(())
    });
    let slave = accounts::start(dir.path(), "account-b", &["--master", &master.addr]);
    wait_in_sync(&rt, &master.addr, &slave.addr, Duration::from_secs(120));
    rt.block_on(bulk_create(&master.addr, "after", behind));
    wait_in_sync(&rt, &master.addr, &slave.addr, Duration::from_secs(120));
    master.kill();
    let start = Instant::now();
    rt.block_on(async {
        let mut replication = AccountReplicationClient::new(duplex_rpc::channel(&slave.addr).unwrap());
        replication.promote(PromoteRequest { epoch: 1 }).await.unwrap();
        admin(&slave.addr)
            .create_account(account("first-after-promote"))
            .await
            .unwrap();
    });
    start.elapsed()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let sync = load("sync");
    let asynchronous = load("async");
    let promote_0 = promote_time(0);
    let promote_100k = promote_time(100_000);
    let body = format!(
        "## Account server replication\n\n\
         `cargo build --release --bins && cargo bench -p duplex-tests --bench account_replication`\n\n\
         {WRITES} account creations, one at a time from one client, master and one slave on loopback, \
         every write fsynced on the master (and, in sync mode, on the slave before the ack). \
         Lag is the slave's distance behind the master as the master reports it, sampled every 10 ms. \
         Machine: {}.\n\n\
         | mode | writes/s | p50 ms | p99 ms | max lag (records) |\n| --- | ---: | ---: | ---: | ---: |\n\
         | sync | {:.0} | {:.2} | {:.2} | {} |\n| async | {:.0} | {:.2} | {:.2} | {} |\n\n\
         Promotion (SIGKILL the master, `Promote`, first acknowledged write on the new master) of a slave \
         holding 100,000 accounts, hot standby:\n\n\
         | entries past the last snapshot | promote → first write (ms) |\n| ---: | ---: |\n\
         | 0 | {:.1} |\n| 100,000 | {:.1} |\n\n\
         The slave applies the log as it arrives, so promotion replays nothing: both are the same few \
         milliseconds (NNMi, which replays the shipped log at failover, reports 5 to 32 minutes).\n",
        machine(),
        sync.per_sec,
        sync.p50_ms,
        sync.p99_ms,
        sync.max_lag,
        asynchronous.per_sec,
        asynchronous.p50_ms,
        asynchronous.p99_ms,
        asynchronous.max_lag,
        promote_0.as_secs_f64() * 1000.0,
        promote_100k.as_secs_f64() * 1000.0,
    );
    write_section("account-replication", &body);
    println!("{body}");
}
