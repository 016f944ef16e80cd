//! `keyward-fakes [--listen ADDR]`: serves the fake providers until SIGINT or SIGTERM.
//! Prints `keyward-fakes: listening on http://ADDR` on stdout once it accepts connections.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use keyward_fakes::FakeProviders;

const USAGE: &str = "usage: keyward-fakes [--listen ADDR] [--any-key]   (default 127.0.0.1:0)\n\
  --any-key  accept any key not registered over /_fake/keys, steered by marker words in it";

/// `(listen address, any-key mode)`.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<(SocketAddr, bool), String> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut any_key = false;
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "--listen" => args.next().ok_or("--listen needs an address, e.g. 127.0.0.1:9000")?,
            "--any-key" => {
                any_key = true;
                continue;
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => match other.strip_prefix("--listen=") {
                Some(v) => v.to_owned(),
                None => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            },
        };
        listen = value
            .parse()
            .map_err(|e| format!("--listen {value:?} is not an address like 127.0.0.1:9000: {e}"))?;
    }
    Ok((listen, any_key))
}

async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> ExitCode {
    let (addr, any_key) = match parse_args(std::env::args().skip(1)) {
        Ok(found) => found,
        Err(message) => {
            eprintln!("keyward-fakes: {message}");
            return ExitCode::from(2);
        }
    };
    let fakes = match FakeProviders::start_on(addr) {
        Ok(fakes) => fakes,
        Err(e) => {
            eprintln!("keyward-fakes: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    fakes.accept_any_key(any_key);
    {
        let mut out = std::io::stdout().lock();
        let written = writeln!(out, "keyward-fakes: listening on {}", fakes.base_url()).and_then(|()| out.flush());
        if written.is_err() {
            return ExitCode::FAILURE;
        }
    }
    stopped().await;
    drop(fakes);
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> impl Iterator<Item = String> {
        list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn listen_flag_forms() {
        assert_eq!(parse_args(args(&[])).unwrap(), ("127.0.0.1:0".parse().unwrap(), false));
        assert_eq!(
            parse_args(args(&["--listen", "127.0.0.1:9000", "--any-key"])).unwrap(),
            ("127.0.0.1:9000".parse().unwrap(), true)
        );
        assert_eq!(
            parse_args(args(&["--listen=[::1]:9001"])).unwrap().0,
            "[::1]:9001".parse().unwrap()
        );
        assert!(parse_args(args(&["--listen"])).is_err());
        assert!(parse_args(args(&["--listen", "localhost"])).is_err());
        assert!(parse_args(args(&["--port", "1"])).is_err());
    }
}
