//! The failure detector: publishes topology changes as they happen and
//! starts an automatic failover when a master or primary has been silent
//! for the failover timeout, unless the guard says the loss would be too
//! large. A blip shorter than the timeout changes nothing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::ops;

const TICK: Duration = Duration::from_millis(50);

pub async fn run(core: Arc<Core>, stop: CancellationToken) {
    // Lost servers already refused or reported, so history gets one entry
    // per outage rather than one per tick.
    let mut reported: HashSet<String> = HashSet::new();
    loop {
        core.publish().await;
        if core.config.auto_failover {
            check(&core, &mut reported).await;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

async fn check(core: &Arc<Core>, reported: &mut HashSet<String>) {
    // A restarted coordinator first waits for every server to report.
    if core.started.elapsed() < core.config.failover_timeout + core.config.heartbeat_interval * 2 {
        return;
    }
    let inner = core.lock().await;
    if inner.operation.as_ref().is_some_and(|op| op.state == "running") {
        return;
    }
    let lost: Vec<(String, String)> = inner
        .servers
        .values()
        .filter(|s| {
            matches!(
                inner.cluster.roles.get(&s.name).map(String::as_str),
                Some("master" | "primary")
            )
        })
        .filter(|s| !core.healthy(&inner, &s.name))
        .map(|s| (s.name.clone(), s.site.clone()))
        .collect();
    reported.retain(|name| lost.iter().any(|(n, _)| n == name));
    let Some((name, site)) = lost.into_iter().find(|(n, _)| !reported.contains(n)) else {
        return;
    };
    let max = core.config.max_lag_on_failover.as_secs_f64();
    let plan = ops::plan::away_from_site(core, &inner, &site, true)
        .map(|plan| (ops::plan::too_lossy(&inner, &plan, max), plan));
    drop(inner);
    reported.insert(name.clone());
    let outcome = match plan {
        Ok((Some(why), _)) => {
            let detail = format!(
                "{name} is down but failing over could lose acknowledged writes: {why}; not failing \
                 over automatically; `duplexctl failover --site {site} --force` accepts the loss"
            );
            ops::record(core, "failover-refused", "refused", detail).await
        }
        Ok((None, plan)) => {
            let detail = format!(
                "{name} missed heartbeats for {:?}: automatic failover of site {site}",
                core.config.failover_timeout
            );
            ops::start(core, "failover", plan, detail, true, false)
                .await
                .map(|_| ())
        }
        Err(why) => {
            let detail = format!("{name} is down and cannot be failed over: {}", why.message());
            ops::record(core, "failover-refused", "refused", detail).await
        }
    };
    if let Err(e) = outcome {
        tracing::error!(error = %e, "cannot start or record a failover");
    }
}
