//! The bench's load generator, in its own small processes (`weft-load`, see `src/bin`) so the
//! generator never shares a CPU or a scheduler queue with what it measures: an epoll server that
//! accepts every connection and echoes what it is sent, an epoll client that keeps `concurrency`
//! new connections in flight, and a request/response client on one connection. This module holds
//! the loops and the figures they give; [`Child`] runs them pinned inside a namespace.

use std::{
    collections::BTreeMap,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    errno::Errno,
    sys::{
        epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags},
        socket::{
            AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, accept4, bind, connect, listen,
            setsockopt, socket,
            sockopt::{Linger, ReuseAddr, SocketError},
        },
    },
};
use serde::{Deserialize, Serialize};

use weft_tests::netns::Netns;

use crate::quantile;

/// How long one connect or one answer may take before it counts as failed.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(1);
/// The request and answer size of the request/response load.
const MESSAGE: usize = 64;
/// The server's accept queue: far above what 64 connections in flight can fill.
const BACKLOG: i32 = 4096;

/// What a connection-rate run measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectRate {
    /// Connections established (and closed) in the measured window.
    pub connections: u64,
    pub seconds: f64,
    /// Connect latency (connect() to established), microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    /// A connection's whole life in the client: socket() to the RST sent, microseconds.
    pub mean_lifetime_us: f64,
    /// Failed connects by cause ("timeout" for one that took over [`OPERATION_TIMEOUT`]).
    pub errors: BTreeMap<String, u64>,
    /// The client's own CPU time (user + system), seconds.
    pub client_cpu_seconds: f64,
}

impl ConnectRate {
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    pub fn per_second(&self) -> f64 {
        self.connections as f64 / self.seconds
    }

    #[must_use]
    pub fn failures(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Little's law: with `concurrency` connections always open, the rate must be
    /// concurrency / their mean lifetime. A rate more than 15 % off means the client spent its
    /// time between connections (its own loop), so the figure is the generator's.
    #[must_use]
    pub fn generator_bound(&self, concurrency: u32) -> bool {
        let expected = f64::from(concurrency) / (self.mean_lifetime_us * 1e-6);
        let rate = self.per_second();
        !(rate.is_finite() && expected.is_finite()) || (rate - expected).abs() > 0.15 * expected
    }
}

/// A listening socket (non-blocking, `SO_REUSEADDR`) on `port` of every local address.
pub fn listener(port: u16) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, ReuseAddr, &true)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
    )?;
    listen(&fd, Backlog::new(BACKLOG)?)?;
    Ok(fd)
}

/// Serves `listener` until the process ends: accepts every connection at once and echoes what
/// each sends; a connection that closes or resets is closed. One thread, one epoll set.
pub fn serve(listener: &OwnedFd) -> io::Result<()> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let listening = u64::MAX;
    epoll.add(
        listener.as_fd(),
        EpollEvent::new(EpollFlags::EPOLLIN, listening),
    )?;
    let mut connections: BTreeMap<u64, OwnedFd> = BTreeMap::new();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buffer = [0u8; MESSAGE * 16];
    loop {
        let ready = match epoll.wait(&mut events, 1000u16) {
            Err(Errno::EINTR) => continue,
            other => other?,
        };
        for event in &events[..ready] {
            let data = event.data();
            if data == listening {
                loop {
                    match accept4(
                        listener.as_raw_fd(),
                        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                    ) {
                        Ok(raw) => {
                            // SAFETY: accept4 returned a new descriptor that nothing else owns.
                            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                            let key = u64::try_from(raw).expect("descriptors are positive");
                            epoll.add(
                                fd.as_fd(),
                                EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, key),
                            )?;
                            connections.insert(key, fd);
                        }
                        Err(Errno::EAGAIN | Errno::ECONNABORTED | Errno::EINTR) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                continue;
            }
            let Some(fd) = connections.get(&data) else {
                continue;
            };
            if !echo_available(fd, &mut buffer) {
                // Dropping the descriptor closes it and takes it out of the epoll set.
                connections.remove(&data);
            }
        }
    }
}

