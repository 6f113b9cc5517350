//! The accuracy plot behind `eval --plot`: accuracy against visual tokens kept, one line per
//! pruning method, with the 95% intervals as error bars and the unpruned accuracy as a dashed
//! reference, written as a PNG for the README.
//!
//! Drawing goes through `plotters` without its `ttf` feature, which would need fontconfig and
//! freetype at build time. Text is rendered with `ab_glyph` instead, from a TrueType file found
//! on the machine at run time (or named by `LLAVA_WGPU_FONT`), so that the crate builds anywhere
//! and only `eval --plot` needs a font.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::chart::SeriesAnno;
use plotters::coord::combinators::{LogCoord, WithKeyPoints};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};

/// One point of a method's line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlotPoint {
    /// Mean visual tokens kept per question.
    pub visual_tokens: f64,
    /// Accuracy as a fraction in [0, 1].
    pub accuracy: f64,
    /// Lower end of the 95% interval, in [0, 1].
    pub low: f64,
    /// Upper end of the 95% interval, in [0, 1].
    pub high: f64,
}

/// One pruning method: a named line of points, drawn in x order whatever their order here.
#[derive(Clone, Debug, PartialEq)]
pub struct PlotSeries {
    pub name: String,
    pub points: Vec<PlotPoint>,
    /// A variant of the series of this name (a merged selection of its method): drawn dashed,
    /// in that series' colour and marker.
    pub variant_of: Option<String>,
}

/// Everything one plot shows.
#[derive(Clone, Debug, PartialEq)]
pub struct AccuracyPlot {
    pub title: String,
    pub x_label: String,
    pub series: Vec<PlotSeries>,
    /// Horizontal reference line, e.g. the unpruned accuracy, as (label, accuracy in [0, 1]).
    pub reference: Option<(String, f64)>,
}

/// Image size in pixels: wide enough for a legend beside seven or so x ticks, and the README
/// scales it down cleanly.
pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 600;

/// The environment variable that names a TrueType/OpenType file to use instead of searching.
pub const FONT_ENV: &str = "LLAVA_WGPU_FONT";

/// The family name the font is registered under: plotters' default for captions, axis labels
/// and legends, so every text element finds it without naming a font.
pub(crate) const FAMILY: &str = "sans-serif";

/// Series colours (matplotlib's tab10 without its grey, which the reference line uses; it reads
/// well on white and to most colour-blind readers); the tenth series onwards wraps around, with
/// a different marker. Nine: every method and the adaptive rows of `eval` apart.
const COLOURS: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The reference line's grey, far from every series colour.
pub(crate) const REFERENCE_GREY: RGBColor = RGBColor(110, 110, 110);

/// The marker shapes, cycled so that series stay apart in greyscale prints too.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Marker {
    Circle,
    Triangle,
    Square,
}

const MARKERS: [Marker; 3] = [Marker::Circle, Marker::Triangle, Marker::Square];

/// The colour of series `index`, shared with the tests that look for it in the image.
pub(crate) fn series_colour(index: usize) -> RGBColor {
    COLOURS[index % COLOURS.len()]
}

/// The marker of series `index`; offset per colour cycle so a repeated colour gets a new shape.
pub(crate) fn series_marker(index: usize) -> Marker {
    MARKERS[(index + index / COLOURS.len()) % MARKERS.len()]
}

/// Draws `plot` and writes it to `path` as a PNG of [`WIDTH`]×[`HEIGHT`] pixels.
///
/// Errors: no series or no points, or a point that is not finite or has no positive x (the x
/// axis is logarithmic) → [`Error::Argument`]; no usable font, or `path` cannot be written →
/// [`Error::File`].
pub fn draw_accuracy_plot(plot: &AccuracyPlot, path: &Path) -> Result<()> {
    validate(plot)?;
    ensure_font(path)?;
    let mut pixels = vec![255u8; WIDTH as usize * HEIGHT as usize * 3];
    render(plot, &mut pixels).map_err(|reason| Error::File {
        path: path.to_path_buf(),
        reason: format!("could not draw the plot: {reason}"),
    })?;
    write_png(&pixels, path)
}

