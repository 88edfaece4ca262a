//! Where the coordinator's alerts land in tests: a webhook receiver (HTTP,
//! or HTTPS with a certificate of its own) and a real SMTP server
//! (Python's aiosmtpd, writing a maildir).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// The JSON bodies a webhook received, in order.
pub type Posted = Arc<Mutex<Vec<serde_json::Value>>>;

/// A plain-HTTP webhook receiver; its URL and what it received.
pub fn webhook() -> (String, Posted) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = Posted::default();
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            receive(&mut conn, &sink);
        }
    });
    (url, got)
}

/// An HTTPS webhook receiver with a self-signed certificate for
/// 127.0.0.1, written to `dir/webhook-ca.pem` for `--webhook-ca`; its URL,
/// that file and what it received.
pub fn https_webhook(dir: &Path) -> (String, PathBuf, Posted) {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let ca = dir.join("webhook-ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://127.0.0.1:{}/hook", listener.local_addr().unwrap().port());
    let got = Posted::default();
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { continue };
            let Ok(tls) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut stream = rustls::StreamOwned::new(tls, tcp);
            receive(&mut stream, &sink);
            stream.conn.send_close_notify();
            let _ = stream.flush();
        }
    });
    (url, ca, got)
}

/// Reads one request (headers, then content-length bytes of body),
/// answers 204 and keeps the body if it is JSON.
fn receive(conn: &mut impl ReadWrite, sink: &Posted) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let body = loop {
        let Ok(n) = conn.read(&mut chunk) else { break None };
        if n == 0 {
            break None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= len {
                break Some(body[..len].to_owned());
            }
        }
    };
    let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    if let Some(v) = body.and_then(|b| serde_json::from_str(&b).ok()) {
        sink.lock().unwrap().push(v);
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A real SMTP server on loopback (aiosmtpd from PyPI) delivering into a
/// maildir; stopped on drop.
pub struct SmtpSink {
    child: Child,
    pub url: String,
    maildir: PathBuf,
}

impl SmtpSink {
    /// Starts it, or says why not: CI installs aiosmtpd and sets
    /// DUPLEX_REQUIRE_AIOSMTPD so it cannot be skipped there.
    pub fn start(dir: &Path) -> Option<SmtpSink> {
        let probe = Command::new("python3").args(["-c", "import aiosmtpd"]).status();
        if !probe.is_ok_and(|s| s.success()) {
            assert!(
                std::env::var_os("DUPLEX_REQUIRE_AIOSMTPD").is_none(),
                "aiosmtpd is not installed (pip install aiosmtpd)"
            );
            eprintln!("aiosmtpd not installed; skipping the email checks");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // aiosmtpd creates the maildir itself, and only if it is absent.
        let maildir = dir.join("maildir");
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        crate::wait_for(
            "the SMTP sink to listen",
            std::time::Duration::from_secs(20),
            || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
        );
        Some(SmtpSink {
            child,
            url: format!("smtp://127.0.0.1:{port}"),
            maildir,
        })
    }

    /// Every message delivered so far, as text.
    pub fn messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.maildir.join("new")) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
