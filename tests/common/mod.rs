//! Helpers shared by the integration test crates.

/// A loopback port nothing listens on (connection refused), and the socket
/// that keeps it so. The socket is bound and never listens: while it lives, no
/// other test's server can bind the port, and no client connection can pick it
/// as its own end (a self-connect would read its own request back as the
/// answer, a protocol error instead of a refused connection).
pub fn closed_port() -> (u16, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let port = socket.local_addr().expect("addr").port();
    (port, socket)
}
