//! `zoo plot RUN_DIR`: draws a run's `metrics.jsonl` into one PNG: the training and validation
//! loss, the learning rate, and (fine-tuning) accuracy and F1, one panel each, against the step.
//!
//! plotters draws into an RGB buffer and the `png` crate encodes it; text uses the DejaVu Sans
//! Mono font shipped in `zoo-cli/assets` (Bitstream Vera licence), so no system font is needed.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use clap::Args;
use plotters::prelude::*;
use serde_json::Value;

/// The font of every label.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const WIDTH: u32 = 1000;
const PANEL_HEIGHT: u32 = 330;

/// `zoo plot` arguments.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A run directory (holding metrics.jsonl).
    run_dir: PathBuf,
    /// The PNG to write (default: RUN_DIR/metrics.png).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// One curve: a name and its (step, value) points.
type Series = (&'static str, Vec<(f64, f64)>);

/// Runs `zoo plot`.
pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    let path = args.run_dir.join("metrics.jsonl");
    let records = read_metrics(&path)?;
    let series = |key: &'static str| -> Series {
        let points = records
            .iter()
            .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
            .filter(|(_, v)| v.is_finite())
            .collect();
        (key, points)
    };
    let panels: Vec<(&str, Vec<Series>)> = vec![
        ("loss", vec![series("loss"), series("valid_loss")]),
        ("learning rate", vec![series("lr")]),
        ("accuracy / F1", vec![series("accuracy"), series("f1")]),
    ]
    .into_iter()
    .map(|(title, curves)| {
        let curves: Vec<Series> = curves.into_iter().filter(|(_, p)| !p.is_empty()).collect();
        (title, curves)
    })
    .filter(|(_, curves)| !curves.is_empty())
    .collect();
    ensure!(
        !panels.is_empty(),
        "{}: no step with a loss, lr or accuracy to plot",
        path.display()
    );
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.run_dir.join("metrics.png"));
    draw(&panels, &out, &args.run_dir)?;
    println!("wrote {} ({} panel(s))", out.display(), panels.len());
    Ok(())
}

fn read_metrics(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut records = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), number + 1))?;
        if value["step"].as_u64().is_none() {
            bail!("{}:{}: no \"step\"", path.display(), number + 1);
        }
        records.push(value);
    }
    Ok(records)
}

fn draw(panels: &[(&str, Vec<Series>)], out: &Path, run_dir: &Path) -> anyhow::Result<()> {
    // Registering the same font twice is harmless; an error means the bytes are not a font.
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the shipped font does not load"))?;
    let height = PANEL_HEIGHT * panels.len() as u32;
    let mut pixels = vec![255u8; (WIDTH * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, height)).into_drawing_area();
        let areas = root.split_evenly((panels.len(), 1));
        let colors = [BLUE, RED, GREEN, MAGENTA];
        for (area, (title, curves)) in areas.iter().zip(panels) {
            let points = curves.iter().flat_map(|(_, p)| p.iter());
            let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
            for &(x, y) in points {
                (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            }
            if x1 <= x0 {
                x1 = x0 + 1.0;
            }
            let pad = ((y1 - y0) * 0.05).max(1e-9 * y1.abs().max(1e-12));
            let caption = format!("{title} — {}", run_dir.display());
            let mut chart = ChartBuilder::on(area)
                .caption(caption, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(70)
                .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
                .map_err(|e| anyhow::anyhow!("drawing {title}: {e}"))?;
            chart
                .configure_mesh()
                .x_desc("step")
                .x_label_formatter(&|x| format!("{}", x.round() as i64))
                .y_label_formatter(&|y| format!("{y:.3e}"))
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(|e| anyhow::anyhow!("drawing {title}: {e}"))?;
            for (i, (name, points)) in curves.iter().enumerate() {
                let color = colors[i % colors.len()];
                chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        color.stroke_width(2),
                    ))
                    .map_err(|e| anyhow::anyhow!("drawing {name}: {e}"))?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(|e| anyhow::anyhow!("drawing the legend of {title}: {e}"))?;
        }
        root.present()
            .map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
    }
    // Encode, then rename: a failed write leaves no half PNG.
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, WIDTH, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().context("encoding the PNG")?;
        writer
            .write_image_data(&pixels)
            .context("encoding the PNG")?;
    }
    let partial = out.with_extension("png.partial");
    fs::write(&partial, &bytes).with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
