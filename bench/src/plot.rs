//! SVG plots with `plotters` (SVG backend only: no font or system library
//! dependencies; text is left to the SVG viewer).
//!
//! - latency CDF per broker: x = percentile on a "nines" scale
//!   (`-log10(1 - p)`: 90 → 1, 99 → 2, 99.9 → 3), y = latency (µs, log);
//! - deliveries/s over time per broker;
//! - the broker's RSS over time, for runs long enough to show a trend (the
//!   soak).

use crate::result::{ResultFile, RunResult};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// Plot size in pixels.
const SIZE: (u32, u32) = (800, 480);

/// Series colours, one per broker/round in order.
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("plot {0}: {1}")]
    Draw(String, String),
}

fn series_name(r: &RunResult, many_rounds: bool) -> String {
    if many_rounds {
        format!("{} #{}", r.broker, r.round)
    } else {
        r.broker.clone()
    }
}

/// Writes `{stem}-latency.svg` and `{stem}-rate.svg` for the fan-out runs in
/// `file`, and `{stem}-rss.svg` when a run sampled the broker's RSS long
/// enough for a trend; returns the paths written (none if there are no
/// fan-out runs).
///
/// # Errors
/// The SVG could not be drawn or written.
pub fn plots_for(file: &ResultFile, stem: &str) -> Result<Vec<String>, PlotError> {
    let runs: Vec<&RunResult> = file.runs.iter().filter(|r| r.fanout.is_some()).collect();
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let many_rounds = runs.iter().any(|r| r.round > 0);
    let mode = if runs[0].latency.is_some() {
        // Each broker runs at half of its own maximum.
        "paced at half of each broker's max sustained rate".to_owned()
    } else {
        runs[0]
            .params
            .rate
            .map_or("burst".to_owned(), |r| format!("paced {r}/s"))
    };
    let title = format!("{} subscribers, {mode}", runs[0].params.subs);
    let lat = format!("{stem}-latency.svg");
    let rate = format!("{stem}-rate.svg");
    latency_cdf(&runs, &lat, &title, many_rounds).map_err(|e| PlotError::Draw(lat.clone(), e))?;
    rate_over_time(&runs, &rate, &title, many_rounds)
        .map_err(|e| PlotError::Draw(rate.clone(), e))?;
    let mut written = vec![lat, rate];
    let sampled: Vec<&RunResult> = runs
        .iter()
        .copied()
        .filter(|r| {
            r.fanout
                .as_ref()
                .is_some_and(|f| crate::result::rss_drift(&f.broker_rss).is_some())
        })
        .collect();
    if !sampled.is_empty() {
        let rss = format!("{stem}-rss.svg");
        rss_over_time(&sampled, &rss, &title, many_rounds)
            .map_err(|e| PlotError::Draw(rss.clone(), e))?;
        written.push(rss);
    }
    Ok(written)
}

fn nines(p: f64) -> f64 {
    -(1.0 - (p / 100.0).min(0.999_999)).log10()
}

fn latency_cdf(runs: &[&RunResult], path: &str, title: &str, many: bool) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let points: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .filter_map(|r| r.fanout.as_ref())
        .map(|f| {
            f.latency
                .cdf
                .iter()
                .map(|&(p, us)| (nines(p), us.max(1.0)))
                .collect()
        })
        .collect();
    let max_y = points.iter().flatten().map(|p| p.1).fold(10.0, f64::max) * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("latency publish→subscriber, {title}"),
            ("sans-serif", 18),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..6.0, (1.0..max_y).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency")
        .x_label_formatter(&|x: &f64| {
            // x counts nines: 1 -> 90, 2 -> 99, 3 -> 99.9, ...
            let nines = x.round().max(0.0) as usize;
            match nines {
                0 => "0".to_string(),
                1 => "90".to_string(),
                n => format!(
                    "99{}{}",
                    if n > 2 { "." } else { "" },
                    "9".repeat(n.saturating_sub(2))
                ),
            }
        })
        .y_label_formatter(&|y| format_us(*y))
        .x_labels(7)
        .draw()
        .map_err(|e| e.to_string())?;
    draw_lines(
        &mut chart,
        runs,
        points,
        many,
        SeriesLabelPosition::LowerRight,
    )?;
    root.present().map_err(|e| e.to_string())
}

/// A chart with a linear x axis and a y axis `Y` (logarithmic for latency
/// and rate, linear for RSS).
type Chart<'a, 'b, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, Y>>;

/// Draws one line per run, in the run's colour, with a legend at `legend`.
fn draw_lines<'a, 'b: 'a, Y: Ranged<ValueType = f64>>(
    chart: &mut Chart<'a, 'b, Y>,
    runs: &[&RunResult],
    lines: Vec<Vec<(f64, f64)>>,
    many: bool,
    legend: SeriesLabelPosition,
) -> Result<(), String> {
    for (i, (r, pts)) in runs.iter().zip(lines).enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(pts, colour.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(series_name(r, many))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(legend)
        .draw()
        .map_err(|e| e.to_string())
}

/// A rate axis label: 1, 10k, 2M, without a fraction.
fn format_si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.0}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// A latency axis label: µs, ms or s, without a fraction.
fn format_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.0} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.0} ms", us / 1e3)
    } else {
        format!("{us:.0} µs")
    }
}

