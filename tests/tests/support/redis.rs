//! A real `redis-server` (Debian's, installed by `scripts/setup.sh`) on a free
//! loopback port, started and stopped by the test (by PID), no persistence.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use portier_tests::*;

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    /// With TLS: the directory of its certificate and key (rediss://).
    tls: Option<tempfile::TempDir>,
}

impl Redis {
    pub async fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
            tls: None,
        };
        r.restart().await;
        r
    }

    /// TLS only (`rediss://`), with a certificate for 127.0.0.1 from `pki`; clients
    /// are not asked for one.
    pub async fn start_tls(pki: &TestPki) -> Redis {
        let dir = tempfile::tempdir().expect("temp dir");
        pki.write_pair(dir.path(), "redis", &["127.0.0.1"], 30);
        std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).expect("write ca");
        let mut r = Redis {
            port: free_port(),
            child: None,
            tls: Some(dir),
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port; waits until it accepts connections.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis is already running");
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some(dir) => {
                let file = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .args(["--tls-cert-file", &file("redis.crt")])
                    .args(["--tls-key-file", &file("redis.key")])
                    .args(["--tls-ca-cert-file", &file("ca.pem")])
                    .args(["--tls-auth-clients", "no"])
            }
        };
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .args(["--enable-debug-command", "local"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server runs (scripts/setup.sh installs it)");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let up = eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
        })
        .await;
        assert!(up, "redis-server did not listen on {addr}");
    }

    /// `DEBUG SLEEP secs` on a thread: Redis answers nobody for that long. Join the
    /// handle to wait for its answer.
    pub fn debug_sleep(&self, secs: f64) -> std::thread::JoinHandle<()> {
        use std::io::{Read, Write};
        let port = self.port;
        let handle = std::thread::spawn(move || {
            let mut c =
                std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
            let arg = format!("{secs}");
            let cmd = format!(
                "*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n${}\r\n{arg}\r\n",
                arg.len()
            );
            c.write_all(cmd.as_bytes()).expect("send DEBUG SLEEP");
            let mut reply = [0u8; 5];
            c.read_exact(&mut reply).expect("DEBUG SLEEP reply");
            assert_eq!(&reply, b"+OK\r\n");
        });
        // Time for the command to reach Redis.
        std::thread::sleep(Duration::from_millis(50));
        handle
    }

    /// Lua script calls (`EVALSHA` and `EVAL`) it has answered, from `INFO commandstats`.
    pub fn script_calls(&self) -> u64 {
        let out = Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "info",
                "commandstats",
            ])
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| l.split([':', ',']).find_map(|kv| kv.strip_prefix("calls=")))
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    }

    /// Kills it (SIGKILL, by PID) and waits for it to go.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
