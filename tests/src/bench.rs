//! What the crate benchmarks that run on the test bed share: their arguments (`--quick`,
//! `--out DIR`), percentiles, and writing the report next to the others.

use std::path::PathBuf;

use anyhow::Result;

pub struct BenchArgs {
    /// A short run that shows the benchmark works; figures are noisier.
    pub quick: bool,
    /// Where `<name>.md` and `<name>.json` go (`cargo xtask bench` passes bench/results).
    pub out: Option<PathBuf>,
}

impl BenchArgs {
    pub fn parse() -> BenchArgs {
        let args: Vec<String> = std::env::args().collect();
        BenchArgs {
            quick: args.iter().any(|a| a == "--quick"),
            out: args
                .iter()
                .position(|a| a == "--out")
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from),
        }
    }

    /// Prints the table and writes `<name>.md` and `<name>.json` when `--out` was given.
    pub fn report(&self, name: &str, md: &str, json: &serde_json::Value) -> Result<()> {
        println!("\n{md}");
        if let Some(out) = &self.out {
            std::fs::create_dir_all(out)?;
            std::fs::write(out.join(format!("{name}.md")), md)?;
            std::fs::write(
                out.join(format!("{name}.json")),
                serde_json::to_string_pretty(json)?,
            )?;
            eprintln!("[bench {name}] wrote {}/{name}.{{md,json}}", out.display());
        }
        Ok(())
    }
}

/// The `q` quantile of an ascending slice (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// "quick run on 2 cores, kernel 6.18": the conditions every report starts with.
pub fn conditions(quick: bool) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{} run on {} cores, kernel {}",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(super::percentile(&v, 0.5), 51.0);
        assert_eq!(super::percentile(&v, 0.99), 100.0);
        assert_eq!(super::percentile(&[3.0], 0.99), 3.0);
    }
}