/// Rejects what cannot be drawn before any work, so the error names the field at fault rather
/// than surfacing as a plotting failure.
fn validate(plot: &AccuracyPlot) -> Result<()> {
    if plot.series.is_empty() {
        return Err(Error::argument("plot.series", "no series to draw"));
    }
    if plot.series.iter().all(|s| s.points.is_empty()) {
        return Err(Error::argument("plot.series", "no series has any points"));
    }
    for series in &plot.series {
        for p in &series.points {
            let finite = [p.visual_tokens, p.accuracy, p.low, p.high]
                .iter()
                .all(|v| v.is_finite());
            if !finite || p.visual_tokens <= 0.0 {
                return Err(Error::argument(
                    format!("plot.series['{}']", series.name),
                    format!(
                        "point {p:?} must be finite with visual_tokens > 0 (the x axis is logarithmic)"
                    ),
                ));
            }
        }
    }
    match plot.reference {
        Some((ref name, value)) if !value.is_finite() => Err(Error::argument(
            "plot.reference",
            format!("'{name}' has a non-finite accuracy {value}"),
        )),
        _ => Ok(()),
    }
}

/// The x range: the points' extent widened by a quarter on a log scale so that end markers and
/// error-bar caps are not cut by the frame.
fn x_range(plot: &AccuracyPlot) -> (f64, f64) {
    let xs = plot
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.visual_tokens));
    let (lo, hi) = xs.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    (lo / 1.25, hi * 1.25)
}

/// Tick values 1, 2, 5, 10, 20, 50, … inside [lo, hi]: plotters' own log ticks are decades
/// only, which leaves a 2..576 axis with two labels. Also returns the 1..9 per decade values
/// for the light grid, which become the labels too when the range holds under three ticks.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let (mut bold, mut light) = (Vec::new(), Vec::new());
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in 1..10 {
            let v = decade * f64::from(m);
            if (lo..=hi).contains(&v) {
                light.push(v);
                if matches!(m, 1 | 2 | 5) {
                    bold.push(v);
                }
            }
        }
        decade *= 10.0;
    }
    // A narrow range (say 80..120) may hold one 1-2-5 value: label every light line instead.
    if bold.len() < 3 {
        bold.clone_from(&light);
    }
    (bold, light)
}

