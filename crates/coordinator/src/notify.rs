//! Notifications of what an operator must hear about: failovers,
//! failbacks, switchovers, refusals, fencing, degraded sync and standbys
//! lost or regained. Each goes to the webhook (an HTTP or HTTPS POST of the
//! event's JSON) and, when configured, by email through SMTP. Delivery is
//! best effort with jittered retries; history is the durable record.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use duplex_proto::v1::Operation;
use duplex_types::OperationKind;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

/// Where alerts go, as given on the command line.
#[derive(Clone, Debug, Default)]
pub struct AlertSettings {
    pub webhook: Option<String>,
    /// Trust this CA for an https webhook instead of the system's roots.
    pub webhook_ca: Option<PathBuf>,
    /// `smtp://HOST[:PORT]` (plain: a relay on the same host or network),
    /// `smtp://HOST[:PORT]?tls=required` (STARTTLS), `smtps://HOST[:PORT]`
    /// (TLS), with optional `USER:PASSWORD@` (never over plain smtp).
    pub smtp_url: Option<String>,
    pub alert_email: Vec<String>,
    pub alert_from: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("--webhook {url:?} is not a valid http or https URL: {reason}")]
    Webhook { url: String, reason: String },
    #[error("--webhook-ca: {0}")]
    WebhookCa(#[from] duplex_rpc::tls::TlsError),
    #[error("--smtp-url {url:?}: {reason}")]
    Smtp { url: String, reason: String },
    #[error("{flag} {address:?} is not an email address: {reason}")]
    Address {
        flag: &'static str,
        address: String,
        reason: String,
    },
    #[error("--alert-email needs --smtp-url, and --smtp-url needs at least one --alert-email")]
    Incomplete,
}

/// Where alerts go, checked and ready. Cheap to clone.
#[derive(Clone, Default)]
pub struct Alerts {
    webhook: Option<Arc<Outbox<Webhook>>>,
    email: Option<Arc<Outbox<Email>>>,
}

/// Events waiting for one destination, delivered one at a time in the
/// order they happened (a `regained` never overtakes its `lost`), by a
/// worker started on first use. Bounded: when a destination is down for
/// long, events beyond [`QUEUE`] waiting are dropped (and logged); history
/// keeps them all.
struct Outbox<D> {
    destination: Arc<D>,
    queue: std::sync::OnceLock<tokio::sync::mpsc::Sender<Operation>>,
}

const QUEUE: usize = 1024;

trait Deliver: Send + Sync + 'static {
    fn deliver(&self, op: Operation) -> impl std::future::Future<Output = ()> + Send;
}

impl<D: Deliver> Outbox<D> {
    fn new(destination: D) -> Self {
        Self {
            destination: Arc::new(destination),
            queue: std::sync::OnceLock::new(),
        }
    }

    fn push(&self, op: &Operation) {
        let queue = self.queue.get_or_init(|| {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Operation>(QUEUE);
            let destination = self.destination.clone();
            tokio::spawn(async move {
                while let Some(op) = rx.recv().await {
                    destination.deliver(op).await;
                }
            });
            tx
        });
        if queue.try_send(op.clone()).is_err() {
            tracing::error!(kind = %op.kind, "alert queue full; this event is only in history");
        }
    }
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field(
                "webhook",
                &self.webhook.as_ref().map(|w| w.destination.url.as_str()),
            )
            .field("email", &self.email.as_ref().map(|e| &e.destination.to))
            .finish()
    }
}

struct Webhook {
    url: reqwest::Url,
    client: reqwest::Client,
}

struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
}

/// A few attempts, each after a jittered, growing pause.
fn retries() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_times(2)
        .with_jitter()
}

impl Alerts {
    /// Checks every setting at start, so a typo fails the start rather
    /// than the first failover's alert.
    pub fn new(settings: &AlertSettings) -> Result<Alerts, NotifyError> {
        let webhook = settings
            .webhook
            .as_deref()
            .map(|url| webhook(url, settings.webhook_ca.as_deref()))
            .transpose()?
            .map(|w| Arc::new(Outbox::new(w)));
        let email = match (&settings.smtp_url, settings.alert_email.is_empty()) {
            (None, true) => None,
            (Some(url), false) => Some(Arc::new(Outbox::new(email(url, settings)?))),
            _ => return Err(NotifyError::Incomplete),
        };
        Ok(Alerts { webhook, email })
    }

    /// Sends `op` everywhere configured, in the background.
    pub fn send(&self, op: &Operation) {
        if let Some(webhook) = &self.webhook {
            webhook.push(op);
        }
        // Operator actions are audit trail, not alarms: not mailed.
        if let Some(email) = self
            .email
            .as_ref()
            .filter(|_| op.kind != OperationKind::Audit.as_str())
        {
            email.push(op);
        }
    }
}

