//! The roofline behind `bench --roofline`, `bench kernels --roofline` and `run --profile
//! --roofline`: each kernel (or family) as a point at its arithmetic intensity (analytic flops
//! per analytic byte) and achieved rate, log-log, under the two roofs measured in the same run:
//! the copy bandwidth (rate = bandwidth × intensity) and the f32 FMA throughput. A point's
//! distance below its roof is how far it is from what the device did on that clock.
//!
//! Kernels that count no flops (copies, gathers, top-k) have no place on a GFLOP/s axis; the
//! caption counts them and their time so the picture does not hide them.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use super::plot::{
    ensure_font, series_colour, series_marker, write_png, Marker, FAMILY, HEIGHT, REFERENCE_GREY,
    WIDTH,
};
use crate::error::{Error, Result};
use crate::gpu::profiler::ProfileReport;

/// One kernel or family: totals over the run.
#[derive(Clone, Debug, PartialEq)]
pub struct RooflinePoint {
    pub name: String,
    pub flops: f64,
    pub bytes: f64,
    pub seconds: f64,
}

impl RooflinePoint {
    /// Flops per byte.
    pub fn intensity(&self) -> f64 {
        self.flops / self.bytes
    }

    /// Achieved GFLOP/s.
    pub fn gflops(&self) -> f64 {
        self.flops / self.seconds / 1e9
    }
}

/// Everything one roofline shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Roofline {
    pub title: String,
    /// The f32 FMA ceiling of the same run, GFLOP/s.
    pub fma_gflops: f64,
    /// The copy ceiling of the same run, GB/s.
    pub copy_gbytes_per_s: f64,
    pub points: Vec<RooflinePoint>,
}

impl Roofline {
    /// One point per kernel name of a profile (all its shapes and stages together).
    pub fn from_profile(
        title: &str,
        profile: &ProfileReport,
        fma_gflops: f64,
        copy_gbytes_per_s: f64,
    ) -> Self {
        let mut kernels: BTreeMap<&str, RooflinePoint> = BTreeMap::new();
        for row in &profile.rows {
            let secs = row.total_us / 1e6;
            let point = kernels
                .entry(row.kernel.as_str())
                .or_insert_with(|| RooflinePoint {
                    name: row.kernel.clone(),
                    flops: 0.0,
                    bytes: 0.0,
                    seconds: 0.0,
                });
            point.flops += row.gflops * 1e9 * secs;
            point.bytes += row.gbytes_per_s * 1e9 * secs;
            point.seconds += secs;
        }
        Self {
            title: title.to_string(),
            fma_gflops,
            copy_gbytes_per_s,
            points: kernels.into_values().collect(),
        }
    }

    /// The ridge point: the intensity where the copy roof meets the FMA roof.
    pub fn ridge(&self) -> f64 {
        self.fma_gflops / self.copy_gbytes_per_s
    }

    /// The points that can be drawn (some flops, some bytes, some time), slowest first.
    fn drawable(&self) -> Vec<&RooflinePoint> {
        let mut points: Vec<&RooflinePoint> = self
            .points
            .iter()
            .filter(|p| p.flops > 0.0 && p.bytes > 0.0 && p.seconds > 0.0)
            .collect();
        points.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        points
    }

    /// Draws the roofline and writes it to `path` as a PNG.
    ///
    /// Errors: ceilings that are not positive and finite, or no point with flops →
    /// [`Error::Argument`]; no usable font, or `path` cannot be written → [`Error::File`].
    pub fn draw(&self, path: &Path) -> Result<()> {
        let ceilings = [self.fma_gflops, self.copy_gbytes_per_s];
        if !ceilings.iter().all(|c| c.is_finite() && *c > 0.0) {
            return Err(Error::argument(
                "roofline ceilings",
                format!("{ceilings:?} must be positive and finite"),
            ));
        }
        if self.drawable().is_empty() {
            return Err(Error::argument(
                "roofline",
                "no kernel with flops, bytes and time to draw",
            ));
        }
        ensure_font(path)?;
        let mut pixels = vec![255u8; WIDTH as usize * HEIGHT as usize * 3];
        self.render(&mut pixels).map_err(|reason| Error::File {
            path: path.to_path_buf(),
            reason: format!("could not draw the roofline: {reason}"),
        })?;
        write_png(&pixels, path)
    }

    /// The axes' ranges: every point, the ridge and the FMA roof with room around them.
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let points = self.drawable();
        let xs = points.iter().map(|p| p.intensity()).chain([self.ridge()]);
        let (x_lo, x_hi) = xs.fold((f64::INFINITY, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        let ys = points.iter().map(|p| p.gflops()).chain([self.fma_gflops]);
        let (y_lo, y_hi) = ys.fold((f64::INFINITY, 0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
        ((x_lo / 3.0, x_hi * 3.0), (y_lo / 3.0, y_hi * 2.0))
    }

    fn caption(&self) -> String {
        let hidden: Vec<&RooflinePoint> = self.points.iter().filter(|p| p.flops <= 0.0).collect();
        if hidden.is_empty() {
            return self.title.clone();
        }
        let ms: f64 = hidden.iter().map(|p| p.seconds * 1e3).sum();
        format!(
            "{} ({} kernels without flops, {ms:.1} ms, not drawn)",
            self.title,
            hidden.len()
        )
    }

    fn render(&self, pixels: &mut [u8]) -> std::result::Result<(), String> {
        let root = BitMapBackend::with_buffer(pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let ((x_lo, x_hi), (y_lo, y_hi)) = self.ranges();
        let mut chart = ChartBuilder::on(&root)
            .caption(self.caption(), (FAMILY, 20))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("arithmetic intensity (flops per byte)")
            .y_desc("GFLOP/s")
            .x_label_formatter(&|v| short(*v))
            .y_label_formatter(&|v| short(*v))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(|e| e.to_string())?;
        let ridge = self.ridge();
        let roof = [
            (x_lo, self.copy_gbytes_per_s * x_lo),
            (ridge, self.fma_gflops),
            (x_hi, self.fma_gflops),
        ];
        let label = format!(
            "roofs: copy {:.2} GB/s, FMA f32 {:.1} GFLOP/s",
            self.copy_gbytes_per_s, self.fma_gflops
        );
        let style = REFERENCE_GREY.stroke_width(3);
        chart
            .draw_series(LineSeries::new(roof, style))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x - 10, y), (x + 10, y)], style));
        for (index, point) in self.drawable().into_iter().enumerate() {
            draw_point(&mut chart, index, point)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .margin(10)
            .label_font((FAMILY, 13))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(160, 160, 160))
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    }
}

