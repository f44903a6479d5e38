//! Local server processes on free loopback ports in temporary directories: the one place
//! that knows how to start a server. Every server is stopped by its pid when its handle is
//! dropped (and on `stop`).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A result with a readable error.
pub type Res<T> = Result<T, String>;

/// A free loopback TCP port (bound then released).
pub fn free_port() -> Res<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// A fresh temporary directory under the system temp dir.
pub fn temp_dir(tag: &str) -> Res<PathBuf> {
    let n: u64 = rand::random();
    let d = std::env::temp_dir().join(format!("lock-it-{tag}-{n:016x}"));
    std::fs::create_dir_all(&d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
    Ok(d)
}

/// Whether a program is on PATH (or is an existing path).
pub fn have(program: &str) -> bool {
    if Path::new(program).is_absolute() {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) -> Res<()> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{what} not ready within {limit:?}"))
}

/// The program to start for a server: the value of `env` when set (a test of the runners
/// points it at a binary that exits at once), else `default`.
fn server_program(env: &str, default: &str) -> PathBuf {
    std::env::var_os(env)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// Waits until `ready`, failing at once if `proc` exits first.
fn wait_ready_or_exit(
    proc: &mut Proc,
    what: &str,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> Res<()> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if ready() {
            return Ok(());
        }
        if let Some(status) = proc.exited() {
            return Err(format!("{what} exited before it was ready ({status})"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{what} not ready within {limit:?}"))
}

/// Sends `msg` to `addr` and returns what comes back (four-letter words, RESP PING).
pub fn ask(addr: SocketAddr, msg: &[u8]) -> Option<String> {
    send_recv(addr, msg)
}

fn send_recv(addr: SocketAddr, msg: &[u8]) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(1000))).ok()?;
    s.write_all(msg).ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if msg.starts_with(b"PING") && out.ends_with(b"\r\n") {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Sends a signal to a pid (SIGSTOP/SIGCONT/SIGKILL...).
pub fn signal(pid: u32, sig: &str) -> Res<()> {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map_err(|e| format!("kill: {e}"))?;
    st.success()
        .then_some(())
        .ok_or(format!("kill -{sig} {pid} failed"))
}

/// libfaketime's preload library (Debian's `faketime` package), if installed.
pub fn faketime_lib() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// A preload library that moves a server's wall clock (`CLOCK_REALTIME`, `gettimeofday`,
/// `time`) by `LOCK_CLOCK_OFFSET_S` seconds, monotonic clocks untouched. libfaketime does
/// the same for most programs but cannot start one built with jemalloc (redis-server): its
/// set-up recurses through the allocator. This one calls the kernel directly and needs no
/// set-up. Compiled with `cc` on first use.
pub fn clock_shim() -> Res<PathBuf> {
    static SHIM: std::sync::OnceLock<Res<PathBuf>> = std::sync::OnceLock::new();
    SHIM.get_or_init(|| {
        let dir = temp_dir("clock-shim")?;
        let src = dir.join("shim.c");
        std::fs::write(&src, CLOCK_SHIM_C).map_err(|e| e.to_string())?;
        let lib = dir.join("clock-shim.so");
        let out = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&lib)
            .arg(&src)
            .output()
            .map_err(|e| format!("cc (needed to build the clock shim): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "building the clock shim failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(lib)
    })
    .clone()
}

/// The environment that runs a server with its wall clock `offset_s` seconds off.
pub fn clock_offset_env(offset_s: i64) -> Res<Vec<(String, String)>> {
    Ok(vec![
        (
            "LD_PRELOAD".to_owned(),
            clock_shim()?.to_string_lossy().into_owned(),
        ),
        ("LOCK_CLOCK_OFFSET_S".to_owned(), offset_s.to_string()),
    ])
}

const CLOCK_SHIM_C: &str = r#"#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long offset_s(void) {
    static long offset;
    static int ready;
    if (!ready) {
        const char *v = getenv("LOCK_CLOCK_OFFSET_S");
        offset = v ? atol(v) : 0;
        ready = 1;
    }
    return offset;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    long r = syscall(SYS_clock_gettime, id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) ts->tv_sec += offset_s();
    return (int)r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (syscall(SYS_clock_gettime, CLOCK_REALTIME, &ts) != 0) return -1;
    if (tv) {
        tv->tv_sec = ts.tv_sec + offset_s();
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return 0;
}

time_t time(time_t *t) {
    struct timespec ts;
    syscall(SYS_clock_gettime, CLOCK_REALTIME, &ts);
    time_t v = ts.tv_sec + offset_s();
    if (t) *t = v;
    return v;
}
"#;

/// A child process stopped by its pid on drop.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    name: String,
}

impl Proc {
    /// A handle that owns no process.
    fn none() -> Self {
        Self {
            child: None,
            name: String::new(),
        }
    }

    fn spawn(name: &str, cmd: &mut Command) -> Res<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Self {
            child: Some(child),
            name: name.to_owned(),
        })
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops the process (SIGTERM, then SIGKILL after 5 s) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = signal(c.id(), "CONT");
            let _ = signal(c.id(), "TERM");
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A local redis-server.
#[derive(Debug)]
pub struct Redis {
    /// Its process.
    pub proc: Proc,
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    persist: bool,
    replica_of: Option<u16>,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl Redis {
    /// Starts redis-server on a free port, without persistence unless `persist`.
    pub fn start(persist: bool) -> Res<Self> {
        let port = free_port()?;
        let dir = temp_dir("redis")?;
        Self::start_on(port, dir, persist, None, Vec::new(), Vec::new())
    }

    /// Starts redis-server on a free port, without persistence, with extra arguments
    /// (`--maxmemory-policy allkeys-lru`, `--cluster-enabled yes`, ...) and environment
    /// (libfaketime's, for a server whose clock is off).
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Res<Self> {
        Self::start_on(
            free_port()?,
            temp_dir("redis")?,
            false,
            None,
            args.iter().map(|a| (*a).to_owned()).collect(),
            env.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    fn start_on(
        port: u16,
        dir: PathBuf,
        persist: bool,
        replica_of: Option<u16>,
        extra: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Res<Self> {
        let program = server_program("LOCK_REDIS_SERVER", "redis-server");
        if !have(&program.to_string_lossy()) {
            return Err("redis-server is not installed (apt-get install redis-server)".into());
        }
        let mut cmd = Command::new(&program);
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
        ])
        .args(["--dir", &dir.to_string_lossy()])
        .args(["--daemonize", "no", "--logfile", ""]);
        if persist {
            cmd.args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ]);
        } else {
            cmd.args(["--appendonly", "no", "--save", ""]);
        }
        if let Some(primary) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        cmd.args(&extra);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let mut proc = Proc::spawn("redis-server", &mut cmd)?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_ready_or_exit(&mut proc, "redis-server", Duration::from_secs(10), || {
            send_recv(addr, b"PING\r\n").is_some_and(|r| r.starts_with("+PONG"))
        })?;
        Ok(Self {
            proc,
            port,
            dir,
            persist,
            replica_of,
            extra,
            env,
        })
    }

    /// The URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts a replica of the server on `primary_port`, on a free port.
    pub fn start_replica(primary_port: u16) -> Res<Self> {
        Self::start_on(
            free_port()?,
            temp_dir("redis-replica")?,
            false,
            Some(primary_port),
            Vec::new(),
            Vec::new(),
        )
    }

    /// Starts a replica of the server on `primary_port`, on a free port, with extra
    /// environment (libfaketime's, for a replica whose clock is off).
    pub fn start_replica_with(primary_port: u16, env: &[(&str, &str)]) -> Res<Self> {
        Self::start_on(
            free_port()?,
            temp_dir("redis-replica")?,
            false,
            Some(primary_port),
            Vec::new(),
            env.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and directory.
    pub fn restart(&mut self) -> Res<()> {
        self.proc.kill9();
        let fresh = Self::start_on(
            self.port,
            self.dir.clone(),
            self.persist,
            self.replica_of,
            self.extra.clone(),
            self.env.clone(),
        )?;
        *self = fresh;
        Ok(())
    }

    /// A smoke check: write, then read back.
    pub fn smoke(&self) -> Res<()> {
        let r =
            send_recv(self.addr(), b"SET smoke ok\r\nGET smoke\r\nQUIT\r\n").unwrap_or_default();
        r.contains("+OK\r\n$2\r\nok")
            .then_some(())
            .ok_or(format!("unexpected reply {r:?}"))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.proc.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs SQL through psql against the local server on `port` and returns its output.
fn psql_at(port: u16, sql: &str) -> Res<String> {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-tAq",
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn pg_bin(name: &str) -> Option<PathBuf> {
    for v in ["17", "16", "15", "14", "13"] {
        let p = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/{name}"));
        if p.exists() {
            return Some(p);
        }
    }
    have(name).then(|| PathBuf::from(name))
}

/// Runs a command as the `postgres` user when we are root (initdb refuses root).
fn as_pg_user(program: &Path) -> Command {
    let root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A local PostgreSQL server (initdb in a temp dir, trust auth on loopback).
#[derive(Debug)]
pub struct Postgres {
    /// Its process.
    pub proc: Proc,
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl Postgres {
    /// initdb + start on a free port.
    pub fn start() -> Res<Self> {
        Self::start_with(&[])
    }

    /// initdb + start on a free port, with extra `-c name=value` settings.
    pub fn start_with(settings: &[&str]) -> Res<Self> {
        let initdb =
            pg_bin("initdb").ok_or("PostgreSQL is not installed (apt-get install postgresql)")?;
        pg_bin("postgres").ok_or("postgres binary not found")?;
        let port = free_port()?;
        let dir = temp_dir("pg")?;
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
        let data = dir.join("data");
        let out = as_pg_user(&initdb)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let extra: Vec<String> = settings.iter().map(|s| (*s).to_owned()).collect();
        let proc = Self::launch(&dir, port, &extra)?;
        let mut me = Self {
            proc,
            port,
            dir,
            extra,
        };
        me.wait_ready()?;
        Ok(me)
    }

    fn launch(dir: &Path, port: u16, extra: &[String]) -> Res<Proc> {
        let postgres = match std::env::var_os("LOCK_POSTGRES").filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => pg_bin("postgres").ok_or("postgres binary not found")?,
        };
        let mut cmd = as_pg_user(&postgres);
        cmd.arg("-D")
            .arg(dir.join("data"))
            .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(dir)
            .args([
                "-c",
                "fsync=off",
                "-c",
                "max_connections=400",
                "-c",
                "shared_buffers=64MB",
            ]);
        for e in extra {
            cmd.arg("-c").arg(e);
        }
        Proc::spawn("postgres", &mut cmd)
    }

    fn wait_ready(&mut self) -> Res<()> {
        let (port, mut proc) = (self.port, std::mem::replace(&mut self.proc, Proc::none()));
        let r = wait_ready_or_exit(&mut proc, "postgres", Duration::from_secs(30), || {
            psql_at(port, "SELECT 1").is_ok()
        });
        self.proc = proc;
        r
    }

    /// The postmaster's pid and its children's (the backends and background workers): all
    /// of them must be stopped to pause the server.
    pub fn server_pids(&self) -> Vec<u32> {
        let Some(postmaster) = self.postmaster_pid() else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let ppid = std::fs::read_to_string(e.path().join("stat"))
                    .ok()
                    .and_then(|st| {
                        st.rsplit_once(") ")
                            .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned))
                    })
                    .and_then(|p| p.parse::<u32>().ok());
                if ppid == Some(postmaster) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("data").join("postmaster.pid")
    }

    /// The postmaster's pid, from `postmaster.pid` (none while the server is down).
    fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pidfile())
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    }

    /// Sends `sig` to the postmaster itself (the process we started may be `runuser`, which
    /// would turn SIGINT into SIGTERM, a "smart" shutdown that waits for every client),
    /// waits until it is down, then reaps what we started. Fails when no postmaster was
    /// up, or it was not down within 20 s.
    fn shutdown(&mut self, sig: &str) -> Res<()> {
        let pid = self.postmaster_pid().ok_or("no postmaster.pid")?;
        signal(pid, sig)?;
        let pidfile = self.pidfile();
        let down = wait_until("postgres shutdown", Duration::from_secs(20), || {
            !pidfile.exists()
        });
        self.proc.stop();
        down
    }

    /// Immediate shutdown (SIGQUIT: no checkpoint, WAL not yet written is lost, the next
    /// start runs crash recovery, which empties unlogged tables), then start again on the
    /// same port and data.
    pub fn crash_restart(&mut self) -> Res<()> {
        self.shutdown("QUIT")?;
        self.proc = Self::launch(&self.dir, self.port, &self.extra)?;
        self.wait_ready()
    }

    /// Fast shutdown (SIGINT: every session ends), if the server is up.
    fn shutdown_fast(&mut self) {
        if self.shutdown("INT").is_err() {
            self.proc.stop();
        }
    }

    /// Fast shutdown (every session ends), then start again on the same port and data.
    pub fn restart(&mut self) -> Res<()> {
        self.shutdown_fast();
        self.proc = Self::launch(&self.dir, self.port, &self.extra)?;
        self.wait_ready()
    }

    /// The URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The data directory (`pg_hba.conf` is there).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs SQL through psql and returns its output.
    pub fn psql(&self, sql: &str) -> Res<String> {
        psql_at(self.port, sql)
    }

    /// A smoke check: write, then read back.
    pub fn smoke(&self) -> Res<()> {
        let r = self.psql(
            "CREATE TEMP TABLE smoke(v text); INSERT INTO smoke VALUES ('ok'); SELECT v FROM smoke",
        )?;
        (r == "ok")
            .then_some(())
            .ok_or(format!("unexpected reply {r:?}"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.shutdown_fast();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A local ZooKeeper server or ensemble member set.
#[derive(Debug)]
pub struct ZooKeeper {
    /// The member processes.
    pub procs: Vec<Proc>,
    /// Client ports, one per member.
    pub ports: Vec<u16>,
    dir: PathBuf,
}

fn zk_classpath() -> Option<String> {
    let jar = Path::new("/usr/share/java/zookeeper.jar");
    jar.exists()
        .then(|| "/etc/zookeeper/conf:/usr/share/java/*".to_owned())
}

impl ZooKeeper {
    /// Starts `members` servers (1: standalone; 3: an ensemble) on free ports.
    pub fn start(members: usize) -> Res<Self> {
        Self::start_with(members, "")
    }

    /// Starts `members` servers with `extra` lines added to each one's configuration.
    pub fn start_with(members: usize, extra: &str) -> Res<Self> {
        let cp = zk_classpath().ok_or("ZooKeeper is not installed (apt-get install zookeeper)")?;
        let java = server_program("LOCK_ZK_JAVA", "java");
        if !have(&java.to_string_lossy()) {
            return Err("java is not installed".into());
        }
        let dir = temp_dir("zk")?;
        let mut ports = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..members {
            ports.push(free_port()?);
            peers.push((free_port()?, free_port()?));
        }
        let mut procs = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let data = dir.join(format!("m{}", i + 1));
            std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
            let mut cfg = format!(
                "tickTime=500\ninitLimit=20\nsyncLimit=10\ndataDir={}\nclientPort={}\nclientPortAddress=127.0.0.1\nmaxSessionTimeout=60000\nminSessionTimeout=1000\n4lw.commands.whitelist=*\nadmin.enableServer=false\n",
                data.display(),
                port
            );
            cfg.push_str(extra);
            if members > 1 {
                std::fs::write(data.join("myid"), format!("{}\n", i + 1))
                    .map_err(|e| e.to_string())?;
                for (j, (p1, p2)) in peers.iter().enumerate() {
                    cfg.push_str(&format!("server.{}=127.0.0.1:{p1}:{p2}\n", j + 1));
                }
            }
            let cfg_path = data.join("zoo.cfg");
            std::fs::write(&cfg_path, cfg).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(&java);
            cmd.arg("-Xmx256m")
                .arg(format!("-Dzookeeper.log.dir={}", data.display()));
            cmd.arg("-cp").arg(&cp);
            cmd.arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
                .arg(&cfg_path);
            procs.push(Proc::spawn("zookeeper", &mut cmd)?);
        }
        let mut me = Self { procs, ports, dir };
        for (i, p) in me.ports.clone().into_iter().enumerate() {
            let addr: SocketAddr = ([127, 0, 0, 1], p).into();
            wait_ready_or_exit(
                &mut me.procs[i],
                "zookeeper",
                Duration::from_secs(60),
                || {
                    send_recv(addr, b"srvr").is_some_and(|r| {
                        r.contains("Mode: standalone")
                            || r.contains("Mode: leader")
                            || r.contains("Mode: follower")
                    })
                },
            )?;
        }
        Ok(me)
    }

    /// Index of the member that reports `Mode: leader` (or `standalone`).
    pub fn leader(&self) -> Option<usize> {
        self.ports.iter().position(|p| {
            let addr: SocketAddr = ([127, 0, 0, 1], *p).into();
            send_recv(addr, b"srvr")
                .is_some_and(|r| r.contains("Mode: leader") || r.contains("Mode: standalone"))
        })
    }

    /// Sends a four-letter command to member `i` and returns the reply.
    pub fn four_letter(&self, i: usize, cmd: &str) -> Option<String> {
        let addr: SocketAddr = ([127, 0, 0, 1], *self.ports.get(i)?).into();
        send_recv(addr, cmd.as_bytes())
    }

    /// Kills member `i` at once (SIGKILL).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(p) = self.procs.get_mut(i) {
            p.kill9();
        }
    }

    /// The connect string.
    pub fn connect_string(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A smoke check through the four-letter `srvr` and `mntr` commands, plus a write and a
    /// read through zkCli when it is installed.
    pub fn smoke(&self) -> Res<()> {
        let cli = Path::new("/usr/share/zookeeper/bin/zkCli.sh");
        if !cli.exists() {
            return Err("zkCli.sh not found".into());
        }
        let node = format!("/smoke{:08x}", rand::random::<u32>());
        let out = Command::new(cli)
            .args(["-server", &self.connect_string()])
            .args(["create", &node, "ok"])
            .output()
            .map_err(|e| e.to_string())?;
        let created = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let out = Command::new(cli)
            .args(["-server", &self.connect_string()])
            .args(["get", &node])
            .output()
            .map_err(|e| e.to_string())?;
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        (got.lines().any(|l| l.trim() == "ok"))
            .then_some(())
            .ok_or(format!("create said {created:?}; get said {got:?}"))
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The moto release the runs use (pinned, so that every run emulates the same API).
const MOTO: &str = "moto[server]==5.2.5";

/// moto's server, its requests served one at a time.
const MOTO_SERIAL: &str = r#"
import sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication, MotoRequestHandler, create_backend_app)
app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()
def serial(environ, start_response):
    with lock:
        return list(app(environ, start_response))
run_simple(sys.argv[1], int(sys.argv[2]), serial, threaded=True,
           request_handler=MotoRequestHandler)
"#;

fn moto_venv() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("moto")
}

/// moto's server mode: an emulator of the DynamoDB wire API (not DynamoDB: it keeps its
/// tables in memory and judges nothing about capacity or replication). Installed into a
/// virtual environment under `target/moto` on first use.
#[derive(Debug)]
pub struct Moto {
    /// Its process.
    pub proc: Proc,
    /// Its port.
    pub port: u16,
}

impl Moto {
    /// Installs moto if needed and starts it on a free loopback port.
    pub fn start() -> Res<Self> {
        let venv = moto_venv();
        if !venv.join("bin/moto_server").exists() {
            let run = |cmd: &mut Command, what: &str| -> Res<()> {
                let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
                out.status.success().then_some(()).ok_or_else(|| {
                    format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr))
                })
            };
            run(
                Command::new("python3").args(["-m", "venv"]).arg(&venv),
                "python3 -m venv (apt-get install python3-venv)",
            )?;
            run(
                Command::new(venv.join("bin/pip")).args(["install", "-q", MOTO]),
                &format!("pip install {MOTO}"),
            )?;
        }
        Self::start_at(&venv, free_port()?)
    }

    fn start_at(venv: &Path, port: u16) -> Res<Self> {
        // DynamoDB applies each conditional write atomically; moto's threaded server does
        // not (its check and its write can interleave with another request's), so the
        // runs serve one request at a time.
        let launcher = venv.join("moto_serial.py");
        std::fs::write(&launcher, MOTO_SERIAL).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(venv.join("bin/python"));
        cmd.arg(&launcher)
            .args(["127.0.0.1", &port.to_string()])
            .env("MOTO_PORT", port.to_string());
        let mut proc = Proc::spawn("moto_server", &mut cmd)?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_ready_or_exit(&mut proc, "moto_server", Duration::from_secs(60), || {
            send_recv(addr, b"GET /moto-api/ HTTP/1.0\r\n\r\n")
                .is_some_and(|r| r.starts_with("HTTP/1"))
        })?;
        Ok(Self { proc, port })
    }

    /// The endpoint URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the emulator and starts it again on the same port: it comes back empty.
    pub fn restart(&mut self) -> Res<()> {
        self.proc.kill9();
        *self = Self::start_at(&moto_venv(), self.port)?;
        Ok(())
    }
}
