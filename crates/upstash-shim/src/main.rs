//! `upstash-shim --port 8079 --redis redis://127.0.0.1:6379 --token dev-token`
//!
//! Serves the Upstash REST API over the given Redis on 127.0.0.1 until
//! interrupted. The token may also come from `UPSTASH_SHIM_TOKEN`.

use std::process::ExitCode;

const USAGE: &str =
    "usage: upstash-shim [--port 8079] [--redis redis://127.0.0.1:6379] --token TOKEN";

struct Args {
    port: u16,
    redis: String,
    token: String,
}

fn parse_args() -> Result<Args, String> {
    let mut port = 8079;
    let mut redis = "redis://127.0.0.1:6379".to_owned();
    let mut token = std::env::var("UPSTASH_SHIM_TOKEN").ok();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--port" => {
                port = value()?
                    .parse()
                    .map_err(|_| "--port must be a port number")?
            }
            "--redis" => redis = value()?,
            "--token" => token = Some(value()?),
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or("--token (or UPSTASH_SHIM_TOKEN) is required")?;
    Ok(Args { port, redis, token })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("upstash-shim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upstash-shim: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    let (addr, _handle) = upstash_shim::serve_on(listener, &args.redis, &args.token).await?;
    // Scripts wait for this line before sending requests.
    println!("upstash-shim listening on http://{addr}");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
