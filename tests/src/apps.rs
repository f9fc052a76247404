//! The workloads test pods run: a tiny HTTP server and a UDP server that answer with the address
//! they serve on and the client address they see, and clients for both. Servers and clients run
//! on threads of this process inside the pod's namespace.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// How long a client waits for a connection or an answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// A server's answer: who served (and on which port), and whom it saw as the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub server: Ipv4Addr,
    pub server_port: u16,
    pub client_seen: SocketAddrV4,
}

impl Answer {
    fn encode(server: SocketAddr, client: SocketAddr) -> String {
        format!("{server} {client}\n")
    }

    /// Parses a server's answer.
    pub fn decode(text: &str) -> io::Result<Self> {
        let invalid = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer {text:?}"),
            )
        };
        let (server, client) = text.trim().split_once(' ').ok_or_else(invalid)?;
        let server: SocketAddrV4 = server.parse().map_err(|_| invalid())?;
        Ok(Self {
            server: *server.ip(),
            server_port: server.port(),
            client_seen: client.parse().map_err(|_| invalid())?,
        })
    }
}

/// A server thread; it stops when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn spawn_server(ns: &Netns, serve: impl FnOnce(&AtomicBool) + Send + 'static) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let path = ns.path();
    let flag = Arc::clone(&stop);
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let thread = thread::spawn(move || {
        let file = std::fs::File::open(path).expect("pod namespace exists");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("entering the pod namespace");
        let _ = bound_tx.send(());
        serve(&flag);
    });
    bound_rx.recv().expect("server thread started");
    Server {
        stop,
        thread: Some(thread),
    }
}

/// Serves HTTP/1.1 with keep-alive on `port` in `ns`: every request gets [`Answer`] as its body.
pub fn serve_http(ns: &Netns, port: u16) -> Server {
    let listener = ns.run(|| bind_http(port)).expect("binding the HTTP server");
    spawn_server(ns, move |stop| http_loop(&listener, stop))
}

fn bind_http(port: u16) -> io::Result<TcpListener> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn http_loop(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                thread::spawn(move || {
                    let _ = answer_http(stream);
                });
            }
            // Nothing to accept yet (or a client that gave up): look again shortly.
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn answer_http(stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = Answer::encode(stream.local_addr()?, stream.peer_addr()?);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        // Read one request: lines up to the blank one.
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
    }
}

/// Answers every datagram on `port` in `ns` with [`Answer`].
pub fn serve_udp(ns: &Netns, port: u16) -> Server {
    let socket = ns.run(|| bind_udp(port)).expect("binding the UDP server");
    spawn_server(ns, move |stop| udp_loop(&socket, stop))
}

fn bind_udp(port: u16) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    Ok(socket)
}

fn udp_loop(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, from)) = socket.recv_from(&mut buf) {
            // The local address of an unconnected socket is 0.0.0.0; ask the routing table which
            // of ours the client reached, by connecting a throwaway socket back.
            let server = UdpSocket::bind("0.0.0.0:0")
                .and_then(|probe| probe.connect(from).and_then(|()| probe.local_addr()))
                .and_then(|probe| Ok(SocketAddr::new(probe.ip(), socket.local_addr()?.port())));
            if let Ok(server) = server {
                let _ = socket.send_to(Answer::encode(server, from).as_bytes(), from);
            }
        }
    }
}

/// Echoes every UDP datagram on `port` in `ns` back to its sender, whole (up to 64 KiB, so a
/// datagram the sender's stack sent in fragments comes back in fragments).
pub fn serve_udp_echo(ns: &Netns, port: u16) -> Server {
    let socket = ns
        .run(|| bind_udp(port))
        .expect("binding the UDP echo server");
    spawn_server(ns, move |stop| {
        let mut buf = vec![0u8; 65_536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((len, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..len], from);
            }
        }
    })
}

/// Sends `request` over a connected UDP socket to `target` and returns the answering datagram
/// (up to 64 KiB), from inside the calling thread's namespace.
pub fn udp_echo(target: SocketAddrV4, request: &[u8]) -> io::Result<Vec<u8>> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.connect(target)?;
    socket.send(request)?;
    let mut buf = vec![0u8; 65_536];
    let len = socket.recv(&mut buf)?;
    buf.truncate(len);
    Ok(buf)
}

/// Serves HTTP and UDP in the calling process's namespace until the process ends: the pod
/// workload as a process of its own (the demo's `--keep` leaves it running).
pub fn serve_forever(http_port: u16, udp_port: u16) -> io::Result<()> {
    let listener = bind_http(http_port)?;
    let socket = bind_udp(udp_port)?;
    let never = AtomicBool::new(false);
    thread::scope(|scope| {
        scope.spawn(|| udp_loop(&socket, &never));
        http_loop(&listener, &never);
    });
    Ok(())
}