/// Echoes what `fd` has to read; false once it is closed or failed.
fn echo_available(fd: &OwnedFd, buffer: &mut [u8]) -> bool {
    loop {
        match nix::unistd::read(fd, buffer) {
            Ok(0) => return false,
            Ok(n) => {
                // A few small messages always fit the socket's send buffer.
                if nix::unistd::write(fd, &buffer[..n]).is_err() {
                    return false;
                }
            }
            Err(Errno::EAGAIN) => return true,
            Err(Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
}

/// One connect in flight.
struct Attempt {
    fd: OwnedFd,
    started: Instant,
}

/// New connections to `target` with `concurrency` connects always in flight, for `duration`.
/// Each connection is closed with an RST as soon as it is
/// established (no TIME_WAIT, so ephemeral ports never run out); a failed or timed-out connect
/// is counted by cause and replaced at once.
pub fn connect_rate(
    target: SocketAddrV4,
    concurrency: u32,
    duration: Duration,
) -> io::Result<ConnectRate> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let address = SockaddrIn::from(target);
    let slots = usize::try_from(concurrency).expect("a small concurrency");
    let mut in_flight: Vec<Option<Attempt>> = (0..slots).map(|_| None).collect();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut latencies: Vec<f64> = Vec::new();
    let mut lifetimes_us = 0.0;
    let mut events = vec![EpollEvent::empty(); slots];
    let cpu_before = cpu_seconds()?;
    let began = Instant::now();
    let mut last_timeout_scan = began;
    for slot in 0..slots {
        start(&epoll, &address, slot, &mut in_flight, &mut errors)?;
    }
    loop {
        let now = Instant::now();
        if now.duration_since(began) >= duration {
            break;
        }
        let ready = match epoll.wait(&mut events, 10u16) {
            Err(Errno::EINTR) => continue,
            other => other?,
        };
        for event in &events[..ready] {
            let slot = usize::try_from(event.data()).expect("slot indices are small");
            let Some(attempt) = in_flight[slot].take() else {
                continue;
            };
            match connect_result(&attempt.fd) {
                Ok(()) => {
                    let latency = attempt.started.elapsed();
                    // An RST on close: the connection is gone at once on both sides.
                    let _ = setsockopt(
                        &attempt.fd,
                        Linger,
                        &nix::libc::linger {
                            l_onoff: 1,
                            l_linger: 0,
                        },
                    );
                    let started = attempt.started;
                    drop(attempt);
                    latencies.push(latency.as_secs_f64() * 1e6);
                    lifetimes_us += started.elapsed().as_secs_f64() * 1e6;
                }
                Err(cause) => *errors.entry(cause).or_default() += 1,
            }
            start(&epoll, &address, slot, &mut in_flight, &mut errors)?;
        }
        if now.duration_since(last_timeout_scan) >= Duration::from_millis(10) {
            last_timeout_scan = now;
            for slot in 0..slots {
                if in_flight[slot]
                    .as_ref()
                    .is_some_and(|a| a.started.elapsed() >= OPERATION_TIMEOUT)
                {
                    in_flight[slot] = None;
                    *errors.entry("timeout".to_owned()).or_default() += 1;
                    start(&epoll, &address, slot, &mut in_flight, &mut errors)?;
                }
            }
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let count = latencies.len().max(1) as f64;
    let mean_us = latencies.iter().sum::<f64>() / count;
    Ok(ConnectRate {
        connections: latencies.len() as u64,
        seconds,
        p50_us: quantile(&mut latencies, 0.5).unwrap_or(f64::NAN),
        p99_us: quantile(&mut latencies, 0.99).unwrap_or(f64::NAN),
        mean_us,
        mean_lifetime_us: lifetimes_us / count,
        errors,
        client_cpu_seconds: cpu_seconds()? - cpu_before,
    })
}

/// Opens a non-blocking connect in `slot`. A connect refused before it even leaves (no route,
/// no local port) is counted and the slot tried again on the next round of the loop.
fn start(
    epoll: &Epoll,
    address: &SockaddrIn,
    slot: usize,
    in_flight: &mut [Option<Attempt>],
    errors: &mut BTreeMap<String, u64>,
) -> io::Result<()> {
    let started = Instant::now();
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match connect(fd.as_raw_fd(), address) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => *errors.entry(e.desc().to_owned()).or_default() += 1,
    }
    epoll.add(
        fd.as_fd(),
        EpollEvent::new(
            EpollFlags::EPOLLOUT | EpollFlags::EPOLLONESHOT,
            u64::try_from(slot).expect("slot indices are small"),
        ),
    )?;
    in_flight[slot] = Some(Attempt { fd, started });
    Ok(())
}

/// The result of a non-blocking connect, `Err` naming its cause.
fn connect_result(fd: &OwnedFd) -> Result<(), String> {
    match nix::sys::socket::getsockopt(fd, SocketError) {
        Ok(0) => Ok(()),
        Ok(errno) => Err(Errno::from_raw(errno).desc().to_owned()),
        Err(e) => Err(e.desc().to_owned()),
    }
}

/// This process's CPU time so far (user + system), seconds.
fn cpu_seconds() -> io::Result<f64> {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    let seconds = |t: nix::sys::time::TimeVal| {
        #[expect(clippy::cast_precision_loss, reason = "CPU seconds are small")]
        let whole = t.tv_sec() as f64;
        whole + f64::from(u32::try_from(t.tv_usec()).unwrap_or(0)) * 1e-6
    };
    Ok(seconds(usage.user_time()) + seconds(usage.system_time()))
}

/// What a request/response run measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRate {
    pub round_trips: u64,
    pub seconds: f64,
    /// Why the run stopped early, if it did.
    pub error: Option<String>,
}

impl RequestRate {
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    pub fn per_second(&self) -> f64 {
        self.round_trips as f64 / self.seconds
    }
}

/// Round trips of `MESSAGE`-byte requests and answers on one connection to `target` for
/// `duration`.
#[must_use]
pub fn request_rate(target: SocketAddrV4, duration: Duration) -> RequestRate {
    let mut result = RequestRate::default();
    let run = |result: &mut RequestRate| -> io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&target.into(), OPERATION_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(OPERATION_TIMEOUT))?;
        let request = [7u8; MESSAGE];
        let mut answer = [0u8; MESSAGE];
        let began = Instant::now();
        while began.elapsed() < duration {
            stream.write_all(&request)?;
            stream.read_exact(&mut answer)?;
            result.round_trips += 1;
            result.seconds = began.elapsed().as_secs_f64();
        }
        Ok(())
    };
    if let Err(e) = run(&mut result) {
        result.error = Some(e.to_string());
    }
    result
}

