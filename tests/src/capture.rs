//! Capturing frames on a test namespace's interfaces with a raw packet socket, to check what
//! actually goes over the wire.

use std::{
    os::fd::{AsFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use nix::sys::{
    socket::{AddressFamily, SockFlag, SockProtocol, SockType, setsockopt, socket, sockopt},
    time::TimeVal,
};

use crate::netns::Netns;

/// Frames seen on every interface of a namespace, both directions, while it runs.
pub struct Capture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    /// Starts capturing in `ns`, keeping the frames `keep` accepts.
    pub fn start(ns: &Netns, keep: impl Fn(&[u8]) -> bool + Send + 'static) -> Self {
        let socket = ns.run(packet_socket);
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (flag, sink) = (Arc::clone(&stop), Arc::clone(&frames));
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok(len) = nix::unistd::read(socket.as_fd(), &mut buf)
                    && keep(&buf[..len])
                {
                    sink.lock().expect("frames").push(buf[..len].to_vec());
                }
            }
        });
        // Let the socket see traffic before the caller makes any.
        thread::sleep(Duration::from_millis(20));
        Self {
            stop,
            frames,
            thread: Some(thread),
        }
    }

    /// Stops and returns what was kept.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        std::mem::take(&mut self.frames.lock().expect("frames"))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The lengths of the frames `interface` of `ns` sends during `window`, as they leave it (a
/// GSO super-packet counts once, with its whole length; nothing is copied but the length).
#[must_use]
pub fn sent_frame_lengths(ns: &Netns, interface: &str, window: Duration) -> Vec<usize> {
    /// `PACKET_OUTGOING`: a frame the interface sent.
    const OUTGOING: u8 = 4;
    ns.run(|| {
        let index = nix::net::if_::if_nametoindex(interface).expect("the interface exists");
        let socket = packet_socket();
        let mut lengths = Vec::new();
        let mut head = [0u8; 64];
        let started = std::time::Instant::now();
        while started.elapsed() < window {
            let mut iov = [std::io::IoSliceMut::new(&mut head)];
            let Ok(message) = nix::sys::socket::recvmsg::<nix::sys::socket::LinkAddr>(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                &mut iov,
                None,
                nix::sys::socket::MsgFlags::MSG_TRUNC,
            ) else {
                continue;
            };
            let Some(from) = message.address else {
                continue;
            };
            if from.ifindex() == index as usize && from.pkttype() == OUTGOING {
                lengths.push(message.bytes);
            }
        }
        lengths
    })
}

/// A packet socket for every frame of the calling thread's namespace, both directions, whose
/// reads give up after 50 ms.
fn packet_socket() -> OwnedFd {
    let socket = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::EthAll,
    )
    .expect("a packet socket (needs CAP_NET_RAW)");
    setsockopt(&socket, sockopt::ReceiveTimeout, &TimeVal::new(0, 50_000)).expect("socket timeout");
    socket
}

/// Whether a frame is IPv4/UDP to `port` (a VXLAN candidate).
#[must_use]
pub fn is_udp_to(frame: &[u8], port: u16) -> bool {
    frame.len() >= 14 + 20 + 8 && frame[12..14] == [0x08, 0x00] && frame[14 + 9] == 17 && {
        let l4 = 14 + usize::from(frame[14] & 0x0f) * 4;
        frame.get(l4 + 2..l4 + 4) == Some(&port.to_be_bytes()[..])
    }
}