/// An HTTP connection that can carry several requests.
pub struct HttpConnection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl HttpConnection {
    /// Connects from inside the calling thread's namespace.
    pub fn open(target: SocketAddrV4) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&target.into(), CLIENT_TIMEOUT)?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Connects from `local`, a port other sockets may share (`SO_REUSEADDR` on each: two
    /// connections from one port to different peers, as the kernel makes them on its own when
    /// its port range runs short).
    pub fn open_from(local: SocketAddrV4, target: SocketAddrV4) -> io::Result<Self> {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket,
            sockopt,
        };
        let socket = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&socket, sockopt::ReuseAddr, &true)?;
        // connect() gives up after the send timeout.
        let timeout = nix::sys::time::TimeVal::new(CLIENT_TIMEOUT.as_secs() as i64, 0);
        setsockopt(&socket, sockopt::SendTimeout, &timeout)?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            &SockaddrIn::from(local),
        )?;
        connect(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            &SockaddrIn::from(target),
        )?;
        let stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// The peer the kernel's socket is connected to (the service address, for a client of one).
    pub fn peer(&self) -> io::Result<SocketAddr> {
        self.writer.peer_addr()
    }

    /// The local address of the connection.
    pub fn local(&self) -> io::Result<SocketAddr> {
        self.writer.local_addr()
    }

    /// One request and its answer.
    pub fn request(&mut self) -> io::Result<Answer> {
        self.writer
            .write_all(b"GET / HTTP/1.1\r\nHost: weft-test\r\n\r\n")?;
        let mut length = None;
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if line == "\r\n" {
                break;
            }
            if let Some(value) = line.strip_prefix("Content-Length: ") {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let mut body = vec![0; length.ok_or(io::ErrorKind::InvalidData)?];
        self.reader.read_exact(&mut body)?;
        Answer::decode(&String::from_utf8_lossy(&body))
    }
}

/// One request on a new connection, from inside the calling thread's namespace.
pub fn http_get(target: SocketAddrV4) -> io::Result<Answer> {
    HttpConnection::open(target)?.request()
}

