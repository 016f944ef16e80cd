//! moto's KMS server (`python -m moto.server`) on a free loopback port, for the AWS KMS
//! backend's tests. The Python is `KEYWARD_TEST_MOTO_PYTHON` (CI: a virtualenv with
//! `moto[server]`), else `python3`.

use std::time::{Duration, Instant};

use crate::{reasons, setting, skip};

/// How long moto may take to start listening.
const START_WITHIN: Duration = Duration::from_secs(30);

/// A running moto server, killed when dropped.
#[derive(Debug)]
pub struct Moto {
    child: std::process::Child,
    /// `http://127.0.0.1:<port>`: the endpoint (`endpoint=` of `KEYWARD_KEK`).
    pub url: String,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python with moto: `KEYWARD_TEST_MOTO_PYTHON`, else `python3`.
pub fn python() -> String {
    setting("KEYWARD_TEST_MOTO_PYTHON").unwrap_or_else(|| "python3".to_owned())
}

/// Starts moto and waits until it listens, or `None` when it is not installed (the test is
/// skipped: return).
pub fn start() -> Option<Moto> {
    let present = std::process::Command::new(python())
        .args(["-c", "import moto.server, flask"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        skip(reasons::MOTO);
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("a free loopback port for moto: {e}"))
        .port();
    let child = std::process::Command::new(python())
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting moto: {e}"));
    let moto = Moto {
        child,
        url: format!("http://127.0.0.1:{port}"),
        port,
    };
    let deadline = Instant::now() + START_WITHIN;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not start on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(moto)
}
