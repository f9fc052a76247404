//! Load generators, run on a thread inside the client pod's namespace: new TCP connections as
//! fast as one client opens them, and request/response on one established connection. Both run
//! for a fixed time and bound every operation with a timeout.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{bench::quantile, netns::Netns};

/// How long one connect or one answer may take before it counts as failed.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(1);
/// The request and answer size of the request/response load.
const MESSAGE: usize = 64;

/// What a connection-rate run measured.
#[derive(Clone, Copy, Debug)]
pub struct ConnectRate {
    pub per_second: f64,
    /// Connect latency (SYN to established), microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub failures: u64,
}

/// Opens connections to `target` one after another for `duration`, closing each with an RST
/// (no TIME_WAIT, so the run is not limited by ephemeral ports).
#[must_use]
pub fn connect_rate(ns: &Netns, target: SocketAddrV4, duration: Duration) -> ConnectRate {
    ns.run(|| {
        let mut latencies = Vec::new();
        let mut failures = 0;
        let start = Instant::now();
        while start.elapsed() < duration {
            let began = Instant::now();
            match TcpStream::connect_timeout(&target.into(), OPERATION_TIMEOUT) {
                Ok(stream) => {
                    latencies.push(began.elapsed().as_secs_f64() * 1e6);
                    let _ = nix::sys::socket::setsockopt(
                        &stream,
                        nix::sys::socket::sockopt::Linger,
                        &nix::libc::linger {
                            l_onoff: 1,
                            l_linger: 0,
                        },
                    );
                }
                Err(_) => failures += 1,
            }
        }
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let per_second = latencies.len() as f64 / start.elapsed().as_secs_f64();
        ConnectRate {
            per_second,
            p50_us: quantile(&mut latencies, 0.5).unwrap_or(f64::NAN),
            p99_us: quantile(&mut latencies, 0.99).unwrap_or(f64::NAN),
            failures,
        }
    })
}

/// Round trips per second of `MESSAGE`-byte requests and answers on one connection to
/// `target` for `duration`.
pub fn request_rate(ns: &Netns, target: SocketAddrV4, duration: Duration) -> io::Result<f64> {
    ns.run(|| {
        let mut stream = TcpStream::connect_timeout(&target.into(), OPERATION_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(OPERATION_TIMEOUT))?;
        let request = [7u8; MESSAGE];
        let mut answer = [0u8; MESSAGE];
        let mut round_trips = 0u64;
        let start = Instant::now();
        while start.elapsed() < duration {
            stream.write_all(&request)?;
            stream.read_exact(&mut answer)?;
            round_trips += 1;
        }
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        Ok(round_trips as f64 / start.elapsed().as_secs_f64())
    })
}

/// A pod's bench server on `port`: accepts every connection; echoes what each sends back (the
/// request/response load), and lets connection-rate clients go (they reset). Stops when dropped.
pub struct BenchServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BenchServer {
    #[must_use]
    pub fn start(ns: &Netns, port: u16) -> Self {
        let listener = ns
            .run(|| {
                let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
                listener.set_nonblocking(true)?;
                io::Result::Ok(listener)
            })
            .expect("binding the bench server");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        thread::spawn(move || echo(stream));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; MESSAGE];
    while stream.read_exact(&mut buf).is_ok() {
        if stream.write_all(&buf).is_err() {
            return;
        }
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
