//! Talking to the coordinator that leads, when several run (one leads, the
//! others follow and answer with `UNAVAILABLE` and the leader's address in
//! the `duplex-leader` metadata). A coordinator list is comma-separated.

use std::time::Duration;

use duplex_proto::v1::GetTopologyRequest;
use duplex_proto::v1::coordinator_client::CoordinatorClient;
use tonic::Status;

/// The metadata key a following coordinator names the leader's URL in.
pub const LEADER_METADATA: &str = "duplex-leader";

/// How long [`find`] keeps asking: an election takes about the leader's
/// etcd lease (2 s by default).
const FIND_FOR: Duration = Duration::from_secs(10);
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The URLs of a comma-separated coordinator list.
pub fn urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The leader a following coordinator named in its answer.
pub fn hint(status: &Status) -> Option<String> {
    status
        .metadata()
        .get(LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .filter(|u| u.contains("://"))
        .map(str::to_owned)
}

/// The answer came from a coordinator that follows (whether or not it
/// knows the leader): it is a coordinator, and not the one to ask.
pub fn from_follower(status: &Status) -> bool {
    status.metadata().get(LEADER_METADATA).is_some()
}

/// Where to send the next call after `status`: the leader a follower
/// named, else the next of `urls` after `current`.
pub fn next(urls: &[String], current: &str, status: Option<&Status>) -> String {
    if let Some(leader) = status.and_then(hint) {
        return leader;
    }
    let at = urls.iter().position(|u| u == current).map_or(0, |i| i + 1);
    urls.get(at % urls.len().max(1))
        .cloned()
        .unwrap_or_else(|| current.to_owned())
}

/// The URL of the leading coordinator among `list`. A single URL is taken
/// as it is (its calls report what is wrong with it). Several are asked in
/// turn (the topology call is open to everyone) until one answers as
/// leader or names the leader, for up to 10 s (an election may be under
/// way); the last failure is returned if none does.
pub async fn find(list: &str) -> Result<String, Status> {
    let urls = urls(list);
    if urls.len() <= 1 {
        return urls
            .into_iter()
            .next()
            .ok_or_else(|| Status::invalid_argument("no coordinator URL given"));
    }
    let deadline = tokio::time::Instant::now() + FIND_FOR;
    // The last URL of the list asked: a leader a follower named may not be
    // reachable from here (a container name seen from the host), and then
    // the list goes on after the follower that named it.
    let mut listed = urls[0].clone();
    let mut current = listed.clone();
    loop {
        let failure = match ask(&current).await {
            Ok(()) => return Ok(current),
            Err(status) => status,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(failure);
        }
        let next = match hint(&failure) {
            Some(leader) if leader != current && urls.contains(&current) => leader,
            _ => next(&urls, &listed, None),
        };
        // Around the whole list without an answer: give the election time.
        if hint(&failure).is_none() && next == urls[0] {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if urls.contains(&next) {
            listed = next.clone();
        }
        current = next;
    }
}

async fn ask(url: &str) -> Result<(), Status> {
    let channel = crate::channel(url).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut client = CoordinatorClient::new(channel);
    match tokio::time::timeout(ASK_TIMEOUT, client.get_topology(GetTopologyRequest {})).await {
        Ok(result) => result.map(|_| ()),
        Err(_) => Err(Status::unavailable(format!("{url} did not answer in time"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_names_the_leader_else_the_next_url_is_tried() {
        let urls = urls("https://a:1, https://b:2,https://c:3");
        assert_eq!(urls.len(), 3);
        let mut named = Status::unavailable("follower");
        named
            .metadata_mut()
            .insert(LEADER_METADATA, "https://c:3".parse().expect("ascii"));
        assert_eq!(next(&urls, "https://a:1", Some(&named)), "https://c:3");
        let down = Status::unavailable("down");
        assert_eq!(next(&urls, "https://a:1", Some(&down)), "https://b:2");
        assert_eq!(next(&urls, "https://c:3", Some(&down)), "https://a:1");
        // A leader outside the list (added later) is followed too.
        assert_eq!(next(&urls, "https://x:9", None), "https://a:1");
    }
}