fn webhook(url: &str, ca: Option<&std::path::Path>) -> Result<Webhook, NotifyError> {
    let invalid = |reason: String| NotifyError::Webhook {
        url: url.to_owned(),
        reason,
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    // reqwest is given our rustls (on ring) even for plain http: left to
    // itself it would look for a process-wide crypto provider.
    let roots = match parsed.scheme() {
        "http" => Arc::new(rustls::RootCertStore::empty()),
        "https" => duplex_rpc::tls::roots(ca)?,
        other => return Err(invalid(format!("scheme {other:?}"))),
    };
    let mut tls = (*duplex_rpc::tls::client_config(roots, None)?).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    Ok(Webhook { url: parsed, client })
}

impl Deliver for Webhook {
    async fn deliver(&self, op: Operation) {
        let body = crate::events::operation_json(&op).to_string();
        let attempt = || async {
            let response = self
                .client
                .post(self.url.clone())
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await?;
            response.error_for_status().map(drop)
        };
        let sent = attempt
            .retry(retries())
            .notify(
                |e, pause| tracing::warn!(url = %self.url, error = %e, ?pause, "webhook failed; retrying"),
            )
            .await;
        if let Err(e) = sent {
            tracing::error!(url = %self.url, error = %e, "webhook not delivered");
        }
    }
}

fn email(url: &str, settings: &AlertSettings) -> Result<Email, NotifyError> {
    let smtp_error = |reason: &str| NotifyError::Smtp {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| smtp_error(&e.to_string()))?;
    let tls = parsed.scheme() == "smtps" || parsed.query_pairs().any(|(k, v)| k == "tls" && v == "required");
    if !tls && (!parsed.username().is_empty() || parsed.password().is_some()) {
        return Err(smtp_error(
            "would send the password in clear: use smtps:// or add ?tls=required",
        ));
    }
    let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
        .map_err(|e| NotifyError::Smtp {
            url: url.to_owned(),
            reason: e.to_string(),
        })?
        .timeout(Some(Duration::from_secs(10)))
        .build();
    let mailbox = |flag: &'static str, address: &str| {
        address.parse::<Mailbox>().map_err(|e| NotifyError::Address {
            flag,
            address: address.to_owned(),
            reason: e.to_string(),
        })
    };
    let from = match &settings.alert_from {
        Some(from) => mailbox("--alert-from", from)?,
        None => mailbox("--alert-from", "Duplex coordinator <duplex@localhost>")?,
    };
    let to = settings
        .alert_email
        .iter()
        .map(|a| mailbox("--alert-email", a))
        .collect::<Result<_, _>>()?;
    Ok(Email { transport, from, to })
}

impl Deliver for Email {
    async fn deliver(&self, op: Operation) {
        let op = &op;
        let mut builder = lettre::Message::builder()
            .from(self.from.clone())
            .subject(subject(op));
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        let body = format!(
            "{}\n\n{}\n",
            op.detail,
            serde_json::to_string_pretty(&crate::events::operation_json(op)).unwrap_or_default()
        );
        let message = match builder.body(body) {
            Ok(message) => message,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the alert email");
                return;
            }
        };
        let attempt = || async { self.transport.send(message.clone()).await };
        let sent = attempt
            .retry(retries())
            .notify(|e, pause| tracing::warn!(error = %e, ?pause, "alert email failed; retrying"))
            .await;
        if let Err(e) = sent {
            tracing::error!(error = %e, "alert email not delivered");
        }
    }
}

/// "[duplex] failover done: storage-a lost ..." — the kind, the outcome
/// and the start of the detail, so a mailbox list reads as a timeline.
fn subject(op: &Operation) -> String {
    let mut detail: String = op.detail.chars().take(80).collect();
    if op.detail.chars().count() > 80 {
        detail.push('…');
    }
    format!("[duplex] {} {}: {detail}", op.kind, op.state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_at_start() {
        let bad = |s: AlertSettings| Alerts::new(&s).expect_err("refused").to_string();
        let webhook = |url: &str| AlertSettings {
            webhook: Some(url.into()),
            ..Default::default()
        };
        assert!(bad(webhook("not a url")).contains("--webhook \"not a url\""));
        assert!(bad(webhook("ftp://x/y")).contains("scheme \"ftp\""));
        assert!(Alerts::new(&webhook("http://127.0.0.1:9/hook")).is_ok());
        let mail = AlertSettings {
            smtp_url: Some("smtp://127.0.0.1:2525".into()),
            alert_email: vec!["not an address".into()],
            ..Default::default()
        };
        assert!(bad(mail).contains("--alert-email \"not an address\""));
        let half = AlertSettings {
            smtp_url: Some("smtp://127.0.0.1:2525".into()),
            ..Default::default()
        };
        assert!(matches!(Alerts::new(&half), Err(NotifyError::Incomplete)));
        let smtp = AlertSettings {
            smtp_url: Some("gopher://x".into()),
            alert_email: vec!["ops@example.com".into()],
            ..Default::default()
        };
        assert!(bad(smtp).contains("--smtp-url"));
        let clear = AlertSettings {
            smtp_url: Some("smtp://ops:secret@mail.example.com:25".into()),
            alert_email: vec!["ops@example.com".into()],
            ..Default::default()
        };
        assert!(bad(clear).contains("password in clear"));
    }

    #[test]
    fn a_subject_names_kind_outcome_and_detail() {
        let op = Operation {
            kind: "standby-lost".into(),
            state: "reported".into(),
            detail: "replica storage-b (site b) stopped heartbeating".into(),
            ..Default::default()
        };
        assert_eq!(
            subject(&op),
            "[duplex] standby-lost reported: replica storage-b (site b) stopped heartbeating"
        );
    }
}
