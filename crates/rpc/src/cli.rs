//! Command-line options every server binary shares.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Log lines on stderr: `text` for people, `json` (one object per line) for collectors.
    #[arg(
        long,
        env = "DUPLEX_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: crate::telemetry::LogFormat,
    /// TOML file whose keys are defaults for these options (e.g. `listen = "0.0.0.0:7000"`).
    #[arg(long, env = "DUPLEX_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "DUPLEX_LISTEN", global = true)]
    pub listen: Option<String>,
    /// Where this server keeps its data.
    #[arg(long, env = "DUPLEX_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Unique, operator-chosen name, e.g. `storage-a`.
    #[arg(long, env = "DUPLEX_NAME", global = true)]
    pub name: Option<String>,
    /// The site this server belongs to.
    #[arg(long, env = "DUPLEX_SITE", default_value = "a", global = true)]
    pub site: String,
    /// Address clients should use to reach this server (default: the listen address).
    #[arg(long, env = "DUPLEX_ADVERTISE", global = true)]
    pub advertise: Option<String>,
    /// Address clients outside the servers' network use (e.g. a published
    /// port); default: the advertised address.
    #[arg(long, env = "DUPLEX_PUBLIC_ADDR", global = true)]
    pub public_addr: Option<String>,
    /// The coordinator to heartbeat (none: run standalone).
    #[arg(long, env = "DUPLEX_COORDINATOR", global = true)]
    pub coordinator: Option<String>,
    /// File holding the one-time enrollment token (`duplexctl servers token
    /// --out-dir`); only needed on the first start. The token may also come
    /// from DUPLEX_ENROLLMENT_TOKEN, never from argv (where `ps` shows it).
    #[arg(long, env = "DUPLEX_ENROLLMENT_TOKEN_FILE", global = true)]
    pub enrollment_token_file: Option<PathBuf>,
    /// The cluster CA certificate (PEM) to trust when enrolling.
    #[arg(long, env = "DUPLEX_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// No TLS and no authentication at all: for local debugging only, and
    /// every client must say so too. Printed as a warning at every start.
    #[arg(long, env = "DUPLEX_INSECURE_PLAINTEXT", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_plaintext: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ServerCommand {
    /// Run the server (the default).
    Serve,
    /// Ask a running server's gRPC health service; exit 0 only when SERVING.
    Healthcheck {
        /// Server to ask (default: derived from --listen).
        #[arg(long)]
        addr: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("--{0} is required (or set DUPLEX_{1})")]
pub struct MissingOption(pub &'static str, pub &'static str);

impl ServerArgs {
    pub fn listen_or(&self, default: &str) -> String {
        self.listen.clone().unwrap_or_else(|| default.to_owned())
    }

    pub fn data_dir(&self) -> Result<PathBuf, MissingOption> {
        self.data_dir.clone().ok_or(MissingOption("data-dir", "DATA_DIR"))
    }

    pub fn name(&self) -> Result<String, MissingOption> {
        self.name.clone().ok_or(MissingOption("name", "NAME"))
    }

    /// The URL clients use: `--advertise`, else the bound address.
    pub fn advertised(&self, bound: std::net::SocketAddr) -> String {
        match &self.advertise {
            Some(a) => crate::health::dial_url(a),
            None => crate::health::dial_url(&bound.to_string()),
        }
    }
}

/// What a server binary should do once its arguments are parsed.
pub enum Start {
    /// `healthcheck` ran and passed; exit 0.
    Checked,
    /// Serve on this listen address.
    Serve { listen: String },
}

