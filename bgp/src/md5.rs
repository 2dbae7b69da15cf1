//! TCP MD5 signatures (RFC 2385) through `setsockopt(TCP_MD5SIG)`.
//!
//! No crate in the tree wraps this option, and the kernel wants a
//! `struct tcp_md5sig` holding the peer's address: set it on the listening
//! socket once per peer, and on each connecting socket before `connect`.

#![allow(unsafe_code)]

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;

/// The kernel's `struct tcp_md5sig` (include/uapi/linux/tcp.h).
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: u32,
    key: [u8; libc::TCP_MD5SIG_MAXKEYLEN],
}

/// Sets (or, with an empty key, removes) the MD5 key used with `peer` on
/// socket `fd`.
pub fn set_md5_key(fd: RawFd, peer: Ipv4Addr, key: &[u8]) -> io::Result<()> {
    if key.len() > libc::TCP_MD5SIG_MAXKEYLEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "TCP MD5 key longer than 80 octets",
        ));
    }
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
    let sin =
        unsafe { &mut *(&mut sig.addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_addr.s_addr = u32::from(peer).to_be();
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: fd is a socket owned by the caller; sig lives across the call
    // and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&sig as *const TcpMd5Sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
