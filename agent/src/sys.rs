//! The raw system calls the agent needs that no safe wrapper offers. All of the agent's
//! `unsafe` lives here.
#![expect(
    unsafe_code,
    reason = "getsockopt(SO_NETNS_COOKIE) has no safe wrapper in nix or std"
)]

use std::{io, net::UdpSocket, os::fd::AsRawFd as _};

/// The cookie of the calling thread's network namespace (what `bpf_get_netns_cookie()` returns
/// for sockets in it). Needs Linux 5.14 or later.
pub fn netns_cookie() -> io::Result<u64> {
    // Any socket will do: the cookie belongs to the namespace it was created in.
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes and `len` holds the size of `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cookie_is_stable_within_a_namespace() {
        let first = super::netns_cookie().expect("SO_NETNS_COOKIE works on this kernel");
        assert_ne!(first, 0);
        assert_eq!(super::netns_cookie().unwrap(), first);
    }
}
