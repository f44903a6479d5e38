//! A TCP proxy on loopback for fault injection: cut (a partition: bytes stop flowing both
//! ways and are delivered when the cut heals, as TCP retransmission would), reset (every
//! proxied connection is closed at once), replies dropped or delayed, and a switch of the
//! upstream server (a failover: new connections go to the new address).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy. Dropping it stops accepting and closes every proxied connection.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    drop_replies: watch::Sender<bool>,
    dropped: Arc<AtomicU64>,
    generation: watch::Sender<u64>,
    upstream: watch::Sender<SocketAddr>,
    reply_delay: watch::Sender<Duration>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, cut_rx) = watch::channel(false);
        let (generation, gen_rx) = watch::channel(0u64);
        let (drop_replies, drop_rx) = watch::channel(false);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        let (upstream_tx, upstream_rx) = watch::channel(upstream);
        let (reply_delay, delay_rx) = watch::channel(Duration::ZERO);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cut_rx = cut_rx.clone();
                let gen_rx = gen_rx.clone();
                let down = Down {
                    discard: drop_rx.clone(),
                    dropped: counter.clone(),
                    delay: delay_rx.clone(),
                };
                let to = *upstream_rx.borrow();
                tokio::spawn(serve(client, to, cut_rx, gen_rx, down));
            }
        });
        Ok(Self {
            addr,
            cut,
            drop_replies,
            dropped,
            generation,
            upstream: upstream_tx,
            reply_delay,
            task,
        })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts (`true`) or heals (`false`) a partition.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    /// While on, requests still reach the server but its replies are thrown away (a reply
    /// lost after the request was applied).
    pub fn set_drop_replies(&self, on: bool) {
        self.drop_replies.send_replace(on);
    }

    /// Bytes of replies thrown away so far by [`Proxy::set_drop_replies`].
    pub fn dropped_reply_bytes(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// While non-zero, every chunk of reply is held this long before it is passed on: the
    /// request has been applied, the answer is in flight.
    pub fn set_reply_delay(&self, delay: Duration) {
        self.reply_delay.send_replace(delay);
    }

    /// Sends connections accepted from now on to `upstream` (a failover). Existing ones
    /// keep their server until they close or [`Proxy::reset_all`] closes them.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.upstream.send_replace(upstream);
    }

    /// Closes every connection proxied so far.
    pub fn reset_all(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.reset_all();
    }
}

/// How the server-to-client direction treats replies.
struct Down {
    discard: watch::Receiver<bool>,
    dropped: Arc<AtomicU64>,
    delay: watch::Receiver<Duration>,
}

impl Down {
    /// A direction that passes everything at once (client to server).
    fn plain() -> Self {
        let (_, discard) = watch::channel(false);
        let (_, delay) = watch::channel(Duration::ZERO);
        Self {
            discard,
            dropped: Arc::new(AtomicU64::new(0)),
            delay,
        }
    }
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mut cut: watch::Receiver<bool>,
    mut generation: watch::Receiver<u64>,
    down: Down,
) {
    let born = *generation.borrow_and_update();
    if cut.wait_for(|c| !*c).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, cut.clone(), Down::plain());
    let down = pump(sr, cw, cut, down);
    let reset = async move {
        let _ = generation.wait_for(|g| *g != born).await;
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = reset => {}
    }
}

async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut cut: watch::Receiver<bool>,
    how: Down,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = *how.delay.borrow();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if cut.wait_for(|c| !*c).await.is_err() {
            break;
        }
        if *how.discard.borrow() {
            how.dropped.fetch_add(n as u64, Ordering::Relaxed);
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
