//! The raw system calls the agent needs that no safe wrapper offers. All of the agent's
//! `unsafe` lives here.
#![expect(
    unsafe_code,
    reason = "getsockopt(SO_NETNS_COOKIE), BPF_OBJ_GET, BPF_LINK_UPDATE, BPF_PROG_TEST_RUN on a \
              program weft did not load, a hand-assembled probe program and the ethtool ioctls \
              have no safe wrapper"
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
const BPF_PROG_LOAD: libc::c_long = 5;
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

/// Whether this kernel lets a cgroup `connect4` program call `bpf_set_retval` (Linux 5.18+).
pub fn sock_addr_has_set_retval() -> bool {
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    const BPF_FUNC_SET_RETVAL: i32 = 187;
    program_may_call(
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
        BPF_FUNC_SET_RETVAL,
    )
}

/// Whether this kernel lets TC programs read `CLOCK_MONOTONIC_COARSE`
/// (`bpf_ktime_get_coarse_ns`, Linux 5.11+).
pub fn tc_has_coarse_clock() -> bool {
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    const BPF_FUNC_KTIME_GET_COARSE_NS: i32 = 160;
    program_may_call(BPF_PROG_TYPE_SCHED_CLS, 0, BPF_FUNC_KTIME_GET_COARSE_NS)
}

/// Whether a program of `prog_type` (and `expected_attach_type`) may call `helper`: loads a
/// four-instruction program that does, and drops it. Any refusal counts as no.
fn program_may_call(prog_type: u32, expected_attach_type: u32, helper: i32) -> bool {
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    /// One instruction: opcode, registers (dst low nibble, src high), offset, immediate.
    fn insn(code: u8, dst: u8, imm: i32) -> u64 {
        u64::from(code) | (u64::from(dst) << 8) | (u64::from(imm.cast_unsigned()) << 32)
    }
    const MOV64_IMM: u8 = 0xb7;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    // r1 = -ECONNREFUSED (an argument for helpers that take one); call; r0 = 1; exit
    let program = [
        insn(MOV64_IMM, 1, -111),
        insn(CALL, 0, helper),
        insn(MOV64_IMM, 0, 1),
        insn(EXIT, 0, 0),
    ];
    let license = c"GPL";
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        prog_ifindex: 0,
        expected_attach_type,
    };
    bpf(BPF_PROG_LOAD, &mut attr)
        .ok()
        .and_then(|fd| i32::try_from(fd).ok())
        // SAFETY: the kernel just opened `fd` for this process, and nothing else owns it.
        .map(|fd| drop(unsafe { OwnedFd::from_raw_fd(fd) }))
        .is_some()
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
    /// The kernel's own timing of the run.
    pub duration: std::time::Duration,
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
        duration: std::time::Duration::from_nanos(u64::from(attr.duration)),
        data: data_out,
        context: context_out,
    })
}

/// `SIOCETHTOOL` and the ethtool commands used here (`linux/ethtool.h`).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
/// The string set naming the netdev features (`ETH_SS_FEATURES`).
const ETH_SS_FEATURES: u32 = 4;
/// Length of one ethtool string (`ETH_GSTRING_LEN`).
const GSTRING_LEN: usize = 32;

/// Runs the ethtool command in `data` (a buffer starting with its `cmd` word) on `interface`
/// of the calling thread's network namespace.
fn ethtool(interface: &str, data: &mut [u8]) -> io::Result<()> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: u64,
        _pad: [u8; 16],
    }
    let mut name = [0u8; libc::IFNAMSIZ];
    if interface.len() >= name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {interface} is too long"),
        ));
    }
    name[..interface.len()].copy_from_slice(interface.as_bytes());
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let mut request = IfReq {
        name,
        data: data.as_mut_ptr() as u64,
        _pad: [0; 16],
    };
    // SAFETY: `request` is a valid `struct ifreq` whose data pointer addresses `data`, a
    // buffer laid out as the command in its first word expects and long enough for its answer.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &raw mut request) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn word(data: &[u8], index: usize) -> u32 {
    u32::from_ne_bytes(data[index * 4..index * 4 + 4].try_into().expect("4 bytes"))
}

/// The name of the driver behind `interface` (`ethtool -i`: `veth`, `virtio_net`, `mlx5_core`).
pub fn driver(interface: &str) -> io::Result<String> {
    // struct ethtool_drvinfo: cmd, then driver[32], version[32], ... (196 bytes).
    let mut data = [0u8; 196];
    data[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    ethtool(interface, &mut data)?;
    let driver = &data[4..36];
    let end = driver.iter().position(|b| *b == 0).unwrap_or(driver.len());
    Ok(String::from_utf8_lossy(&driver[..end]).into_owned())
}

/// The names of `interface`'s active netdev features (`ethtool -k`: `tx-tcp-segmentation`,
/// `rx-gro-hw`, ...).
pub fn active_features(interface: &str) -> io::Result<Vec<String>> {
    // struct ethtool_sset_info: cmd, reserved, sset_mask (u64), then one u32 per set asked.
    let mut info = [0u8; 20];
    info[..4].copy_from_slice(&ETHTOOL_GSSET_INFO.to_ne_bytes());
    info[8..16].copy_from_slice(&(1u64 << ETH_SS_FEATURES).to_ne_bytes());
    ethtool(interface, &mut info)?;
    let count = word(&info, 4) as usize;
    // struct ethtool_gstrings: cmd, string_set, len, then the strings.
    let mut names = vec![0u8; 12 + count * GSTRING_LEN];
    names[..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
    names[4..8].copy_from_slice(&ETH_SS_FEATURES.to_ne_bytes());
    names[8..12].copy_from_slice(&(count as u32).to_ne_bytes());
    ethtool(interface, &mut names)?;
    // struct ethtool_gfeatures: cmd, size (blocks), then per 32 features: available,
    // requested, active, never_changed.
    let blocks = count.div_ceil(32);
    let mut features = vec![0u8; 8 + blocks * 16];
    features[..4].copy_from_slice(&ETHTOOL_GFEATURES.to_ne_bytes());
    features[4..8].copy_from_slice(&(blocks as u32).to_ne_bytes());
    ethtool(interface, &mut features)?;
    Ok((0..count)
        .filter(|bit| word(&features, 2 + (bit / 32) * 4 + 2) & (1 << (bit % 32)) != 0)
        .map(|bit| {
            let name = &names[12 + bit * GSTRING_LEN..12 + (bit + 1) * GSTRING_LEN];
            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            String::from_utf8_lossy(&name[..end]).into_owned()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_read_through_ethtool() {
        // Every namespace has `lo`; its features include checksum offload.
        let features = super::active_features("lo").expect("ethtool answers for lo");
        assert!(
            features.iter().any(|f| f == "tx-checksum-ip-generic"),
            "{features:?}"
        );
        assert!(super::driver("no-such-interface").is_err());
    }

    #[test]
    fn the_cookie_is_stable_within_a_namespace() {
        let first = super::netns_cookie().expect("SO_NETNS_COOKIE works on this kernel");
        assert_ne!(first, 0);
        assert_eq!(super::netns_cookie().unwrap(), first);
    }
}