/// A log axis label with two significant digits below 10 (0.0031, 0.25, 4.5) and none above.
fn short(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v > 0.0 {
        let decimals = (1.0 - v.log10().floor()).max(0.0) as usize;
        format!("{v:.decimals$}")
    } else {
        format!("{v}")
    }
}

type LogChart<'a> = ChartContext<
    'a,
    BitMapBackend<'a>,
    Cartesian2d<
        plotters::coord::combinators::LogCoord<f64>,
        plotters::coord::combinators::LogCoord<f64>,
    >,
>;

/// One kernel's marker, labelled in the legend with its time and share of its roof.
fn draw_point(
    chart: &mut LogChart,
    index: usize,
    point: &RooflinePoint,
) -> std::result::Result<(), String> {
    let (colour, marker) = (series_colour(index), series_marker(index));
    let at = (point.intensity(), point.gflops());
    let style = colour.filled();
    let label = format!("{} ({:.1} ms)", point.name, point.seconds * 1e3);
    let drawn = match marker {
        Marker::Circle => chart.draw_series([Circle::new(at, 6, style)]),
        Marker::Triangle => chart.draw_series([TriangleMarker::new(at, 8, style)]),
        Marker::Square => {
            chart.draw_series([EmptyElement::at(at) + Rectangle::new([(-5, -5), (5, 5)], style)])
        }
    };
    let legend = drawn.map_err(|e| e.to_string())?.label(label);
    match marker {
        Marker::Circle => legend.legend(move |at| Circle::new(at, 5, style)),
        Marker::Triangle => legend.legend(move |at| TriangleMarker::new(at, 6, style)),
        Marker::Square => {
            legend.legend(move |(x, y)| Rectangle::new([(x - 4, y - 4), (x + 4, y + 4)], style))
        }
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(name: &str, flops: f64, bytes: f64, seconds: f64) -> RooflinePoint {
        RooflinePoint {
            name: name.into(),
            flops,
            bytes,
            seconds,
        }
    }

    /// A compute-bound, a bandwidth-bound and a flop-less kernel under roofs of 40 GFLOP/s and
    /// 8 GB/s (ridge at 5 flops per byte).
    fn synthetic() -> Roofline {
        Roofline {
            title: "synthetic".into(),
            fma_gflops: 40.0,
            copy_gbytes_per_s: 8.0,
            points: vec![
                point("matmul", 2e9, 2e7, 0.1),
                point("norm", 1e6, 8e6, 0.004),
                point("gather", 0.0, 4e6, 0.001),
            ],
        }
    }

    fn temp_png(tag: &str) -> std::path::PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::env::temp_dir().join(format!(
            "llava-wgpu-roofline-{tag}-{}-{nanos}.png",
            std::process::id()
        ))
    }

    #[test]
    fn point_rates_and_the_ridge_follow_from_the_totals() {
        let r = synthetic();
        assert_eq!(r.ridge(), 5.0);
        let matmul = &r.points[0];
        assert_eq!(matmul.intensity(), 100.0);
        assert!((matmul.gflops() - 20.0).abs() < 1e-9);
        // The flop-less kernel is counted in the caption, not drawn.
        let drawn: Vec<&str> = r.drawable().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(drawn, ["matmul", "norm"]);
        assert!(r.caption().contains("1 kernels without flops, 1.0 ms"));
    }

    /// The PNG has the plot's size and the first two series' colours (the markers) in it.
    #[test]
    fn draws_a_png_with_every_drawable_point() {
        let path = temp_png("draw");
        synthetic().draw(&path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        std::fs::remove_file(&path).ok();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        for index in 0..2 {
            let c = series_colour(index);
            let found = img.pixels().any(|p| p.0 == [c.0, c.1, c.2]);
            assert!(found, "no pixel of series {index}'s colour");
        }
    }

    #[test]
    fn nothing_to_draw_and_bad_ceilings_are_argument_errors() {
        let path = temp_png("bad");
        let mut r = synthetic();
        r.points.retain(|p| p.flops == 0.0);
        let err = r.draw(&path).unwrap_err().to_string();
        assert!(err.contains("no kernel with flops"), "{err}");
        let mut r = synthetic();
        r.copy_gbytes_per_s = 0.0;
        let err = r.draw(&path).unwrap_err().to_string();
        assert!(err.contains("roofline ceilings"), "{err}");
        assert!(!path.exists());
    }
}
