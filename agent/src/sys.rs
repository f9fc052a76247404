//! The raw system calls the agent needs that no safe wrapper offers. All of the agent's
//! `unsafe` lives here.
#![expect(
    unsafe_code,
    reason = "getsockopt(SO_NETNS_COOKIE), BPF_OBJ_GET, BPF_LINK_UPDATE and BPF_PROG_TEST_RUN \
              on a program weft did not load have no safe wrapper"
)]

use std::{
    ffi::CString,
    io,
    net::UdpSocket,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

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

/// `bpf(2)`'s command numbers (`enum bpf_cmd` in `linux/bpf.h`).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `command`, valid for the
    // size passed; the kernel zero-extends a shorter attr.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned BPF object (a link, here) by its bpffs path.
pub fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("BPF_OBJ_GET returned no fd"))?;
    // SAFETY: the kernel just opened `fd` for this process, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Swaps the program a link runs for `program`, atomically: packets see the old program or
/// the new one, never none.
pub fn bpf_link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let fd = |fd: BorrowedFd<'_>| fd.as_raw_fd().cast_unsigned();
    let mut attr = LinkUpdate {
        link_fd: fd(link),
        new_prog_fd: fd(program),
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// What one `BPF_PROG_TEST_RUN` gave back.
pub struct TestRun {
    pub return_value: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
    /// The context as the program left it (empty when none was passed).
    pub context: Vec<u8>,
}

/// Runs `program` (any loaded program, by fd) once on `data`, with `context` as its context
/// (`struct __sk_buff` for TC; none for XDP). Maps are the program's own: a live program's
/// live maps.
pub fn bpf_prog_test_run(
    program: BorrowedFd<'_>,
    data: &[u8],
    context: Option<&[u8]>,
) -> io::Result<TestRun> {
    #[repr(C)]
    struct Test {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    let too_long = |_| io::Error::new(io::ErrorKind::InvalidInput, "test run input too long");
    // Room for what the program may add (VXLAN: 50 bytes).
    let mut data_out = vec![0u8; data.len() + 256];
    let mut context_out = vec![0u8; context.map_or(0, <[u8]>::len)];
    let mut attr = Test {
        prog_fd: program.as_raw_fd().cast_unsigned(),
        retval: 0,
        data_size_in: u32::try_from(data.len()).map_err(too_long)?,
        data_size_out: u32::try_from(data_out.len()).map_err(too_long)?,
        data_in: data.as_ptr() as u64,
        data_out: data_out.as_mut_ptr() as u64,
        repeat: 1,
        duration: 0,
        ctx_size_in: u32::try_from(context_out.len()).map_err(too_long)?,
        ctx_size_out: u32::try_from(context_out.len()).map_err(too_long)?,
        ctx_in: context.map_or(0, |context| context.as_ptr() as u64),
        ctx_out: if context.is_some() {
            context_out.as_mut_ptr() as u64
        } else {
            0
        },
        flags: 0,
        cpu: 0,
        batch_size: 0,
        _pad: 0,
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    data_out.truncate(attr.data_size_out as usize);
    context_out.truncate(attr.ctx_size_out as usize);
    Ok(TestRun {
        return_value: attr.retval,
        data: data_out,
        context: context_out,
    })
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
