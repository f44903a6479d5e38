//! A TCP proxy on loopback for fault injection: cut (a partition: bytes stop flowing both
//! ways and are delivered when the cut heals, as TCP retransmission would), and reset (every
//! proxied connection is closed at once).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cut_rx = cut_rx.clone();
                let gen_rx = gen_rx.clone();
                let drop_rx = (drop_rx.clone(), counter.clone());
                tokio::spawn(serve(client, upstream, cut_rx, gen_rx, drop_rx));
            }
        });
        Ok(Self {
            addr,
            cut,
            drop_replies,
            dropped,
            generation,
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

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mut cut: watch::Receiver<bool>,
    mut generation: watch::Receiver<u64>,
    drop_replies: (watch::Receiver<bool>, Arc<AtomicU64>),
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
    let (_, never) = watch::channel(false);
    let up = pump(cr, sw, cut.clone(), (never, Arc::new(AtomicU64::new(0))));
    let down = pump(sr, cw, cut, drop_replies);
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
    discard: (watch::Receiver<bool>, Arc<AtomicU64>),
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.wait_for(|c| !*c).await.is_err() {
            break;
        }
        if *discard.0.borrow() {
            discard.1.fetch_add(n as u64, Ordering::Relaxed);
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
