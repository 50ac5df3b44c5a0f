//! `lunafront demo-backends`: small HTTP servers standing in for an agent's apps, for the
//! quickstart. Each answers every request with a page naming the app and the Host it was
//! asked for.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;

pub fn run(apps: &[String]) -> ExitCode {
    let mut threads = Vec::new();
    for spec in apps {
        let Some((name, addr)) = spec.split_once('=') else {
            eprintln!("error: `{spec}`: write NAME=ADDRESS:PORT, such as shop=127.0.0.1:9001");
            return ExitCode::from(super::exit::ERROR);
        };
        let addr: SocketAddr = match addr.parse() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: `{addr}`: {e}");
                return ExitCode::from(super::exit::ERROR);
            }
        };
        let listener = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {addr}: {e}");
                return ExitCode::from(super::exit::ERROR);
            }
        };
        eprintln!("demo app {name} on http://{addr}");
        let name = name.to_string();
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || serve(stream, &name, addr));
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

fn serve(stream: TcpStream, name: &str, addr: SocketAddr) {
    let Ok(read) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut host = String::from("?");
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':')
                && k.eq_ignore_ascii_case("host")
            {
                host = v
                    .trim()
                    .chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(200)
                    .collect();
            }
        }
        let body = format!("Hello from the demo app `{name}` ({addr}), asked for {host}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}
