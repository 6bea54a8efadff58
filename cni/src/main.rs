//! `ferry-cni`: run by a container runtime with the CNI environment and the network
//! configuration on stdin; prints the result (or the error) as JSON on stdout.

use std::io::Read;

use cni::plugin;
use cni::spec::{CniError, Code, Env};

fn main() {
    let mut stdin = Vec::new();
    let outcome = match Env::read(|k| std::env::var(k).ok()) {
        Err(e) => Err(e),
        Ok(env) => {
            let read = if env.command == cni::spec::Command::Version {
                Ok(0)
            } else {
                std::io::stdin().read_to_end(&mut stdin)
            };
            match read {
                Err(e) => Err(CniError::new(Code::Io, "reading stdin", e.to_string())),
                Ok(_) => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| CniError::new(Code::Io, "starting", e.to_string()))
                    .and_then(|rt| rt.block_on(plugin::run(&env, &stdin))),
            }
        }
    };
    match outcome {
        Ok(Some(v)) => println!("{v}"),
        Ok(None) => {}
        Err(e) => {
            println!("{}", e.to_json(&plugin::error_version(&stdin)));
            eprintln!("ferry-cni: {e}");
            std::process::exit(1);
        }
    }
}
