//! SVG plots of an evaluation report, written next to its JSON: reliability diagram, confusion
//! matrix, risk-coverage curves and accuracy against shots (plotters, SVG backend only: no font
//! files, no bitmap code).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::MethodResult;
use super::protocol::{EvalReport, ShotResult};

/// The method whose diagrams are drawn alone (reliability, confusion): the shipped one.
pub const MAIN_METHOD: &str = "sgps images+text";

const SIZE: (u32, u32) = (720, 520);
/// Reliability bins with fewer predictions are left out of the diagram (not of the ECE).
const MIN_BIN: usize = 10;
const FONT: &str = "sans-serif";
const COLOURS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x8c, 0x56, 0x4b),
];

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;
/// Draws one plot of a report into a file.
type Plot = fn(&EvalReport, &Path) -> DrawResult<()>;

/// A line / scatter chart of these plots (both axes f64).
type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Draw the series' legend at `pos` and write the SVG.
fn legend_and_save<'b>(
    chart: &mut Chart<'b, 'b>,
    root: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    pos: SeriesLabelPosition,
) -> DrawResult<()> {
    chart
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

fn main_method(s: &ShotResult) -> Option<&MethodResult> {
    s.methods
        .iter()
        .find(|m| m.method == MAIN_METHOD)
        .or(s.methods.first())
}

/// Write the four plots as `<stem>.<plot>.svg` in `dir`; returns the files written.
pub fn write_plots(report: &EvalReport, dir: &Path, stem: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let plots: [(&str, Plot); 4] = [
        ("reliability", reliability),
        ("confusion", confusion),
        ("risk-coverage", risk_coverage),
        ("accuracy-vs-shots", accuracy_vs_shots),
    ];
    for (name, draw) in plots {
        let path = dir.join(format!("{stem}.{name}.svg"));
        draw(report, &path).map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))?;
        out.push(path);
    }
    Ok(out)
}

fn title(report: &EvalReport, what: &str) -> String {
    format!(
        "{what} - {} ({}-way)",
        report.config.protocol, report.config.ways
    )
}

fn reliability(report: &EvalReport, path: &Path) -> DrawResult<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            title(report, &format!("Reliability, {MAIN_METHOD}")),
            (FONT, 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("top-class probability")
        .y_desc("accuracy")
        .draw()?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.4)))?
        .label("perfectly calibrated")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.4)));
    for (i, s) in report.results.iter().enumerate() {
        let Some(m) = main_method(s) else { continue };
        let c = colour(i);
        let pts: Vec<(f64, f64)> = m
            .reliability
            .iter()
            .filter(|b| b.count >= MIN_BIN)
            .map(|b| (b.confidence, b.accuracy))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(format!(
                "{}-shot (ECE {:.3}, {} queries; bins of >= {MIN_BIN})",
                s.shots, m.referral.ece, m.referral.predictions
            ))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
    }
    legend_and_save(&mut chart, &root, SeriesLabelPosition::UpperLeft)
}

