//! `ferry-echo`: the test bed's backend. Answers every request with its name and the client
//! address it saw, over TCP and UDP.
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The name in every answer (default: the host name, a pod's name in a container).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// TCP connections served at once.
    #[arg(long, default_value_t = 32)]
    workers: usize,
}

extern "C" fn quit(_: libc::c_int) {
    unsafe { libc::_exit(0) }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // As a container's PID 1 it has no default handlers: stop at once on SIGTERM (a pod's
    // graceful termination) instead of waiting for the SIGKILL.
    unsafe {
        libc::signal(libc::SIGTERM, quit as *const () as libc::sighandler_t);
    }
    let name = match a.name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")?
            .trim()
            .to_string(),
    };
    ferry_testbed::echo::serve(&name, a.port, a.workers)
}