fn rate_over_time(runs: &[&RunResult], path: &str, title: &str, many: bool) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let series: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .filter_map(|r| r.fanout.as_ref())
        .map(|f| {
            let step = f.bucket_ms as f64 / 1000.0;
            f.timeline
                .iter()
                .enumerate()
                .map(|(i, &v)| (i as f64 * step, v.max(1.0)))
                .collect()
        })
        .collect();
    let max_x = series.iter().flatten().map(|p| p.0).fold(1.0, f64::max);
    // Log scale: peers differ by orders of magnitude (fanmq's burst lasts
    // a fraction of a second at millions/s, Mosquitto's a minute at tens of
    // thousands/s), and a linear axis would show only one of them.
    let max_y = series.iter().flatten().map(|p| p.1).fold(10.0, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("deliveries/s over time, {title}"),
            ("sans-serif", 18),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_x, (1.0..max_y).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds since first delivery")
        .y_desc("deliveries/s")
        .y_label_formatter(&|y: &f64| format_si(*y))
        .draw()
        .map_err(|e| e.to_string())?;
    draw_lines(
        &mut chart,
        runs,
        series,
        many,
        SeriesLabelPosition::MiddleRight,
    )?;
    root.present().map_err(|e| e.to_string())
}

/// The broker's RSS (MiB, linear from 0: a flat line must look flat) over
/// the seconds of each run.
fn rss_over_time(runs: &[&RunResult], path: &str, title: &str, many: bool) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let series: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .filter_map(|r| r.fanout.as_ref())
        .map(|f| {
            let step = f.rss_period_ms as f64 / 1000.0;
            f.broker_rss
                .iter()
                .enumerate()
                .map(|(i, &b)| (i as f64 * step, b as f64 / (1024.0 * 1024.0)))
                .collect()
        })
        .collect();
    let max_x = series.iter().flatten().map(|p| p.0).fold(1.0, f64::max);
    let max_y = series.iter().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("broker RSS over time, {title}"), ("sans-serif", 18))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first publish")
        .y_desc("RSS (MiB)")
        .draw()
        .map_err(|e| e.to_string())?;
    draw_lines(
        &mut chart,
        runs,
        series,
        many,
        SeriesLabelPosition::LowerRight,
    )?;
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_labels_use_units_without_fractions() {
        assert_eq!(format_us(1.0), "1 µs");
        assert_eq!(format_us(1000.0), "1 ms");
        assert_eq!(format_us(250_000.0), "250 ms");
        assert_eq!(format_us(100_000_000.0), "100 s");
        assert_eq!(format_si(40_000.0), "40k");
        assert_eq!(format_si(25_000_000.0), "25M");
        assert_eq!(format_si(7.0), "7");
    }
    use crate::result::FanoutFigures;
    use crate::stats::Latency;

    /// Writes the plots of a file holding `run` into a fresh folder named
    /// after `tag`; returns the folder (for the caller to remove) and the
    /// paths written.
    fn plots_of(run: RunResult, tag: &str) -> (std::path::PathBuf, Vec<String>) {
        let file = ResultFile {
            runs: vec![run],
            ..ResultFile::default()
        };
        let dir = std::env::temp_dir().join(format!("fmb-plot-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stem = dir.join("t");
        let paths = plots_for(&file, stem.to_str().unwrap()).unwrap();
        (dir, paths)
    }

    #[test]
    fn writes_both_svgs() {
        let run = RunResult {
            broker: "x".into(),
            fanout: Some(FanoutFigures {
                latency: Latency {
                    cdf: vec![(50.0, 100.0), (99.0, 300.0), (100.0, 900.0)],
                    ..Latency::default()
                },
                timeline: vec![10.0, 20.0, 15.0],
                bucket_ms: 100,
                ..FanoutFigures::default()
            }),
            ..RunResult::default()
        };
        let (dir, paths) = plots_of(run, "both");
        assert_eq!(paths.len(), 2);
        for p in &paths {
            assert!(!p.ends_with("-rss.svg"), "no RSS plot without samples");
        }
        for p in paths {
            let svg = std::fs::read_to_string(p).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("polyline"));
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_run_with_rss_samples_gets_an_rss_plot() {
        let run = RunResult {
            broker: "x".into(),
            fanout: Some(FanoutFigures {
                timeline: vec![10.0, 20.0],
                bucket_ms: 100,
                broker_rss: (0..20).map(|i| 50_000_000 + i * 1000).collect(),
                rss_period_ms: 1000,
                ..FanoutFigures::default()
            }),
            ..RunResult::default()
        };
        let (dir, paths) = plots_of(run, "rss");
        assert_eq!(paths.len(), 3);
        let svg = std::fs::read_to_string(&paths[2]).unwrap();
        assert!(paths[2].ends_with("-rss.svg") && svg.contains("polyline"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