/// The start-up every server binary shares: run `healthcheck` if that was
/// the command, else resolve the listen address.
pub async fn start(
    args: &ServerArgs,
    command: Option<&ServerCommand>,
    default_listen: &str,
) -> Result<Start, crate::health::HealthError> {
    let listen = args.listen_or(default_listen);
    if let Some(ServerCommand::Healthcheck { addr }) = command {
        // Health is open to anyone, so trusting the CA is all it needs.
        if !args.insecure_plaintext {
            let ca = args.ca.clone().or_else(|| {
                let saved = crate::pki::TlsDir::new(args.data_dir.as_deref()?).path(crate::pki::TlsDir::CA);
                saved.exists().then_some(saved)
            });
            let roots = crate::tls::roots(ca.as_deref())?;
            crate::tls::set_client_mode(crate::tls::ClientMode::Tls(crate::tls::client_config(
                roots, None,
            )?));
        }
        let addr = addr.clone().unwrap_or_else(|| crate::health::dial_url(&listen));
        crate::health::check(&addr, "").await?;
        return Ok(Start::Checked);
    }
    Ok(Start::Serve { listen })
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(transparent)]
    Missing(#[from] MissingOption),
    #[error(transparent)]
    Prepare(#[from] crate::secure_fs::DataDirError),
}

impl ServerArgs {
    /// How to reach the coordinator, if this server has one.
    pub fn coordinator_link(&self, secured: &crate::security::Secured) -> Option<crate::heartbeat::Link> {
        self.coordinator.as_ref().map(|url| crate::heartbeat::Link {
            url: url.clone(),
            gate: secured.gate.clone(),
            audit: std::sync::Arc::default(),
        })
    }

    /// The one-time enrollment token: from its file, else the environment.
    fn enrollment_token(&self) -> Option<String> {
        let from_file = self.enrollment_token_file.as_ref().and_then(|path| {
            match std::fs::read_to_string(path) {
                Ok(token) => Some(token.trim().to_owned()).filter(|t| !t.is_empty()),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the enrollment token file");
                    None
                }
            }
        });
        from_file.or_else(|| {
            std::env::var("DUPLEX_ENROLLMENT_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
        })
    }

    /// The host names this server is reached by, for its certificate.
    pub fn hosts(&self, listen: &str) -> Vec<String> {
        let mut addresses = vec![listen];
        addresses.extend(self.advertise.as_deref());
        addresses.extend(self.public_addr.as_deref());
        crate::pki::hosts_for(&addresses)
    }

    /// This server's transport security: plaintext when asked for (loudly),
    /// else its saved certificate or a new one from enrollment. Renewal runs
    /// in the background until `stop`.
    pub async fn secure(
        &self,
        kind: duplex_types::ServerKind,
        listen: &str,
        data_dir: &std::path::Path,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<crate::security::Secured, crate::security::SecurityError> {
        if self.insecure_plaintext {
            return Ok(crate::security::Secured::plaintext());
        }
        let name = self.name.clone().unwrap_or_default();
        let expected = crate::security::identity(kind, &self.site, &name);
        let hosts = self.hosts(listen);
        let secured = crate::security::Secured::establish(
            &expected,
            data_dir,
            &hosts,
            crate::security::Enrollment {
                coordinator: self.coordinator.as_deref(),
                token: self.enrollment_token(),
                ca_file: self.ca.as_deref(),
            },
        )
        .await?;
        if let Some(url) = &self.coordinator {
            secured.spawn_renewal(url.clone(), hosts, stop.clone());
        }
        Ok(secured)
    }

    /// `--public-addr` as a URL, or empty.
    pub fn public_addr(&self) -> String {
        self.public_addr
            .as_deref()
            .map(crate::health::dial_url)
            .unwrap_or_default()
    }

    /// `--data-dir`, created 0700 if absent; refused if others can write it.
    pub fn prepared_data_dir(&self) -> Result<PathBuf, DataDirError> {
        let dir = self.data_dir()?;
        crate::secure_fs::prepare_data_dir(&dir)?;
        Ok(dir)
    }
}

/// The keep rules of `duplex forget` and `duplexctl groups policy`.
#[derive(Debug, Clone, Copy, Args)]
pub struct KeepArgs {
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_hourly: u32,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: u32,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: u32,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_monthly: u32,
    /// Keep the newest snapshot of each of the last N years that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_yearly: u32,
}

impl KeepArgs {
    pub fn policy(&self) -> duplex_types::retention::KeepPolicy {
        duplex_types::retention::KeepPolicy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
        }
    }
}
