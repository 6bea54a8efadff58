//! `cargo xtask bench cni`: ADD and DEL latency of `ferry-cni` against the reference `ptp`
//! plugin with `host-local` IPAM, in the same run, as a runtime sees it (process start to
//! exit, JSON result read). 100 pod namespaces in a node namespace; each plugin adds all of
//! them one after another, then deletes them; the plugins alternate over the rounds so
//! neither always runs on a warmer machine.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Result};
use ferry_testbed::cni::Plugin;
use ferry_testbed::Netns;
use serde::Serialize;

const TARGET_ADD_RATIO: f64 = 0.5;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn latency(mut v: Vec<Duration>) -> Latency {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e3;
    Latency {
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    pub plugin: String,
    pub add: Latency,
    pub del: Latency,
}

#[derive(Serialize)]
struct Report {
    pods: usize,
    rounds: usize,
    rows: Vec<Row>,
}

/// Namespaces removed however the benchmark ends.
struct Bed {
    node: Netns,
    pods: Vec<Netns>,
    data: std::path::PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for p in &self.pods {
            p.delete();
        }
        self.node.delete();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

pub fn run(quick: bool) -> Result<()> {
    let (pods, rounds) = if quick { (30, 1) } else { (100, 3) };
    let prefix = format!("fb{}c", std::process::id());
    let bed = Bed {
        node: Netns::create(&format!("{prefix}-node"))?,
        pods: (0..pods)
            .map(|i| Netns::create(&format!("{prefix}-p{i}")))
            .collect::<Result<_>>()?,
        data: std::env::temp_dir().join(format!("{prefix}-ipam")),
    };
    let plugins = [Plugin::ferry()?, Plugin::reference()?];
    let mut adds: Vec<Vec<Duration>> = vec![Vec::new(); plugins.len()];
    let mut dels: Vec<Vec<Duration>> = vec![Vec::new(); plugins.len()];
    for round in 0..rounds {
        for k in 0..plugins.len() {
            // Alternate which plugin goes first.
            let i = (k + round) % plugins.len();
            let plugin = &plugins[i];
            eprintln!(
                "[bench cni] round {}/{rounds}: {} ADD and DEL for {pods} pods",
                round + 1,
                plugin.name
            );
            let conf = plugin.conf(
                "1.0.0",
                "10.247.0.0/24",
                &bed.data.join(plugin.name.replace(' ', "")),
            );
            for (n, pod) in bed.pods.iter().enumerate() {
                let o = plugin.call(&bed.node, "ADD", &format!("c{n}"), Some(pod), &conf)?;
                if !o.ok {
                    bail!("{} ADD failed: {}", plugin.name, o.out);
                }
                adds[i].push(o.took);
            }
            for (n, pod) in bed.pods.iter().enumerate() {
                let o = plugin.call(&bed.node, "DEL", &format!("c{n}"), Some(pod), &conf)?;
                if !o.ok {
                    bail!("{} DEL failed: {}", plugin.name, o.out);
                }
                dels[i].push(o.took);
            }
        }
    }
    let rows: Vec<Row> = plugins
        .iter()
        .enumerate()
        .map(|(i, p)| Row {
            plugin: p.name.to_string(),
            add: latency(adds[i].clone()),
            del: latency(dels[i].clone()),
        })
        .collect();
    let (f, r) = (&rows[0], &rows[1]);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "`cargo xtask bench cni{}`: {pods} pods x {rounds} round(s) per plugin, sequential, process start to exit (as a runtime waits), plugins alternating.\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(md, "| plugin | ADD p50 | ADD p99 | DEL p50 | DEL p99 |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for row in &rows {
        let _ = writeln!(
            md,
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            row.plugin, row.add.p50_ms, row.add.p99_ms, row.del.p50_ms, row.del.p99_ms
        );
    }
    let _ = writeln!(
        md,
        "\nferry-cni vs the reference: ADD {:.2}x at p50, {:.2}x at p99 (target: at most {TARGET_ADD_RATIO}x); DEL {:.2}x at p50.",
        f.add.p50_ms / r.add.p50_ms,
        f.add.p99_ms / r.add.p99_ms,
        f.del.p50_ms / r.del.p50_ms
    );
    crate::measure::write_results(
        "cni",
        &Report {
            pods,
            rounds,
            rows: rows.clone(),
        },
        &md,
    )?;
    Ok(())
}
