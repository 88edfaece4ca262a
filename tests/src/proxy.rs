//! A small fault-injecting TCP proxy: passes bytes through, or corrupts
//! the first occurrence of a marker in either direction, or cuts
//! every connection and refuses new ones (a partition).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
pub enum Fault {
    Pass,
    /// Flip the last byte of the first occurrence of the marker, whichever
    /// way it travels.
    CorruptOnce(Vec<u8>),
    /// Drop every connection and refuse new ones.
    Partition,
    /// Keep connections open but deliver nothing either way until the
    /// fault changes (then everything held is delivered, as TCP would
    /// after a network heals): calls hang rather than fail.
    Blackhole,
}

struct State {
    fault: Mutex<Fault>,
    conns: Mutex<Vec<TcpStream>>,
    corrupted: Mutex<u32>,
}

pub struct Proxy {
    pub addr: String,
    state: Arc<State>,
}

impl Proxy {
    pub fn start(target: &str) -> Proxy {
        // The proxy passes bytes through, TLS or not: its address keeps the scheme.
        let (scheme, host) = target.split_once("://").unwrap_or(("http", target));
        let target: SocketAddr = host.parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("{scheme}://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            fault: Mutex::new(Fault::Pass),
            conns: Mutex::new(Vec::new()),
            corrupted: Mutex::new(0),
        });
        let accept_state = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if matches!(*accept_state.fault.lock().unwrap(), Fault::Partition) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut conns = accept_state.conns.lock().unwrap();
                    conns.push(client.try_clone().unwrap());
                    conns.push(server.try_clone().unwrap());
                }
                let (up, down) = (accept_state.clone(), accept_state.clone());
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(client, server, &up));
                std::thread::spawn(move || pump(s2, c2, &down));
            }
        });
        Proxy { addr, state }
    }

    pub fn set(&self, fault: Fault) {
        let partition = matches!(fault, Fault::Partition);
        *self.state.fault.lock().unwrap() = fault;
        if partition {
            for c in self.state.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }

    /// How many times a marker was corrupted.
    pub fn corrupted(&self) -> u32 {
        *self.state.corrupted.lock().unwrap()
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, state: &State) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while matches!(*state.fault.lock().unwrap(), Fault::Blackhole) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        corrupt_marker(state, &mut tail, &mut buf[..n]);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn corrupt_marker(state: &State, tail: &mut Vec<u8>, buf: &mut [u8]) {
    let mut fault = state.fault.lock().unwrap();
    let Fault::CorruptOnce(marker) = &*fault else {
        return;
    };
    let marker = marker.clone();
    let mut joined = tail.clone();
    joined.extend_from_slice(buf);
    if let Some(i) = joined.windows(marker.len()).position(|w| w == marker.as_slice()) {
        let last = i + marker.len() - 1;
        if last >= tail.len() {
            buf[last - tail.len()] ^= 0xff;
            *fault = Fault::Pass;
            *state.corrupted.lock().unwrap() += 1;
        }
    }
    let keep = marker.len().saturating_sub(1).min(joined.len());
    *tail = joined[joined.len() - keep..].to_vec();
}