/// A tick label without a trailing ".0" for whole numbers of tokens.
fn format_tokens(v: &f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// The chart all series are drawn onto: log x (tokens kept) with our own ticks, linear y (%).
type Chart<'a> =
    ChartContext<'a, BitMapBackend<'a>, Cartesian2d<WithKeyPoints<LogCoord<f64>>, RangedCoordf64>>;

/// Plotting errors as text: their type is generic over the backend (and the bitmap backend's
/// is not re-exported), and the caller only reports them.
type DrawResult = std::result::Result<(), String>;

/// Draws the whole plot into an RGB buffer of [`WIDTH`]×[`HEIGHT`].
fn render(plot: &AccuracyPlot, pixels: &mut [u8]) -> DrawResult {
    let root = BitMapBackend::with_buffer(pixels, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (lo, hi) = x_range(plot);
    let (bold, light) = log_ticks(lo, hi);
    let x_axis = (lo..hi)
        .log_scale()
        .with_key_points(bold)
        .with_light_points(light);
    let mut chart = ChartBuilder::on(&root)
        .caption(&plot.title, (FAMILY, 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(x_axis, 0f64..100f64)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(&plot.x_label)
        .y_desc("accuracy (%)")
        .x_label_formatter(&format_tokens)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_labels(11)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(|e| e.to_string())?;
    if let Some((name, value)) = &plot.reference {
        draw_reference(&mut chart, (lo, hi), name, *value)?;
    }
    for (index, series) in plot.series.iter().enumerate() {
        let base = series.variant_of.as_ref().and_then(|base| {
            let names = plot.series.iter().map(|s| &s.name);
            names.enumerate().find(|(_, name)| *name == base)
        });
        let look = base.map_or((index, false), |(at, _)| (at, true));
        draw_series(&mut chart, look, series)?;
    }
    draw_legend(&mut chart)?;
    root.present().map_err(|e| e.to_string())
}

/// A dashed grey line across the whole x range at the reference accuracy, labelled in the
/// legend with its value so the README reader need not read it off the axis.
fn draw_reference(chart: &mut Chart, (lo, hi): (f64, f64), name: &str, value: f64) -> DrawResult {
    let y = value.clamp(0.0, 1.0) * 100.0;
    let style = REFERENCE_GREY.stroke_width(2);
    chart
        .draw_series(DashedLineSeries::new([(lo, y), (hi, y)], 10, 6, style))
        .map_err(|e| e.to_string())?
        .label(format!("{name} ({y:.1}%)"))
        .legend(move |at| {
            EmptyElement::at(at)
                + PathElement::new([(-12, 0), (-3, 0)], style)
                + PathElement::new([(3, 0), (12, 0)], style)
        });
    Ok(())
}

/// One method: an error bar per point for the 95% interval, its points joined in x order (a
/// dashed line for a variant), and a filled marker on top so the accuracy itself stays visible
/// where bars overlap. `index` picks the colour and marker.
fn draw_series(
    chart: &mut Chart,
    (index, dashed): (usize, bool),
    series: &PlotSeries,
) -> DrawResult {
    let (colour, marker) = (series_colour(index), series_marker(index));
    let mut points: Vec<(f64, f64, f64, f64)> = series
        .points
        .iter()
        .map(|p| {
            let percent = |v: f64| v.clamp(0.0, 1.0) * 100.0;
            let (low, high) = (p.low.min(p.high), p.low.max(p.high));
            let (low, acc, high) = (percent(low), percent(p.accuracy), percent(high));
            (p.visual_tokens, low, acc, high)
        })
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let bars = points.iter().map(|&(x, low, acc, high)| {
        ErrorBar::new_vertical(x, low, acc, high, colour.stroke_width(1), 8)
    });
    chart.draw_series(bars).map_err(|e| e.to_string())?;
    let line: Vec<(f64, f64)> = points.iter().map(|&(x, _, acc, _)| (x, acc)).collect();
    let style = colour.stroke_width(2);
    let drawn = match dashed {
        true => chart.draw_series(DashedLineSeries::new(line.clone(), 8, 5, style)),
        false => chart.draw_series(LineSeries::new(line.clone(), style)),
    };
    let anno = drawn.map_err(|e| e.to_string())?.label(&series.name);
    add_legend_glyph(anno, (marker, dashed), colour);
    draw_markers(chart, &line, marker, colour)
}

/// Filled markers of `shape` on every point. One branch per shape because plotters' boxed
/// elements need a `'static` backend, which a bitmap drawn into a buffer is not.
fn draw_markers(
    chart: &mut Chart,
    at: &[(f64, f64)],
    shape: Marker,
    colour: RGBColor,
) -> DrawResult {
    let style = colour.filled();
    let at = at.iter().copied();
    let drawn = match shape {
        Marker::Circle => chart.draw_series(at.map(|p| Circle::new(p, 5, style))),
        Marker::Triangle => chart.draw_series(at.map(|p| TriangleMarker::new(p, 7, style))),
        Marker::Square => chart.draw_series(
            at.map(|p| EmptyElement::at(p) + Rectangle::new([(-4, -4), (4, 4)], style)),
        ),
    };
    drawn.map(drop).map_err(|e| e.to_string())
}

/// The legend's sample of a series: a short stretch of its line with its marker on it.
fn add_legend_glyph<'a>(
    anno: &mut SeriesAnno<'a, BitMapBackend<'a>>,
    (shape, dashed): (Marker, bool),
    colour: RGBColor,
) {
    let (line, fill) = (colour.stroke_width(2), colour.filled());
    // Two strokes either side of the marker: touching for a solid line, apart for a dashed one.
    let (left, right) = match dashed {
        true => ([(-14, 0), (-7, 0)], [(7, 0), (14, 0)]),
        false => ([(-10, 0), (0, 0)], [(0, 0), (10, 0)]),
    };
    let stroke = move |at| {
        EmptyElement::at(at) + PathElement::new(left, line) + PathElement::new(right, line)
    };
    match shape {
        Marker::Circle => anno.legend(move |at| stroke(at) + Circle::new((0, 0), 5, fill)),
        Marker::Triangle => {
            anno.legend(move |at| stroke(at) + TriangleMarker::new((0, 0), 7, fill))
        }
        Marker::Square => {
            anno.legend(move |at| stroke(at) + Rectangle::new([(-4, -4), (4, 4)], fill))
        }
    };
}

/// The legend in the lower right, where accuracy-vs-tokens curves rarely go (many tokens, low
/// accuracy), on a white box so grid lines do not run through it.
fn draw_legend(chart: &mut Chart) -> DrawResult {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .margin(12)
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(160, 160, 160))
        .draw()
        .map_err(|e| e.to_string())
}

/// Encodes the RGB buffer as PNG with the `image` crate the engine already uses (plotters'
/// own encoder would pull in a second, older `image`), then writes it in one go so that a
/// bad path is reported as such.
pub(crate) fn write_png(pixels: &[u8], path: &Path) -> Result<()> {
    use image::ImageEncoder;
    let file_error = |reason: String| Error::File {
        path: path.to_path_buf(),
        reason,
    };
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(pixels, WIDTH, HEIGHT, image::ExtendedColorType::Rgb8)
        .map_err(|e| file_error(format!("could not encode the PNG: {e}")))?;
    std::fs::write(path, png).map_err(|e| file_error(format!("could not write the plot: {e}")))
}

/// Well-known places of a plain sans-serif TrueType font, most common first: Debian/Ubuntu,
/// Fedora, Arch and openSUSE layouts of DejaVu, Liberation and Noto, then macOS and Windows.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans-fonts/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/google-noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/System/Library/Fonts/Helvetica.ttc",
    "/System/Library/Fonts/Geneva.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
    "C:\\Windows\\Fonts\\segoeui.ttf",
];

/// Font directories searched (a few levels deep) when no candidate is in its usual place.
const FONT_DIRS: &[&str] = &[
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
];

/// File names accepted by that search, in order of preference.
const FONT_NAMES: &[&str] = &[
    "DejaVuSans.ttf",
    "LiberationSans-Regular.ttf",
    "NotoSans-Regular.ttf",
    "Arial.ttf",
    "arial.ttf",
];

/// Registers a font with plotters once per process. The outcome is kept, so a missing font is
/// reported on every call without searching again; `LLAVA_WGPU_FONT` is read on the first call.
/// The error names `output`, the plot that could not be made, with the font search in the reason.
pub(crate) fn ensure_font(output: &Path) -> Result<()> {
    static FONT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    match FONT.get_or_init(find_and_register_font) {
        Ok(_) => Ok(()),
        Err(reason) => Err(Error::File {
            path: output.to_path_buf(),
            reason: reason.clone(),
        }),
    }
}

/// Tries `LLAVA_WGPU_FONT` alone when it is set (a wrong path there is a mistake to report, not
/// to paper over), else the candidates and then the font directories.
fn find_and_register_font() -> std::result::Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(FONT_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return register_file(&path)
            .map(|()| path.clone())
            .map_err(|e| format!("{FONT_ENV}={}: {e}", path.display()));
    }
    search_fonts(FONT_CANDIDATES, FONT_DIRS)
}

