//! Line charts for the benchmarks and the learner's evaluation, written as
//! SVG or PNG by the file's extension (plotters; text drawn with a TrueType
//! font read from the system, or from `DIMA_FONT`).

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

/// Where fonts usually are: Debian/Ubuntu (fonts-dejavu-core), Arch,
/// Fedora, Liberation, macOS.
const FONT_PATHS: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Line colours, in series order: distinct on white and for the common
/// colour-vision deficiencies (Okabe–Ito).
const COLORS: [(u8, u8, u8); 7] = [
    (0, 114, 178),
    (213, 94, 0),
    (0, 158, 115),
    (204, 121, 167),
    (86, 180, 233),
    (230, 159, 0),
    (0, 0, 0),
];

/// One line: a name for the legend and its points (x, y).
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The legend's label.
    pub name: String,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
}

/// Registers a TrueType font as plotters' "sans-serif" once per process.
fn ensure_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let chosen = std::env::var_os("DIMA_FONT").map(std::path::PathBuf::from);
            let candidates: Vec<std::path::PathBuf> = match &chosen {
                Some(path) => vec![path.clone()],
                None => FONT_PATHS.iter().map(std::path::PathBuf::from).collect(),
            };
            for path in &candidates {
                let bytes = match std::fs::read(path) {
                    Ok(bytes) => bytes,
                    Err(e) if chosen.is_some() => {
                        return Err(format!("DIMA_FONT={}: {e}", path.display()));
                    }
                    Err(_) => continue,
                };
                // plotters keeps the font for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{} is not a TrueType font", path.display()));
            }
            Err(format!(
                "no TrueType font to draw text with: set DIMA_FONT to a .ttf file or install \
                 one (Debian: apt install fonts-dejavu-core); looked in {}",
                FONT_PATHS.join(", ")
            ))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Draws `series` as lines into `path`: PNG when it ends in `.png`, SVG
/// when it ends in `.svg`. The y axis spans the data with a small margin.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    ensure_font()?;
    let size = (800, 450);
    let failed = |e: String| anyhow::anyhow!("drawing {}: {e}", path.display());
    match path.extension().and_then(|e| e.to_str()) {
        Some("png") => draw(
            BitMapBackend::new(path, size).into_drawing_area(),
            title,
            x_desc,
            y_desc,
            series,
        )
        .map_err(|e| failed(e.to_string())),
        Some("svg") => draw(
            SVGBackend::new(path, size).into_drawing_area(),
            title,
            x_desc,
            y_desc,
            series,
        )
        .map_err(|e| failed(e.to_string())),
        _ => anyhow::bail!(
            "{}: the plot's file name must end in .png or .svg",
            path.display()
        ),
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    let (x_low, x_high) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let (y_low, y_high) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let (x_low, x_high) = if x_low < x_high {
        (x_low, x_high)
    } else {
        (0.0, 1.0)
    };
    let (y_low, y_high) = if y_low <= y_high {
        let pad = ((y_high - y_low) * 0.05).max(1e-3);
        (y_low - pad, y_high + pad)
    } else {
        (0.0, 1.0)
    };
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x_low..x_high, y_low..y_high)?;
    let whole = points().all(|p| p.0.fract() == 0.0);
    let x_label = |x: &f64| {
        if whole {
            format!("{x:.0}")
        } else {
            format!("{x}")
        }
    };
    chart
        .configure_mesh()
        .x_label_formatter(&x_label)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    for (i, line) in series.iter().enumerate() {
        let (r, g, b) = COLORS[i % COLORS.len()];
        let color = RGBColor(r, g, b).to_rgba();
        chart
            .draw_series(LineSeries::new(
                line.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(line.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()?;
    root.present()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_and_svg_are_written_and_other_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let series = vec![
            Series {
                name: "a".into(),
                points: vec![(0.0, 0.5), (1.0, 0.7), (2.0, 0.6)],
            },
            Series {
                name: "b".into(),
                points: vec![(0.0, 0.4), (2.0, 0.65)],
            },
        ];
        let png = dir.path().join("chart.png");
        line_chart(&png, "title", "x", "y", &series).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
        let svg = dir.path().join("chart.svg");
        line_chart(&svg, "title", "x", "y", &series).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("<polyline"));
        let err = line_chart(&dir.path().join("chart.jpg"), "t", "x", "y", &series).unwrap_err();
        assert!(
            err.to_string().contains("must end in .png or .svg"),
            "{err}"
        );
    }
}
