//! `cargo xtask images`: small local images for redis, postgres and zookeeper, built from
//! Debian's own packages (debootstrap a minimal root with the server installed, then
//! `docker import`), for machines with a Docker engine but no image registry.
//!
//! Each image behaves like the official one as far as the integration run relies on it:
//! the server listens on its usual port (6379, 5432, 2181) on all interfaces, without
//! authentication (postgres: `trust`, like `POSTGRES_HOST_AUTH_METHOD=trust`). So the
//! containers provider runs them with exactly the code it uses for the official images,
//! selected with `LOCK_REDIS_IMAGE=distlock/redis:local` (and `LOCK_PG_IMAGE`,
//! `LOCK_ZK_IMAGE`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Spec {
    name: &'static str,
    packages: &'static str,
    port: u16,
    cmd: &'static str,
    files: &'static [(&'static str, &'static str)],
}

const PG_ENTRYPOINT: &str = r#"#!/bin/sh
# Like the official image with POSTGRES_HOST_AUTH_METHOD=trust: initdb on first start,
# listen on all interfaces, trust every connection.
set -e
PGDATA=/var/lib/postgresql/data
BIN=$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
  runuser -u postgres -- "$BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
  echo "host all all 0.0.0.0/0 trust" >> "$PGDATA/pg_hba.conf"
fi
exec runuser -u postgres -- "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*' -c max_connections=400
"#;

const ZK_CFG: &str = "tickTime=500\ninitLimit=20\nsyncLimit=10\ndataDir=/var/lib/zk-data\nclientPort=2181\nmaxSessionTimeout=60000\nminSessionTimeout=1000\n4lw.commands.whitelist=*\nadmin.enableServer=false\n";

/// Standalone by default; like the official image, `ZOO_MY_ID` and `ZOO_SERVERS`
/// (`server.1=host:2888:3888;2181 server.2=...`) make the container an ensemble member.
const ZK_ENTRYPOINT: &str = r#"#!/bin/sh
set -e
CFG=/etc/zookeeper/zoo-container.cfg
if [ -n "$ZOO_MY_ID" ] && [ -n "$ZOO_SERVERS" ]; then
  CFG=/tmp/zoo-ensemble.cfg
  cp /etc/zookeeper/zoo-container.cfg "$CFG"
  echo "$ZOO_MY_ID" > /var/lib/zk-data/myid
  echo "standaloneEnabled=false" >> "$CFG"
  echo "reconfigEnabled=false" >> "$CFG"
  echo "quorumListenOnAllIPs=true" >> "$CFG"
  for s in $ZOO_SERVERS; do echo "$s" >> "$CFG"; done
fi
exec java -Xmx256m -cp "/etc/zookeeper/conf:/usr/share/java/*" org.apache.zookeeper.server.quorum.QuorumPeerMain "$CFG"
"#;

const SPECS: [Spec; 3] = [
    Spec {
        name: "redis",
        packages: "redis-server",
        port: 6379,
        cmd: r#"["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]"#,
        files: &[],
    },
    Spec {
        name: "postgres",
        packages: "postgresql",
        port: 5432,
        cmd: r#"["/usr/local/bin/docker-entrypoint.sh"]"#,
        files: &[("usr/local/bin/docker-entrypoint.sh", PG_ENTRYPOINT)],
    },
    Spec {
        name: "zookeeper",
        packages: "zookeeper",
        port: 2181,
        cmd: r#"["/usr/local/bin/zk-entrypoint.sh"]"#,
        // Not /var/lib/zookeeper: Debian leaves a placeholder myid there, which standalone
        // mode would refuse to parse.
        files: &[
            ("etc/zookeeper/zoo-container.cfg", ZK_CFG),
            ("usr/local/bin/zk-entrypoint.sh", ZK_ENTRYPOINT),
            ("var/lib/zk-data/.keep", ""),
        ],
    },
];

/// The tag `cargo xtask images` gives the image for `name` (redis, postgres, zookeeper).
pub(crate) fn local_tag(name: &str) -> String {
    format!("distlock/{name}:local")
}

fn mirror() -> String {
    if let Ok(m) = std::env::var("LOCK_DEBIAN_MIRROR") {
        return m;
    }
    for f in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        if let Ok(s) = std::fs::read_to_string(f) {
            for l in s.lines() {
                let l = l.trim();
                if let Some(u) = l.strip_prefix("URIs:") {
                    let u = u.trim();
                    if !u.contains("security") {
                        return u.to_owned();
                    }
                }
                if let Some(rest) = l.strip_prefix("deb ") {
                    if let Some(u) = rest.split_whitespace().find(|w| w.starts_with("http")) {
                        if !u.contains("security") {
                            return u.to_owned();
                        }
                    }
                }
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

fn run(what: &str, cmd: &mut Command) -> Result<(), String> {
    let st = cmd
        .status()
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    st.success()
        .then_some(())
        .ok_or(format!("{what} failed ({st})"))
}

fn build(spec: &Spec, work: &Path) -> Result<(), String> {
    let tag = local_tag(spec.name);
    let root: PathBuf = work.join(format!("rootfs-{}", spec.name));
    if !root.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&root);
        println!("debootstrap {} (with {})", root.display(), spec.packages);
        run(
            "debootstrap",
            Command::new("debootstrap")
                .args(["--variant=minbase", &format!("--include={}", spec.packages)])
                .arg("bookworm")
                .arg(&root)
                .arg(mirror())
                .stdout(Stdio::null()),
        )?;
        // Debian's packages start their service in the chroot's postinst where they can;
        // nothing must run when the image is made.
        std::fs::write(root.join(".complete"), b"").map_err(|e| e.to_string())?;
    }
    for (path, text) in spec.files {
        let p = root.join(path);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        std::fs::write(&p, text).map_err(|e| e.to_string())?;
        run("chmod", Command::new("chmod").arg("755").arg(&p))?;
    }
    println!("docker import -> {tag}");
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args([
            "--exclude=./proc/*",
            "--exclude=./sys/*",
            "--exclude=./dev/*",
            "-c",
            ".",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    let stdout = tar.stdout.ok_or("tar: no stdout")?;
    run(
        "docker import",
        Command::new("docker")
            .args(["import", "--change"])
            .arg(format!("CMD {}", spec.cmd))
            .args(["--change"])
            .arg(format!("EXPOSE {}", spec.port))
            .arg("-")
            .arg(&tag)
            .stdin(stdout)
            .stdout(Stdio::null()),
    )
}

/// Builds the named images (all when none is named).
pub(crate) fn run_images(args: &[String]) -> bool {
    let names: Vec<&str> = if args.is_empty() {
        SPECS.iter().map(|s| s.name).collect()
    } else {
        args.iter().map(String::as_str).collect()
    };
    let work = PathBuf::from("target/images");
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("cannot create {}: {e}", work.display());
        return false;
    }
    for n in names {
        let Some(spec) = SPECS.iter().find(|s| s.name == n) else {
            eprintln!("unknown image {n}: one of redis, postgres, zookeeper");
            return false;
        };
        if let Err(e) = build(spec, &work) {
            eprintln!("image {n}: {e}");
            return false;
        }
        println!("built {}", local_tag(n));
    }
    true
}