/// Registers the first readable font among `candidates`, then among [`FONT_NAMES`] under
/// `dirs`; the error lists every place tried and the ways out (the variable, a package).
fn search_fonts(candidates: &[&str], dirs: &[&str]) -> std::result::Result<PathBuf, String> {
    let searched = dirs.iter().flat_map(|dir| {
        FONT_NAMES
            .iter()
            .filter_map(move |name| find_file(Path::new(dir), name, 4))
    });
    let mut all = candidates.iter().map(PathBuf::from).chain(searched);
    if let Some(found) = all.find(|path| register_file(path).is_ok()) {
        return Ok(found);
    }
    Err(format!(
        "no font to draw the plot's text with; tried {} and, under {}, {}. Set {FONT_ENV} to a \
         .ttf file, or install one, e.g. `apt-get install fonts-dejavu-core`",
        candidates.join(", "),
        dirs.join(", "),
        FONT_NAMES.join(", "),
    ))
}

/// Loads a font file and registers it as [`FAMILY`]. The bytes are leaked because plotters
/// keeps `&'static` references to them; the magic-number check first keeps other files (and so
/// leaks) out, which leaves one leak per process in practice.
fn register_file(path: &Path) -> std::result::Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let magic: [&[u8]; 4] = [b"\x00\x01\x00\x00", b"true", b"OTTO", b"ttcf"];
    if !magic.iter().any(|m| bytes.starts_with(m)) {
        return Err("not a TrueType/OpenType font file".to_string());
    }
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
        .map_err(|_| "not a TrueType/OpenType font that ab_glyph can read".to_string())
}

