//! The containers provider: servers in Docker containers through `testcontainers`.
//!
//! Defaults are the official images a user would expect, pinned; each is overridable with
//! an environment variable (`LOCK_REDIS_IMAGE`, `LOCK_PG_IMAGE`, `LOCK_ZK_IMAGE`,
//! `LOCK_MONGO_IMAGE`) or the integration run's `--image kind=repo:tag`, for mirrors and
//! offline hosts (`cargo xtask images` builds `distlock/<server>:local` from Debian's
//! packages). The same code runs either: expose the usual port, start, map it, then a real
//! readiness check of our own (PING, `SELECT 1`, `srvr`, `ping`) rather than a log line.

use std::process::Command;
use std::time::Duration;

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};
use tokio::time::Instant;

/// A server kind the provider can start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Redis.
    Redis,
    /// PostgreSQL.
    Postgres,
    /// ZooKeeper.
    ZooKeeper,
    /// MongoDB, as a one-member replica set.
    Mongo,
}

impl Kind {
    /// The official image used by default.
    pub fn default_image(self) -> &'static str {
        match self {
            Kind::Redis => "redis:7.2",
            Kind::Postgres => "postgres:16",
            Kind::ZooKeeper => "zookeeper:3.9",
            Kind::Mongo => "mongo:7.0",
        }
    }

    /// The variable that overrides the image.
    pub fn env_var(self) -> &'static str {
        match self {
            Kind::Redis => "LOCK_REDIS_IMAGE",
            Kind::Postgres => "LOCK_PG_IMAGE",
            Kind::ZooKeeper => "LOCK_ZK_IMAGE",
            Kind::Mongo => "LOCK_MONGO_IMAGE",
        }
    }

    fn port(self) -> u16 {
        match self {
            Kind::Redis => 6379,
            Kind::Postgres => 5432,
            Kind::ZooKeeper => 2181,
            Kind::Mongo => 27017,
        }
    }

    /// The image to use: `--image` override, then the variable, then the default.
    pub fn image(self, overrides: &[(String, String)]) -> String {
        let key = match self {
            Kind::Redis => "redis",
            Kind::Postgres => "pg",
            Kind::ZooKeeper => "zk",
            Kind::Mongo => "mongo",
        };
        overrides
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(self.env_var()).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| self.default_image().to_owned())
    }
}

