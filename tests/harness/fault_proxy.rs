//! A TCP fault proxy on loopback: it sits in front of one upstream (etcd) for one client process
//! (a manager), so a campaign can cut, slow down or partition that manager from etcd while the
//! other manager still reaches it.
//!
//! Hand-written rather than a crate: toxiproxy is a separate server driven over HTTP, and the
//! proxy crates forward without switching behaviour at runtime; what is needed here is ~200 lines
//! of tokio where every connection task watches one `tokio::sync::watch` of the [`Mode`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep_until};

/// What the proxy does to traffic; applies at once to open connections and new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Reset every open connection, and reset each new one at once (the client sees its
    /// connection reset or closed).
    Cut,
    /// Forward both ways with each chunk held back by the duration from when it was read (a slow
    /// network: a chunk is read once the one before is written, so a round trip takes at least
    /// twice the delay).
    Delay(Duration),
    /// Keep connections open but forward nothing either way; new connections are accepted but
    /// get nothing (a partition where packets vanish). Held bytes stay queued: on a switch back to
    /// `Pass` (or `Delay`), connections opened before or during the blackhole resume, like TCP
    /// after a healed partition, unless their client gave up on them meanwhile.
    Blackhole,
}

/// A running fault proxy on `127.0.0.1`. Dropping it stops the listener and every connection.
/// Start it inside a tokio runtime.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards each connection to `upstream`, starting in
    /// [`Mode::Pass`].
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(Mode::Pass);
        let accept = tokio::spawn(accept_loop(listener, upstream, rx));
        Ok(FaultProxy { addr, mode, accept })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for an etcd endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches the mode, for open connections too.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // the accept task owns the connection tasks (a `JoinSet`): aborting it aborts them all
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, mode: watch::Receiver<Mode>) {
    let mut connections = JoinSet::new();
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // out of file descriptors or the like: retry soon
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if *mode.borrow() == Mode::Cut {
            let _ = client.set_zero_linger();
            continue;
        }
        connections.spawn(serve(client, upstream, mode.clone()));
    }
}

/// Waits out a blackhole; false when the connection must close (a cut, or the proxy is gone).
async fn wait_open(mode: &mut watch::Receiver<Mode>) -> bool {
    loop {
        match *mode.borrow_and_update() {
            Mode::Cut => return false,
            Mode::Blackhole => {}
            Mode::Pass | Mode::Delay(_) => return true,
        }
        if mode.changed().await.is_err() {
            return false;
        }
    }
}