/// A `weft-load` process inside a namespace, pinned to one CPU; killed when dropped.
pub struct Child {
    child: std::process::Child,
}

impl Child {
    /// The `weft-load` program beside the running one.
    fn program() -> anyhow::Result<PathBuf> {
        let exe = std::env::current_exe().context("finding the bench's own path")?;
        let program = exe.with_file_name("weft-load");
        if !program.exists() {
            bail!(
                "{} is missing: build the tests crate's programs (cargo build -p weft-tests --bins)",
                program.display()
            );
        }
        Ok(program)
    }

    fn spawn(ns: &Netns, cpu: usize, args: &[String]) -> anyhow::Result<Self> {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(["taskset", "-c", &cpu.to_string()])
            .arg(Self::program()?)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting weft-load")?;
        Ok(Self { child })
    }

    /// A server on `port` in `ns`, on `cpu`; returns once it listens.
    pub fn server(ns: &Netns, cpu: usize, port: u16) -> anyhow::Result<Self> {
        let mut server = Self::spawn(ns, cpu, &["serve".into(), port.to_string()])?;
        let stdout = server.child.stdout.take().context("the server's output")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "listening" {
            bail!("weft-load serve {port} in {} did not start", ns.name());
        }
        Ok(server)
    }

    /// A connection-rate run from `ns` on `cpu`.
    pub fn connect_rate(
        ns: &Netns,
        cpu: usize,
        target: SocketAddrV4,
        concurrency: u32,
        duration: Duration,
    ) -> anyhow::Result<ConnectRate> {
        let args = [
            "connect".into(),
            target.to_string(),
            concurrency.to_string(),
            duration.as_secs_f64().to_string(),
        ];
        Self::spawn(ns, cpu, &args)?.result()
    }

