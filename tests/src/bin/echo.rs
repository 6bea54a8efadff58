//! `ferry-echo`: the test bed's backend. Answers every request with its name and the client
//! address it saw, over TCP and UDP.
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    name: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// TCP connections served at once.
    #[arg(long, default_value_t = 32)]
    workers: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    ferry_testbed::echo::serve(&a.name, a.port, a.workers)
}