fn confusion(report: &EvalReport, path: &Path) -> DrawResult<()> {
    let Some(s) = report.results.iter().max_by_key(|s| s.shots) else {
        return Err("the report has no results".into());
    };
    let m = main_method(s).ok_or("the report has no methods")?;
    let n = m.confusion.len();
    if n == 0 {
        return Err("the report has no confusion counts (written by an older sgps)".into());
    }
    let names: Vec<String> = report
        .config
        .classes
        .iter()
        .map(|c| c.rsplit('/').next().unwrap_or(c).replace('_', " "))
        .collect();
    let root = SVGBackend::new(path, (SIZE.0, SIZE.0)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(50);
    top.titled(
        &title(
            report,
            &format!("Confusion, {MAIN_METHOD}, {}-shot", s.shots),
        ),
        (FONT, 20),
    )?;
    let mut chart = ChartBuilder::on(&body)
        .margin(12)
        .x_label_area_size(150)
        .y_label_area_size(170)
        .build_cartesian_2d(0f64..n as f64, n as f64..0f64)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(0)
        .y_labels(0)
        .x_desc("predicted")
        .y_desc("true")
        .draw()?;
    for (t, row) in m.confusion.iter().enumerate() {
        let total = row.iter().sum::<u32>().max(1) as f64;
        for (p, &k) in row.iter().enumerate() {
            let share = k as f64 / total;
            let fill = RGBColor(
                (255.0 - 224.0 * share) as u8,
                (255.0 - 136.0 * share) as u8,
                (255.0 - 75.0 * share) as u8,
            );
            let (x, y) = (p as f64, t as f64);
            chart.draw_series([Rectangle::new([(x, y), (x + 1.0, y + 1.0)], fill.filled())])?;
            let ink = if share > 0.5 { WHITE } else { BLACK };
            chart.draw_series([
                Text::new(
                    format!("{:.0}%", 100.0 * share),
                    (x + 0.36, y + 0.36),
                    (FONT, 18).into_font().color(&ink),
                ),
                Text::new(
                    format!("{k} of {total}"),
                    (x + 0.33, y + 0.56),
                    (FONT, 13).into_font().color(&ink),
                ),
            ])?;
        }
    }
    // class names along both axes (in the whole image's pixels)
    let area = chart.plotting_area();
    let (w, h) = area.dim_in_pixel();
    let (ox, oy) = area.get_base_pixel();
    for (i, name) in names.iter().enumerate().take(n) {
        let cx = ox + ((i as f64 + 0.5) * w as f64 / n as f64) as i32;
        let cy = oy + ((i as f64 + 0.5) * h as f64 / n as f64) as i32;
        root.draw(&Text::new(
            name.clone(),
            (cx - 8, oy + h as i32 + 8),
            (FONT, 14)
                .into_font()
                .transform(FontTransform::Rotate90)
                .color(&BLACK),
        ))?;
        root.draw(&Text::new(
            name.clone(),
            (ox - 165, cy - 7),
            (FONT, 14).into_font().color(&BLACK),
        ))?;
    }
    root.present()?;
    Ok(())
}

fn risk_coverage(report: &EvalReport, path: &Path) -> DrawResult<()> {
    let Some(s) = report.results.iter().max_by_key(|s| s.shots) else {
        return Err("the report has no results".into());
    };
    let max_risk = s
        .methods
        .iter()
        .flat_map(|m| m.risk_coverage.iter().map(|p| p[1]))
        .fold(0.05f64, f64::max);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            title(report, &format!("Risk-coverage, {}-shot", s.shots)),
            (FONT, 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..1f64, 0f64..(max_risk * 1.1).min(1.0))?;
    chart
        .configure_mesh()
        .x_desc("coverage (share of cases not referred, most confident first)")
        .y_desc("error rate among them")
        .draw()?;
    for (i, m) in s.methods.iter().enumerate() {
        let c = colour(i);
        let pts: Vec<(f64, f64)> = m.risk_coverage.iter().map(|p| (p[0], p[1])).collect();
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(format!("{} (AURC {:.3})", m.method, m.referral.aurc))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        if m.method == MAIN_METHOD {
            let r = &m.referral;
            let at = (1.0 - r.refer_rate, 1.0 - r.accepted_accuracy);
            chart
                .draw_series([Circle::new(at, 6, c.filled())])?
                .label(format!(
                    "shipped threshold {:.2}: {:.1}% referred",
                    r.threshold,
                    100.0 * r.refer_rate
                ))
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, c.filled()));
        }
    }
    legend_and_save(&mut chart, &root, SeriesLabelPosition::UpperLeft)
}

fn accuracy_vs_shots(report: &EvalReport, path: &Path) -> DrawResult<()> {
    let shots: Vec<usize> = report.results.iter().map(|s| s.shots).collect();
    let (lo, hi) = (
        *shots.iter().min().ok_or("the report has no results")? as f64,
        *shots.iter().max().ok_or("the report has no results")? as f64,
    );
    let chance = 1.0 / report.config.ways.max(1) as f64;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title(report, "Accuracy against shots"), (FONT, 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((lo - 0.5)..(hi + 0.5), 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("shots per class")
        .y_desc("accuracy % (mean, 95% CI over episodes)")
        .x_labels((hi - lo) as usize + 2)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            [(lo - 0.5, 100.0 * chance), (hi + 0.5, 100.0 * chance)],
            BLACK.mix(0.4),
        ))?
        .label(format!("chance ({:.0}%)", 100.0 * chance))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.4)));
    let names: Vec<&str> = report.results[0]
        .methods
        .iter()
        .map(|m| m.method.as_str())
        .collect();
    for (i, name) in names.iter().enumerate() {
        let c = colour(i);
        let pts: Vec<(f64, f64, f64)> = report
            .results
            .iter()
            .filter_map(|s| {
                s.methods.iter().find(|m| m.method == *name).map(|m| {
                    (
                        s.shots as f64,
                        100.0 * m.accuracy.mean,
                        100.0 * m.accuracy.ci95,
                    )
                })
            })
            .collect();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                c.stroke_width(2),
            ))?
            .label(name.to_string())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(
            pts.iter()
                .map(|&(x, y, e)| ErrorBar::new_vertical(x, y - e, y, y + e, c.filled(), 8)),
        )?;
    }
    legend_and_save(&mut chart, &root, SeriesLabelPosition::LowerRight)
}