    /// A request/response run from `ns` on `cpu`.
    pub fn request_rate(
        ns: &Netns,
        cpu: usize,
        target: SocketAddrV4,
        duration: Duration,
    ) -> anyhow::Result<RequestRate> {
        let args = [
            "requests".into(),
            target.to_string(),
            duration.as_secs_f64().to_string(),
        ];
        Self::spawn(ns, cpu, &args)?.result()
    }

    /// The JSON line a client prints when it is done.
    fn result<T: for<'de> Deserialize<'de>>(mut self) -> anyhow::Result<T> {
        let mut output = String::new();
        self.child
            .stdout
            .take()
            .context("the client's output")?
            .read_to_string(&mut output)?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("weft-load {status}: {output}");
        }
        serde_json::from_str(output.trim()).with_context(|| format!("weft-load printed {output:?}"))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    fn server_on_loopback() -> SocketAddrV4 {
        let fd = listener(0).unwrap();
        let local: SockaddrIn = nix::sys::socket::getsockname(fd.as_raw_fd()).unwrap();
        thread::spawn(move || serve(&fd));
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, local.port())
    }

    #[test]
    fn the_client_keeps_its_connects_in_flight_and_counts_them() {
        let target = server_on_loopback();
        let rate = connect_rate(target, 4, Duration::from_millis(400)).unwrap();
        assert!(rate.connections > 100, "{rate:?}");
        assert_eq!(rate.failures(), 0, "{rate:?}");
        assert!(rate.p50_us <= rate.p99_us, "{rate:?}");
        assert!(rate.seconds >= 0.4, "{rate:?}");
        let requests = request_rate(target, Duration::from_millis(200));
        assert_eq!(requests.error, None);
        assert!(requests.round_trips > 100, "{requests:?}");
    }

    #[test]
    fn refused_connects_are_counted_by_cause() {
        // A port nothing listens on: every connect is refused.
        let fd = listener(0).unwrap();
        let local: SockaddrIn = nix::sys::socket::getsockname(fd.as_raw_fd()).unwrap();
        drop(fd);
        let target = SocketAddrV4::new(Ipv4Addr::LOCALHOST, local.port());
        let rate = connect_rate(target, 2, Duration::from_millis(100)).unwrap();
        assert_eq!(rate.connections, 0);
        assert!(
            rate.errors.get("Connection refused").copied().unwrap_or(0) > 10,
            "{rate:?}"
        );
    }

    #[test]
    fn little_s_law_marks_a_rate_the_generator_set() {
        let rate = |connections, mean_lifetime_us| ConnectRate {
            connections,
            seconds: 1.0,
            mean_lifetime_us,
            ..ConnectRate::default()
        };
        // 8 in flight at 400 µs each: 20,000/s.
        assert!(!rate(20_000, 400.0).generator_bound(8));
        assert!(!rate(17_500, 400.0).generator_bound(8));
        assert!(rate(5_000, 400.0).generator_bound(8));
        assert!(rate(0, 0.0).generator_bound(1));
    }
}
