//! PNG charts of the comparison (plotters, DejaVu Sans from Debian's fonts-dejavu-core).

use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::prelude::*;

pub struct Series {
    pub label: String,
    /// (Services, new connections/s)
    pub conn_rate: Vec<(f64, f64)>,
    /// (Services, programming seconds)
    pub program_s: Vec<(f64, f64)>,
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT)
            .map_err(|e| format!("{FONT}: {e} (cargo xtask setup installs fonts-dejavu-core)"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT}: not a usable font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn bounds(points: impl Iterator<Item = (f64, f64)>) -> ((f64, f64), (f64, f64)) {
    points.fold(
        ((f64::MAX, 0.0f64), (f64::MAX, 0.0f64)),
        |((x0, x1), (y0, y1)), (x, y)| ((x0.min(x), x1.max(x)), (y0.min(y), y1.max(y))),
    )
}

fn chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    log_y: bool,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let ((x0, x1), (y0, y1)) = bounds(series.iter().flat_map(|(_, p)| p.iter().copied()));
    if x1 == 0.0 {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let x = ((x0 * 0.8).max(0.5))..(x1 * 1.25);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    if log_y {
        let c = builder
            .build_cartesian_2d(
                x.log_scale(),
                ((y0 * 0.5).max(1e-4)..(y1 * 2.0)).log_scale(),
            )
            .map_err(|e| anyhow!("{e}"))?;
        lines(c, y_desc, series)?;
    } else {
        let c = builder
            .build_cartesian_2d(x.log_scale(), 0.0..(y1 * 1.15))
            .map_err(|e| anyhow!("{e}"))?;
        lines(c, y_desc, series)?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Axes, one line per series, a legend.
fn lines<'a, Y>(
    mut c: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<LogCoord<f64>, Y>>,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    c.configure_mesh()
        .x_desc("Services (N)")
        .x_label_formatter(&|x| format!("{}", *x as u64))
        .y_desc(y_desc)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        c.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// `compare-connrate.png` (conn/s vs N per mode) and `compare-programming.png` (programming time
/// vs N, log scale).
pub fn compare(series: &[Series], dir: &Path) -> Result<()> {
    register_font()?;
    let rate: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .filter(|s| !s.conn_rate.is_empty())
        .map(|s| (s.label.clone(), s.conn_rate.clone()))
        .collect();
    chart(
        &dir.join("compare-connrate.png"),
        "New connections per second through a ClusterIP",
        "connections/s",
        false,
        &rate,
    )?;
    let prog: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .filter(|s| !s.program_s.is_empty())
        .map(|s| (s.label.clone(), s.program_s.clone()))
        .collect();
    chart(
        &dir.join("compare-programming.png"),
        "Programming N Services from scratch",
        "seconds (log)",
        true,
        &prog,
    )?;
    Ok(())
}
