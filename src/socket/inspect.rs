//! Identifying a socket the broker did not make (from systemd, its fd store,
//! or another process) from the kernel alone, so it is held under the key a
//! client would ask for: [`inspect`] reads its family, type, listening state
//! and bound address.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{sockopt, SockType, SockaddrStorage};

use crate::spec::{SocketKey, Transport, UnixKind};

/// Why a descriptor is not a socket the broker can hold.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The descriptor is a file, pipe or anything but a socket.
    #[error("not a socket")]
    NotASocket,
    /// A family or type the broker does not broker (netlink, raw, …).
    #[error("unsupported socket ({0})")]
    Unsupported(String),
    /// A stream or seqpacket socket that does not listen: it cannot be
    /// shared by accept()ing processes.
    #[error("{0}: a {1} socket that is not listening")]
    NotListening(SocketKey, &'static str),
    /// Not bound to an address anyone could name.
    #[error("not bound to a usable address: {0}")]
    Unbound(#[source] crate::spec::SpecError),
    /// The kernel refused to say.
    #[error("{what}: {source}")]
    Io {
        /// The query that failed.
        what: &'static str,
        /// The kernel's reason.
        #[source]
        source: io::Error,
    },
}

/// Identifies an existing socket from the kernel alone: family, type,
/// whether it listens (`SO_ACCEPTCONN`) and its bound address
/// (`getsockname`, a path or an abstract name for UNIX sockets). Used for
/// descriptors the broker did not make (from systemd or its fd store), so
/// they are held under the key a client would ask for.
pub fn inspect(fd: BorrowedFd<'_>) -> Result<SocketKey, InspectError> {
    let io = |what| move |e: nix::Error| InspectError::Io { what, source: e.into() };
    let st = nix::sys::stat::fstat(fd).map_err(io("fstat()"))?;
    if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFSOCK {
        return Err(InspectError::NotASocket);
    }
    let ty = nix::sys::socket::getsockopt(&fd, sockopt::SockType).map_err(|e| match e {
        nix::errno::Errno::EINVAL => InspectError::Unsupported("unknown socket type".into()),
        e => io("SO_TYPE")(e),
    })?;
    let listening = nix::sys::socket::getsockopt(&fd, sockopt::AcceptConn).map_err(io("SO_ACCEPTCONN"))?;
    let addr: SockaddrStorage = nix::sys::socket::getsockname(fd.as_raw_fd()).map_err(io("getsockname()"))?;
    let (key, type_name) = if let Some(v4) = addr.as_sockaddr_in() {
        let sa = std::net::SocketAddr::V4(std::net::SocketAddrV4::new(v4.ip(), v4.port()));
        inet_key(ty, sa)?
    } else if let Some(v6) = addr.as_sockaddr_in6() {
        let sa =
            std::net::SocketAddr::V6(std::net::SocketAddrV6::new(v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id()));
        inet_key(ty, sa)?
    } else if let Some(unix) = addr.as_unix_addr() {
        let (kind, type_name) = match ty {
            SockType::Stream => (UnixKind::Stream, "UNIX stream"),
            SockType::Datagram => (UnixKind::Datagram, "UNIX datagram"),
            SockType::SeqPacket => (UnixKind::SeqPacket, "UNIX seqpacket"),
            other => return Err(InspectError::Unsupported(format!("UNIX {other:?}"))),
        };
        let text = if let Some(path) = unix.path() {
            path.to_string_lossy().into_owned()
        } else if let Some(name) = unix.as_abstract() {
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| InspectError::Unsupported("UNIX abstract name that is not UTF-8".into()))?;
            format!("@{name}")
        } else {
            String::new()
        };
        (SocketKey::unix(kind, &text).map_err(InspectError::Unbound)?, type_name)
    } else {
        use nix::sys::socket::SockaddrLike;
        return Err(InspectError::Unsupported(format!("family {:?}", addr.family())));
    };
    if key.is_listening_kind() && !listening {
        return Err(InspectError::NotListening(key, type_name));
    }
    Ok(key)
}

/// Whether a socket is connected to a peer (`getpeername` succeeds): a
/// connected datagram socket is a client's, not a service's, and is never
/// adopted.
pub fn is_connected(fd: BorrowedFd<'_>) -> bool {
    nix::sys::socket::getpeername::<SockaddrStorage>(fd.as_raw_fd()).is_ok()
}

fn inet_key(ty: SockType, addr: std::net::SocketAddr) -> Result<(SocketKey, &'static str), InspectError> {
    let (transport, name) = match ty {
        SockType::Stream => (Transport::Tcp, "TCP"),
        SockType::Datagram => (Transport::Udp, "UDP"),
        other => return Err(InspectError::Unsupported(format!("IP {other:?}"))),
    };
    // SocketKey::inet makes the key canonical, as for every other source.
    Ok((SocketKey::inet(transport, addr).map_err(InspectError::Unbound)?, name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::open;
    use crate::spec::SocketSpec;
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn inspect_finds_the_key_of_every_kind() {
        let dir = std::env::temp_dir().join(format!("sockbroker-inspect-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let uport = std::net::UdpSocket::bind("[::1]:0").unwrap().local_addr().unwrap().port();
        let texts = [
            format!("tcp://127.0.0.1:{port}"),
            format!("udp://[::1]:{uport}"),
            format!("unix:{}/s", dir.display()),
            format!("unix-dgram:{}/d", dir.display()),
            format!("unix-seqpacket:@sockbroker-inspect-{}", std::process::id()),
        ];
        for text in texts {
            let spec: SocketSpec = text.parse().unwrap();
            let fd = open(&spec).unwrap();
            assert_eq!(inspect(fd.as_fd()).unwrap(), spec.key, "{text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn inspect_refuses_what_cannot_be_shared() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(inspect(file.as_fd()), Err(InspectError::NotASocket)));
        // Bound but not listening.
        let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        bind(fd.as_raw_fd(), &SockaddrStorage::from("127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap())).unwrap();
        let err = inspect(fd.as_fd()).unwrap_err();
        assert!(matches!(err, InspectError::NotListening(..)), "{err}");
        assert!(err.to_string().contains("not listening"), "{err}");
        // Connected, unnamed.
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(inspect(a.as_fd()), Err(InspectError::Unbound(_))));
    }
}
