//! `duplexctl accounts reapply FILE`: sends the entries of a divergence
//! report (written by an account server that rejoined with writes the new
//! master never received) back to the master, which re-applies each one
//! that still makes sense and says why it skipped the others.

use duplex_rpc::exit::call_failed;
use duplex_rpc::outln;
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use duplex_proto::v1::{ReapplyEntry, ReapplyRequest, ReapplyResult};
use serde::Deserialize;
use serde_json::json;

/// The fields of a report line this command needs.
#[derive(Deserialize)]
struct Line {
    lsn: u64,
    kind: String,
    /// Absent for entries that hold a secret.
    entry: Option<String>,
}

/// One report line, ready to send or already decided here.
#[derive(Debug)]
enum Planned {
    Send(ReapplyEntry),
    Skip(ReapplyResult),
}

pub async fn run(endpoints: &[String], file: &Path, dry_run: bool, json: bool) -> anyhow::Result<()> {
    let planned = read_report(file)?;
    let entries: Vec<ReapplyEntry> = planned
        .iter()
        .filter_map(|p| match p {
            Planned::Send(e) => Some(e.clone()),
            Planned::Skip(_) => None,
        })
        .collect();
    let answered = if entries.is_empty() {
        Vec::new()
    } else {
        send(endpoints, ReapplyRequest { entries, dry_run }).await?
    };
    let results = merge(planned, answered)?;
    print(&results, dry_run, json);
    Ok(())
}

fn read_report(file: &Path) -> anyhow::Result<Vec<Planned>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| plan(l).with_context(|| format!("{} line {}", file.display(), i + 1)))
        .collect()
}

fn plan(text: &str) -> anyhow::Result<Planned> {
    let line: Line = serde_json::from_str(text).context("not a divergence report line")?;
    let Some(entry) = line.entry else {
        return Ok(Planned::Skip(ReapplyResult {
            lsn: line.lsn,
            kind: line.kind,
            applied: false,
            reason: "the report does not include it (it holds a secret); never re-applied".into(),
            new_lsn: 0,
        }));
    };
    let entry = BASE64
        .decode(entry.trim())
        .with_context(|| format!("lsn {}: \"entry\" is not base64", line.lsn))?;
    Ok(Planned::Send(ReapplyEntry { lsn: line.lsn, entry }))
}

async fn send(endpoints: &[String], request: ReapplyRequest) -> anyhow::Result<Vec<ReapplyResult>> {
    let client = crate::admin::connect(endpoints).await?;
    let response = crate::admin::while_fenced(|| {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.reapply(request).await }
    })
    .await
    .map_err(call_failed("re-applying"))?;
    Ok(response.into_inner().results)
}

/// The results in report order: the server's, in the order sent, between
/// the lines decided here.
fn merge(planned: Vec<Planned>, answered: Vec<ReapplyResult>) -> anyhow::Result<Vec<ReapplyResult>> {
    let mut answered = answered.into_iter();
    let results = planned
        .into_iter()
        .map(|p| match p {
            Planned::Skip(result) => Ok(result),
            Planned::Send(sent) => answered
                .next()
                .with_context(|| format!("the server did not answer for lsn {}", sent.lsn)),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if answered.next().is_some() {
        bail!("the server answered for more entries than were sent");
    }
    Ok(results)
}

fn print(results: &[ReapplyResult], dry_run: bool, json: bool) {
    if json {
        let entries: Vec<_> = results
            .iter()
            .map(|r| json!({"lsn": r.lsn, "kind": r.kind, "applied": r.applied, "reason": r.reason}))
            .collect();
        outln!("{}", json!({"dry_run": dry_run, "entries": entries}));
        return;
    }
    let (yes, no) = if dry_run {
        ("would apply", "would skip")
    } else {
        ("applied", "skipped")
    };
    for r in results {
        let verdict = if r.applied { yes } else { no };
        outln!("lsn {:<8} {:<24} {verdict}: {}", r.lsn, r.kind, r.reason);
    }
    let applied = results.iter().filter(|r| r.applied).count();
    outln!("{applied} {yes}, {} {no}", results.len() - applied);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(lsn: u64, applied: bool) -> ReapplyResult {
        ReapplyResult {
            lsn,
            kind: "create-account".into(),
            applied,
            reason: String::new(),
            new_lsn: 0,
        }
    }

    #[test]
    fn lines_without_an_entry_are_skipped_here_and_bad_ones_name_their_lsn() {
        let secret = plan(r#"{"lsn":3,"kind":"set-ticket-key","summary":"key","reapply":false}"#).unwrap();
        assert!(matches!(secret, Planned::Skip(r) if r.lsn == 3 && !r.applied));
        let sent = plan(r#"{"lsn":4,"kind":"create-account","entry":"CAQ="}"#).unwrap();
        assert!(matches!(sent, Planned::Send(e) if e.lsn == 4 && e.entry == [8, 4]));
        let err = plan(r#"{"lsn":5,"kind":"create-account","entry":"not base64!"}"#).unwrap_err();
        assert!(format!("{err:#}").contains("lsn 5"), "{err:#}");
        assert!(plan("{not json").is_err());
    }

    #[test]
    fn an_unreadable_report_is_named() {
        let err = read_report(Path::new("/nonexistent/divergence-1.jsonl"))
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("/nonexistent/divergence-1.jsonl"),
            "{err:#}"
        );
    }

    #[test]
    fn results_keep_the_report_order() {
        let planned = vec![
            Planned::Send(ReapplyEntry {
                lsn: 1,
                entry: vec![],
            }),
            Planned::Skip(result(2, false)),
            Planned::Send(ReapplyEntry {
                lsn: 3,
                entry: vec![],
            }),
        ];
        let merged = merge(planned, vec![result(1, true), result(3, false)]).unwrap();
        let lsns: Vec<u64> = merged.iter().map(|r| r.lsn).collect();
        assert_eq!(lsns, [1, 2, 3]);
        let short = vec![Planned::Send(ReapplyEntry {
            lsn: 1,
            entry: vec![],
        })];
        assert!(merge(short, vec![]).is_err());
    }
}