/// One UDP flow (one socket) sending a datagram every 20 ms from a namespace, recording who
/// answers and when, until dropped.
pub struct UdpFlow {
    started: Instant,
    answers: Arc<Mutex<Vec<(Instant, Ipv4Addr)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpFlow {
    /// Starts the flow from `ns` to `target`.
    #[must_use]
    pub fn start(ns: &Netns, target: SocketAddrV4) -> Self {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let socket = ns
            .run(|| UdpSocket::bind("0.0.0.0:0"))
            .expect("the client socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("a read timeout");
        let (recorded, stopped) = (Arc::clone(&answers), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stopped.load(Ordering::Relaxed) {
                let _ = socket.send_to(b"who?", target);
                if let Ok((len, _)) = socket.recv_from(&mut buf)
                    && let Ok(answer) = Answer::decode(&String::from_utf8_lossy(&buf[..len]))
                {
                    recorded
                        .lock()
                        .expect("answers")
                        .push((Instant::now(), answer.server));
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            started: Instant::now(),
            answers,
            stop,
            thread: Some(thread),
        }
    }

    /// The server of the latest answer.
    #[must_use]
    pub fn last(&self) -> Option<Ipv4Addr> {
        self.answers
            .lock()
            .expect("answers")
            .last()
            .map(|(_, server)| *server)
    }

    /// How many answers came so far.
    #[must_use]
    pub fn answered(&self) -> usize {
        self.answers.lock().expect("answers").len()
    }

    /// The longest time without an answer so far, from the start of the flow until now: how
    /// long the flow was lost, at most.
    #[must_use]
    pub fn longest_silence(&self) -> Duration {
        let answers = self.answers.lock().expect("answers");
        let times: Vec<Instant> = std::iter::once(self.started)
            .chain(answers.iter().map(|(at, _)| *at))
            .chain(std::iter::once(Instant::now()))
            .collect();
        times
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .max()
            .unwrap_or_default()
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One datagram and its answer, from inside the calling thread's namespace; also returns the
/// address the answer came from.
pub fn udp_request(target: SocketAddrV4) -> io::Result<(Answer, SocketAddr)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send_to(b"who?", target)?;
    let mut buf = [0u8; 256];
    let (len, from) = socket.recv_from(&mut buf)?;
    Ok((Answer::decode(&String::from_utf8_lossy(&buf[..len]))?, from))
}

/// One datagram and its answer over a connected socket, from inside the calling thread's
/// namespace: an ICMP port unreachable in reply fails it with `ConnectionRefused`.
pub fn udp_exchange(target: SocketAddrV4) -> io::Result<Answer> {
    udp_exchange_with(target, b"who?")
}

/// [`udp_exchange`] with `request` as the datagram (the server answers any).
pub fn udp_exchange_with(target: SocketAddrV4, request: &[u8]) -> io::Result<Answer> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.connect(target)?;
    socket.send(request)?;
    let mut buf = [0u8; 256];
    let len = socket.recv(&mut buf)?;
    Answer::decode(&String::from_utf8_lossy(&buf[..len]))
}

/// `GET path` on a new connection, from inside the calling thread's namespace: the status
/// code and the body (read to the end of the connection).
pub fn http_status(target: SocketAddrV4, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&target.into(), CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let invalid = || io::Error::new(io::ErrorKind::InvalidData, response.clone());
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(invalid)?;
    let (_, body) = response.split_once("\r\n\r\n").ok_or_else(invalid)?;
    Ok((status, body.to_owned()))
}

/// Receives one bulk TCP stream on `port` in `ns`: returns the byte count and an FNV-1a digest
/// of the bytes, once the sender closes.
pub fn receive_bulk(ns: &Netns, port: u16) -> JoinHandle<io::Result<(u64, u64)>> {
    let listener = ns
        .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        .expect("binding the bulk receiver");
    thread::spawn(move || {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut digest = Fnv::default();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let read = stream.read(&mut buf)?;
            if read == 0 {
                return Ok((total, digest.0));
            }
            digest.feed(&buf[..read]);
            total += read as u64;
        }
    })
}

/// 64 KiB of the deterministic pattern bulk and paced streams send, over and over.
fn pattern() -> Vec<u8> {
    (0..1u32 << 16)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

/// Sends `bytes` of a deterministic pattern to `target` from inside the calling thread's
/// namespace; returns the digest of what was sent.
pub fn send_bulk(target: SocketAddrV4, bytes: u64) -> io::Result<u64> {
    let mut stream = TcpStream::connect_timeout(&target.into(), CLIENT_TIMEOUT)?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut digest = Fnv::default();
    let chunk = pattern();
    let mut left = bytes;
    while left > 0 {
        let take = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..take])?;
        digest.feed(&chunk[..take]);
        left -= take as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    Ok(digest.0)
}

/// FNV-1a, to check a stream arrived byte for byte.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn feed(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// One TCP connection carrying the pattern at a steady pace (8 KiB every 10 ms) from one
/// namespace to another until [`TcpFlow::finish`]: a long-lived stream whose every byte is
/// checked on arrival, and whose longest wait for data is measured.
pub struct TcpFlow {
    stop: Arc<AtomicBool>,
    sender: JoinHandle<io::Result<u64>>,
    receiver: JoinHandle<io::Result<StreamReport>>,
}

/// What the receiving end of a [`TcpFlow`] saw.
#[derive(Clone, Copy, Debug)]
pub struct StreamReport {
    /// Bytes the sender wrote.
    pub sent: u64,
    /// Bytes that arrived, every one as sent (a wrong byte fails the flow).
    pub received: u64,
    /// The longest time the receiver waited for data.
    pub longest_stall: Duration,
}

impl TcpFlow {
    /// Opens the connection from `from` to `to`'s `address:port` and starts sending.
    #[must_use]
    pub fn start(from: &Netns, to: &Netns, address: Ipv4Addr, port: u16) -> Self {
        let listener = to
            .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
            .expect("binding the stream receiver");
        let receiver = thread::spawn(move || receive_paced(&listener));
        let stream = from
            .run(|| {
                TcpStream::connect_timeout(&SocketAddrV4::new(address, port).into(), CLIENT_TIMEOUT)
            })
            .expect("opening the stream");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let sender = thread::spawn(move || send_paced(stream, &stopped));
        Self {
            stop,
            sender,
            receiver,
        }
    }

    /// Stops sending, closes the stream and reports; an error is a broken stream.
    pub fn finish(self) -> io::Result<StreamReport> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.join().expect("the stream sender")?;
        let report = self.receiver.join().expect("the stream receiver")?;
        Ok(StreamReport { sent, ..report })
    }
}

fn send_paced(mut stream: TcpStream, stop: &AtomicBool) -> io::Result<u64> {
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let chunk = pattern();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let at = (sent % chunk.len() as u64) as usize;
        let piece = &chunk[at..(at + 8192).min(chunk.len())];
        stream.write_all(piece)?;
        sent += piece.len() as u64;
        thread::sleep(Duration::from_millis(10));
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    Ok(sent)
}

fn receive_paced(listener: &TcpListener) -> io::Result<StreamReport> {
    let (mut stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let chunk = pattern();
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    let mut longest_stall = Duration::ZERO;
    let mut last = Instant::now();
    loop {
        let read = stream.read(&mut buf)?;
        longest_stall = longest_stall.max(last.elapsed());
        last = Instant::now();
        if read == 0 {
            return Ok(StreamReport {
                sent: 0,
                received,
                longest_stall,
            });
        }
        for (offset, byte) in buf[..read].iter().enumerate() {
            let expected = chunk[((received + offset as u64) % chunk.len() as u64) as usize];
            if *byte != expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("byte {} of the stream differs", received + offset as u64),
                ));
            }
        }
        received += read as u64;
    }
}