/// Whether a Docker engine answers.
pub fn docker_answers() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether `image` is present, pulling it if it is not (a failed pull is quick when no
/// registry is reachable). Err says why not.
pub fn ensure_image(image: &str) -> Result<(), String> {
    if !docker_answers() {
        return Err("no Docker engine answers".into());
    }
    let present = Command::new("docker")
        .args(["image", "inspect", image])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    let pull = Command::new("docker")
        .args(["pull", "--quiet", image])
        .output()
        .map_err(|e| format!("docker pull: {e}"))?;
    if pull.status.success() {
        Ok(())
    } else {
        Err(format!(
            "image {image} is not present and cannot be pulled ({})",
            String::from_utf8_lossy(&pull.stderr).trim()
        ))
    }
}

/// One member of a containerised ZooKeeper ensemble.
struct Member {
    network: String,
    name: String,
    id: usize,
    servers: String,
}

/// A running server container; dropping it removes the container.
#[derive(Debug)]
pub struct Server {
    container: ContainerAsync<GenericImage>,
    /// The image it runs.
    pub image: String,
    /// The host port mapped to the server's port.
    pub port: u16,
    kind: Kind,
}

impl Server {
    /// Starts `kind` from `image` and waits until it answers.
    pub async fn start(kind: Kind, image: &str) -> Result<Self, String> {
        let me = Self::launch(kind, image, None).await?;
        me.wait_ready().await?;
        Ok(me)
    }

    /// Starts a ZooKeeper ensemble of `members` containers from `image` on a network of
    /// its own (the members find each other by container name), and waits until every
    /// member serves. The image must honour `ZOO_MY_ID` and `ZOO_SERVERS` as the official
    /// one does (`cargo xtask images` builds one that does).
    pub async fn start_zk_ensemble(image: &str, members: usize) -> Result<Vec<Self>, String> {
        let tag = format!("distlock-zk-{:08x}", rand::random::<u32>());
        let servers = (1..=members)
            .map(|i| format!("server.{i}={tag}-{i}:2888:3888;2181"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut started = Vec::new();
        for i in 1..=members {
            let member = Member {
                network: tag.clone(),
                name: format!("{tag}-{i}"),
                id: i,
                servers: servers.clone(),
            };
            started.push(Self::launch(Kind::ZooKeeper, image, Some(member)).await?);
        }
        for s in &started {
            s.wait_ready().await?;
            let addr: std::net::SocketAddr = ([127, 0, 0, 1], s.port).into();
            let mode = crate::servers::ask(addr, b"srvr").unwrap_or_default();
            if !(mode.contains("Mode: leader") || mode.contains("Mode: follower")) {
                return Err(format!(
                    "ensemble member on :{} is not in a quorum: {mode}",
                    s.port
                ));
            }
        }
        Ok(started)
    }

    async fn launch(kind: Kind, image: &str, member: Option<Member>) -> Result<Self, String> {
        ensure_image(image)?;
        let (name, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
        let base = GenericImage::new(name, tag)
            .with_exposed_port(kind.port().tcp())
            .with_wait_for(WaitFor::Nothing);
        let req = match kind {
            Kind::Postgres => base.with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust"),
            Kind::ZooKeeper => base.with_env_var("ZOO_4LW_COMMANDS_WHITELIST", "*"),
            Kind::Mongo => base.with_cmd(["mongod", "--replSet", "rs0", "--bind_ip_all"]),
            Kind::Redis => base.into(),
        };
        let req = match member {
            Some(m) => req
                .with_network(m.network)
                .with_container_name(m.name.clone())
                .with_hostname(m.name)
                .with_env_var("ZOO_MY_ID", m.id.to_string())
                .with_env_var("ZOO_SERVERS", m.servers)
                .with_env_var("ZOO_STANDALONE_ENABLED", "false"),
            None => req,
        };
        let container = req
            .with_startup_timeout(Duration::from_secs(120))
            .start()
            .await
            .map_err(|e| format!("starting {image}: {e}"))?;
        let port = container
            .get_host_port_ipv4(kind.port().tcp())
            .await
            .map_err(|e| format!("port of {image}: {e}"))?;
        Ok(Self {
            container,
            image: image.to_owned(),
            port,
            kind,
        })
    }

    /// The URL (or connect string) of the server.
    pub fn url(&self) -> String {
        let p = self.port;
        match self.kind {
            Kind::Redis => format!("redis://127.0.0.1:{p}"),
            Kind::Postgres => format!("postgres://postgres@127.0.0.1:{p}/postgres"),
            Kind::ZooKeeper => format!("127.0.0.1:{p}"),
            Kind::Mongo => format!("mongodb://127.0.0.1:{p}/?directConnection=true"),
        }
    }

    /// The container id.
    pub fn id(&self) -> &str {
        self.container.id()
    }

    async fn ready_once(&self) -> Result<(), String> {
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], self.port).into();
        match self.kind {
            Kind::Redis => {
                let r = crate::servers::ask(addr, b"PING\r\n").ok_or("no reply")?;
                r.starts_with("+PONG").then_some(()).ok_or(r)
            }
            Kind::ZooKeeper => {
                let r = crate::servers::ask(addr, b"srvr").ok_or("no reply")?;
                r.contains("Mode:").then_some(()).ok_or(r)
            }
            Kind::Postgres => {
                let (c, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                c.simple_query("SELECT 1")
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
            Kind::Mongo => {
                // One-member replica set, so majority writes and change streams work.
                let c = lock_mongo::mongodb::Client::with_uri_str(self.url())
                    .await
                    .map_err(|e| e.to_string())?;
                let admin = c.database("admin");
                let init = lock_mongo::mongodb::bson::doc! {
                    "replSetInitiate": { "_id": "rs0", "members": [ { "_id": 0, "host": "localhost:27017" } ] }
                };
                let _ = admin.run_command(init).await;
                let hello = admin
                    .run_command(lock_mongo::mongodb::bson::doc! { "hello": 1 })
                    .await
                    .map_err(|e| e.to_string())?;
                hello
                    .get_bool("isWritablePrimary")
                    .ok()
                    .filter(|p| *p)
                    .map(|_| ())
                    .ok_or_else(|| "replica set not primary yet".to_owned())
            }
        }
    }

    async fn wait_ready(&self) -> Result<(), String> {
        let t = Instant::now();
        let mut last = String::new();
        while t.elapsed() < Duration::from_secs(90) {
            match self.ready_once().await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(format!("{} not ready within 90 s: {last}", self.image))
    }
}