/// Returns once the mode is `Cut` or the proxy is gone.
async fn until_cut(mode: &mut watch::Receiver<Mode>) {
    while *mode.borrow_and_update() != Mode::Cut {
        if mode.changed().await.is_err() {
            return;
        }
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let _ = client.set_nodelay(true);
    // a new connection in a blackhole gets nothing: upstream is dialed only once it is over
    if !wait_open(&mut mode).await {
        let _ = client.set_zero_linger();
        return;
    }
    let upstream = tokio::select! {
        connected = TcpStream::connect(upstream) => connected,
        () = until_cut(&mut mode) => {
            let _ = client.set_zero_linger();
            return;
        }
    };
    let Ok(upstream) = upstream else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    tokio::join!(pump(client_read, upstream_write, mode.clone()), pump(upstream_read, client_write, mode));
}

/// Forwards one direction until end of stream, an error, a cut (which resets both sockets) or the
/// proxy's end. An end of stream is passed on as a half close.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let reset = |from: &OwnedReadHalf, to: &OwnedWriteHalf| {
        let _ = from.as_ref().set_zero_linger();
        let _ = to.as_ref().set_zero_linger();
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !wait_open(&mut mode).await {
            return reset(&from, &to);
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        // hold the chunk as long as the mode says
        let read_at = Instant::now();
        loop {
            let until = match *mode.borrow_and_update() {
                Mode::Pass => break,
                Mode::Cut => return reset(&from, &to),
                Mode::Delay(delay) => read_at + delay,
                Mode::Blackhole => read_at + Duration::from_secs(365 * 24 * 3600),
            };
            tokio::select! {
                () = sleep_until(until) => break,
                changed = mode.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
        tokio::select! {
            written = to.write_all(&buf[..n]) => {
                if written.is_err() {
                    return reset(&from, &to);
                }
            }
            () = until_cut(&mut mode) => return reset(&from, &to),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local echo server; it runs until the test's runtime ends.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    /// Writes `msg` and reads as many bytes back, within `within`.
    async fn round_trip(stream: &mut TcpStream, msg: &[u8], within: Duration) -> Option<Vec<u8>> {
        tokio::time::timeout(within, async {
            stream.write_all(msg).await.unwrap();
            let mut back = vec![0; msg.len()];
            stream.read_exact(&mut back).await.unwrap();
            back
        })
        .await
        .ok()
    }

    /// Whether the stream ends (end of stream or an error) within `within`.
    async fn closes(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 16];
        matches!(tokio::time::timeout(within, stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn pass_and_delay_forward_and_drop_stops() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        assert_eq!(proxy.url(), format!("http://{}", proxy.addr()));
        assert_eq!(proxy.mode(), Mode::Pass);
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut stream, b"ping", SECOND).await.as_deref(), Some(&b"ping"[..]));

        proxy.set(Mode::Delay(Duration::from_millis(200)));
        assert_eq!(proxy.mode(), Mode::Delay(Duration::from_millis(200)));
        let started = Instant::now();
        assert_eq!(round_trip(&mut stream, b"slow", 5 * SECOND).await.as_deref(), Some(&b"slow"[..]));
        let took = started.elapsed();
        println!("delayed round trip: {took:?}");
        assert!(took >= Duration::from_millis(400), "both directions are delayed: {took:?}");

        proxy.set(Mode::Pass);
        let started = Instant::now();
        assert_eq!(round_trip(&mut stream, b"fast", SECOND).await.as_deref(), Some(&b"fast"[..]));
        assert!(started.elapsed() < Duration::from_millis(200), "{:?}", started.elapsed());

        // dropping the proxy ends its connections and its listener
        let addr = proxy.addr();
        drop(proxy);
        assert!(closes(&mut stream, SECOND).await, "the open connection survived the proxy");
        let deadline = Instant::now() + SECOND;
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(TcpStream::connect(addr).await.is_err(), "the listener survived the proxy");
    }

    #[tokio::test]
    async fn blackhole_forwards_nothing_until_pass() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut open, b"ping", SECOND).await.as_deref(), Some(&b"ping"[..]));

        proxy.set(Mode::Blackhole);
        let wait = Duration::from_millis(500);
        assert_eq!(round_trip(&mut open, b"lost", wait).await, None, "an open connection got through");
        let mut new = TcpStream::connect(proxy.addr()).await.expect("a blackhole accepts connections");
        assert_eq!(round_trip(&mut new, b"void", wait).await, None, "a new connection got through");

        proxy.set(Mode::Pass);
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut fresh, b"back", SECOND).await.as_deref(), Some(&b"back"[..]));
        // the held bytes go through once the partition heals (the timed out reads took nothing)
        for (stream, held) in [(&mut open, b"lost"), (&mut new, b"void")] {
            let mut back = [0u8; 4];
            tokio::time::timeout(SECOND, stream.read_exact(&mut back)).await.unwrap().unwrap();
            assert_eq!(&back, held);
        }
    }

    #[tokio::test]
    async fn cut_closes_open_and_new_connections() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut open, b"ping", SECOND).await.as_deref(), Some(&b"ping"[..]));

        proxy.set(Mode::Cut);
        assert!(closes(&mut open, SECOND).await, "an open connection survived the cut");
        // the kernel completes the handshake; the proxy then resets the connection at once
        let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(closes(&mut new, Duration::from_millis(500)).await, "a new connection survived the cut");

        proxy.set(Mode::Pass);
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut fresh, b"back", SECOND).await.as_deref(), Some(&b"back"[..]));
    }
}
