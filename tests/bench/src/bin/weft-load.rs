//! `weft-load`: the bench's load generator as its own process (see `weft_bench::load`),
//! so the bench can pin it to a CPU inside a pod's namespace.
//!
//! - `weft-load serve PORT`: accept and echo on PORT until killed; prints `listening` once bound.
//! - `weft-load connect ADDR:PORT CONCURRENCY SECONDS`: new connections; prints a JSON line
//!   with the rate, latencies and errors.
//! - `weft-load requests ADDR:PORT SECONDS`: round trips on one connection; prints a JSON line.

use std::{io::Write as _, time::Duration};

use anyhow::{Context as _, bail};
use weft_bench::load;

fn seconds(arg: Option<&String>, what: &str) -> anyhow::Result<Duration> {
    let value: f64 = arg
        .with_context(|| format!("missing {what} (seconds)"))?
        .parse()
        .with_context(|| format!("{what} must be a number of seconds"))?;
    Ok(Duration::from_secs_f64(value))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target = || -> anyhow::Result<std::net::SocketAddrV4> {
        args.get(1)
            .context("missing the target ADDR:PORT")?
            .parse()
            .context("the target must be an IPv4 ADDR:PORT")
    };
    let output = match args.first().map(String::as_str) {
        Some("serve") => {
            let port: u16 = args
                .get(1)
                .context("missing the PORT")?
                .parse()
                .context("PORT must be a number")?;
            let listener = load::listener(port).with_context(|| format!("listening on {port}"))?;
            let mut stdout = std::io::stdout();
            writeln!(stdout, "listening")?;
            stdout.flush()?;
            load::serve(&listener)?;
            return Ok(());
        }
        Some("connect") => {
            let concurrency: u32 = args
                .get(2)
                .context("missing CONCURRENCY")?
                .parse()
                .context("CONCURRENCY must be a number")?;
            let rate =
                load::connect_rate(target()?, concurrency, seconds(args.get(3), "SECONDS")?)?;
            serde_json::to_string(&rate)?
        }
        Some("requests") => serde_json::to_string(&load::request_rate(
            target()?,
            seconds(args.get(2), "SECONDS")?,
        ))?,
        _ => bail!(
            "use: weft-load serve PORT | connect ADDR:PORT CONCURRENCY SECONDS | requests ADDR:PORT SECONDS"
        ),
    };
    println!("{output}");
    Ok(())
}