/// The first file called `name` under `dir`, at most `depth` directories down.
fn find_file(dir: &Path, name: &str, depth: usize) -> Option<PathBuf> {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    if let Some(hit) = entries
        .iter()
        .find(|p| p.file_name() == Some(name.as_ref()))
    {
        return Some(hit.clone());
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|p| find_file(p, name, depth - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh path in the temp directory, so parallel test runs do not share files.
    fn temp_png(tag: &str) -> PathBuf {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::env::temp_dir().join(format!(
            "llava-wgpu-plot-{tag}-{}-{n}-{nanos}.png",
            std::process::id()
        ))
    }

    fn point(visual_tokens: f64, accuracy: f64, low: f64, high: f64) -> PlotPoint {
        PlotPoint {
            visual_tokens,
            accuracy,
            low,
            high,
        }
    }

    /// Three methods with 7, 5 and 3 points, given out of x order, one interval reaching 0 and
    /// one reaching 1.
    fn synthetic_plot() -> AccuracyPlot {
        let star = [196.0, 2.0, 98.0, 5.0, 50.0, 10.0, 20.0]
            .iter()
            .map(|&x: &f64| {
                let acc = 0.3 + 0.1 * x.log2().min(6.0);
                point(x, acc, acc - 0.08, (acc + 0.08).min(1.0))
            })
            .collect();
        let random = vec![
            point(2.0, 0.02, 0.0, 0.09),
            point(10.0, 0.30, 0.22, 0.38),
            point(50.0, 0.55, 0.47, 0.63),
            point(5.0, 0.12, 0.06, 0.2),
            point(196.0, 0.80, 0.72, 0.88),
        ];
        let uniform = vec![
            point(29.0, 0.6, 0.52, 0.68),
            point(576.0, 0.97, 0.91, 1.0),
            point(144.0, 0.85, 0.78, 0.91),
        ];
        let series = |name: &str, points| PlotSeries {
            name: name.to_string(),
            points,
            variant_of: None,
        };
        AccuracyPlot {
            title: "VQA accuracy against visual tokens kept".to_string(),
            x_label: "visual tokens kept (mean per question)".to_string(),
            series: vec![
                series("STAR", star),
                series("random", random),
                series("uniform", uniform),
            ],
            reference: Some(("unpruned".to_string(), 0.91)),
        }
    }

    fn count_colour(image: &image::RgbImage, colour: RGBColor) -> usize {
        let RGBColor(r, g, b) = colour;
        image.pixels().filter(|p| p.0 == [r, g, b]).count()
    }

    #[test]
    fn draws_a_png_with_every_series() {
        let path = temp_png("ok");
        draw_accuracy_plot(&synthetic_plot(), &path).expect("draw the plot");
        let bytes = std::fs::read(&path).expect("read the plot back");
        std::fs::remove_file(&path).ok();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        let format = image::guess_format(&bytes).expect("recognised format");
        assert_eq!(format, image::ImageFormat::Png);
        let image = image::load_from_memory(&bytes).expect("decode").to_rgb8();
        assert_eq!(image.dimensions(), (WIDTH, HEIGHT));
        let first = *image.get_pixel(0, 0);
        assert!(image.pixels().any(|p| *p != first), "single colour");
        for index in 0..3 {
            let n = count_colour(&image, series_colour(index));
            assert!(n > 200, "series {index}: only {n} pixels of its colour");
        }
        assert!(
            count_colour(&image, REFERENCE_GREY) > 200,
            "no reference line"
        );
        let dark = image
            .pixels()
            .filter(|p| p.0.iter().all(|&c| c < 60))
            .count();
        assert!(dark > 500, "only {dark} dark pixels: no text or axes");
    }

    #[test]
    fn a_variant_takes_its_base_series_colour() {
        // The third series is a variant of the first: drawn in colour 0, so colour 2 is unused.
        let mut plot = synthetic_plot();
        plot.series[2].variant_of = Some("STAR".to_string());
        let path = temp_png("variant");
        draw_accuracy_plot(&plot, &path).expect("draw the plot");
        let image = image::open(&path).expect("decode").to_rgb8();
        std::fs::remove_file(&path).ok();
        assert!(count_colour(&image, series_colour(0)) > 200);
        assert_eq!(count_colour(&image, series_colour(2)), 0);
        // A variant of a series not in the plot keeps its own colour.
        plot.series[2].variant_of = Some("absent".to_string());
        draw_accuracy_plot(&plot, &path).expect("draw the plot");
        let image = image::open(&path).expect("decode").to_rgb8();
        std::fs::remove_file(&path).ok();
        assert!(count_colour(&image, series_colour(2)) > 200);
    }

    #[test]
    fn unwritable_path_is_a_file_error_naming_it() {
        let path = std::env::temp_dir()
            .join("llava-wgpu-plot-no-such-dir-7f3a")
            .join("plot.png");
        match draw_accuracy_plot(&synthetic_plot(), &path) {
            Err(Error::File { path: p, reason }) => {
                assert_eq!(p, path, "{reason}");
                let message = Error::File { path: p, reason }.to_string();
                assert!(
                    message.contains("llava-wgpu-plot-no-such-dir-7f3a"),
                    "{message}"
                );
            }
            other => panic!("expected a file error, got {other:?}"),
        }
    }

    #[test]
    fn empty_series_is_an_argument_error() {
        let mut plot = synthetic_plot();
        plot.series.clear();
        let err = draw_accuracy_plot(&plot, &temp_png("empty")).unwrap_err();
        assert!(matches!(err, Error::Argument { .. }), "{err:?}");
        plot.series = vec![PlotSeries {
            name: "none".to_string(),
            points: vec![],
            variant_of: None,
        }];
        let err = draw_accuracy_plot(&plot, &temp_png("empty")).unwrap_err();
        assert!(matches!(err, Error::Argument { .. }), "{err:?}");
    }

    #[test]
    fn non_positive_tokens_are_an_argument_error() {
        let mut plot = synthetic_plot();
        plot.series[1].points[0].visual_tokens = 0.0;
        let err = draw_accuracy_plot(&plot, &temp_png("zero")).unwrap_err();
        assert!(matches!(err, Error::Argument { .. }), "{err:?}");
    }

    #[test]
    fn missing_font_error_says_where_it_looked_and_what_to_do() {
        let reason = search_fonts(&["/no/such/font.ttf"], &["/no/such/fonts-dir"]).unwrap_err();
        for part in [
            "/no/such/font.ttf",
            "/no/such/fonts-dir",
            "DejaVuSans.ttf",
            FONT_ENV,
            "fonts-dejavu-core",
        ] {
            assert!(reason.contains(part), "'{part}' missing from: {reason}");
        }
    }

    #[test]
    fn ticks_follow_one_two_five() {
        let (bold, light) = log_ticks(1.6, 245.0);
        assert_eq!(bold, vec![2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0]);
        assert_eq!(light.first(), Some(&2.0));
        assert_eq!(light.last(), Some(&200.0));
        assert_eq!(format_tokens(&20.0), "20");
        assert_eq!(log_ticks(78.0, 123.0).0, vec![80.0, 90.0, 100.0]);
    }
}
