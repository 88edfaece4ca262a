//! `duplexctl mirror`: see a mirror's links and set them by hand (the
//! coordinator assigns them once it runs).

use anyhow::Context;
use duplex_proto::v1::mirror_client::MirrorClient;
use duplex_proto::v1::{GetMirrorStatusRequest, LinkSpec, MirrorStatus, SetLinksRequest};
use duplex_rpc::exit::call_failed;
use duplex_rpc::outln;
use serde_json::json;

fn print(status: &MirrorStatus, json: bool) {
    if json {
        let links: Vec<_> = status
            .links
            .iter()
            .map(|l| {
                let spec = l.spec.clone().unwrap_or_default();
                let lag = l.lag.unwrap_or_default();
                json!({
                    "source": spec.source,
                    "destination": spec.destination,
                    "rate": spec.rate,
                    "state": l.state,
                    "checkpoint": l.checkpoint,
                    "source_seq": l.source_seq,
                    "lag": {"records": lag.records, "bytes": lag.bytes, "seconds": lag.seconds},
                    "chunks_sent": l.chunks_sent,
                    "bytes_sent": l.bytes_sent,
                    "snapshots_sent": l.snapshots_sent,
                    "retries": l.retries,
                })
            })
            .collect();
        outln!("{}", json!({ "links": links }));
        return;
    }
    for l in &status.links {
        let spec = l.spec.clone().unwrap_or_default();
        let lag = l.lag.unwrap_or_default();
        outln!(
            "{} -> {}: {} checkpoint {} of {}, behind {} records / {} bytes / {:.1} s, sent {} bytes, {} retries",
            spec.source,
            spec.destination,
            l.state,
            l.checkpoint,
            l.source_seq,
            lag.records,
            lag.bytes,
            lag.seconds,
            l.bytes_sent,
            l.retries
        );
    }
}

pub async fn status(url: &str, json: bool) -> anyhow::Result<()> {
    let mut client = MirrorClient::new(crate::conn::conn(url)?);
    let status = client
        .get_status(GetMirrorStatusRequest {})
        .await
        .map_err(call_failed(url))?
        .into_inner();
    print(&status, json);
    Ok(())
}

/// Replaces the mirror's links with `links` ("SRC=DST" each).
pub async fn set_links(url: &str, links: &[String], rate: u64, json: bool) -> anyhow::Result<()> {
    let links = links
        .iter()
        .map(|l| {
            let (source, destination) = l
                .split_once('=')
                .with_context(|| format!("link {l:?} must be SRC=DST"))?;
            Ok(LinkSpec {
                source: source.to_owned(),
                destination: destination.to_owned(),
                rate,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut client = MirrorClient::new(crate::conn::conn(url)?);
    let status = client
        .set_links(SetLinksRequest { links })
        .await
        .map_err(call_failed(url))?
        .into_inner();
    print(&status, json);
    Ok(())
}
