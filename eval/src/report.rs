//! The results: JSON, a markdown table and a PNG plot of quality against budget.
//!
//! The plot is drawn with plotters' bitmap backend into a buffer and written by a minimal
//! PNG encoder (stored deflate blocks), so no image crate and no system font is needed. The
//! picture carries no text: the axes and colours are explained in the markdown beside it.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;

/// One policy at one budget on the continuation: `policy` is the family (`full`,
/// `streaming`, `h2o`, ...) and `label` the policy with its budget.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub policy: String,
    pub label: String,
    pub budget: Budget,
    pub quality: Quality,
    pub timing: Timing,
}

/// `frac`: the fraction of the prompt kept (in f16 for MiKV; `None` for full and KIVI);
/// `bits`: the bits of the codes (KIVI, MiKV's low part).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Budget {
    pub frac: Option<f64>,
    pub bits: Option<u32>,
}

/// `ppl`: the continuation's perplexity; `top1_agree`: the fraction of positions whose
/// argmax equals the full cache's; `attn_rel_err_layers`: per layer, the mean relative L2
/// error of the attention output against the full-cache run at the same layer and step
/// (errors of earlier layers included), and `attn_rel_err` its mean over layers.
#[derive(Clone, Debug, Serialize)]
pub struct Quality {
    pub ppl: f64,
    pub top1_agree: f64,
    pub attn_rel_err: f64,
    pub attn_rel_err_layers: Vec<f64>,
}

/// Wall milliseconds per decode step: `attn` in the policy's attention (all layers),
/// `decode` the whole layer-major decode (projections, MLP, logits) divided by the steps.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Timing {
    pub attn_ms_per_step: f64,
    pub decode_ms_per_step: f64,
}

/// One policy at one budget on the passkey prompts.
#[derive(Clone, Debug, Serialize)]
pub struct PasskeyRow {
    /// The policy with its budget.
    pub label: String,
    /// Per context length: `(length, retrieved, trials)`.
    pub results: Vec<(usize, usize, usize)>,
}

/// Where a run's inputs came from: the exact `command`, the `text` source, the `model` file
/// and the `device` that ran the attention.
#[derive(Clone, Debug, Serialize)]
pub struct Source {
    pub command: String,
    pub text: String,
    pub model: String,
    pub device: String,
}

/// Prompt (`context`) and scored (`continuation`) tokens, the shared prefill's seconds, and
/// the passkey depths (fractions of the filler) tried at each passkey length.
#[derive(Clone, Debug, Serialize)]
pub struct Setup {
    pub context: usize,
    pub continuation: usize,
    pub prefill_secs: f64,
    pub passkey_depths: Vec<f64>,
}

/// Everything one evaluation run produced.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub source: Source,
    pub setup: Setup,
    pub rows: Vec<Row>,
    pub passkey: Vec<PasskeyRow>,
}

/// The plot's lines: each family drawn against its budget, with its colour's name and RGB.
#[rustfmt::skip]
pub const PLOT_LINES: [(&str, &str, RGBColor); 12] = [
    ("streaming", "red", RGBColor(220, 40, 40)), ("h2o", "blue", RGBColor(40, 80, 220)),
    ("snapkv", "green", RGBColor(30, 160, 60)), ("windowkv", "pink", RGBColor(230, 100, 170)),
    ("lazy", "olive", RGBColor(130, 130, 0)), ("prefixkv", "navy", RGBColor(20, 20, 110)),
    ("lowrank", "lime", RGBColor(120, 220, 0)), ("quest", "orange", RGBColor(240, 150, 20)),
    ("cluster", "cyan", RGBColor(0, 170, 190)), ("shadowkv", "brown", RGBColor(140, 90, 40)),
    ("mikv", "purple", RGBColor(150, 50, 200)), ("kivi", "black", RGBColor(0, 0, 0)),
];

impl Report {
    fn full_ppl(&self) -> Option<f64> {
        self.rows.iter().find(|r| r.policy == "full").map(|r| r.quality.ppl)
    }

    /// The markdown tables.
    pub fn markdown(&self) -> String {
        let full = self.full_ppl().unwrap_or(f64::NAN);
        let mut s = format!(
            "SmolLM2-135M-Instruct (Q4_1 GGUF, weights dequantized to f32), {} prompt tokens prefilled once with full \
             attention, then {} continuation tokens teacher-forced through each policy. Text: {}. Attention: {}. \
             Prefill: {:.1} s.\n\n",
            self.setup.context, self.setup.continuation, self.source.text, self.source.device, self.setup.prefill_secs
        );
        s += "| policy | kept | ppl | Δppl | top-1 = full | attn rel err | attn ms/step | decode ms/step |\n";
        s += "|---|---|---|---|---|---|---|---|\n";
        for r in &self.rows {
            let kept = match (r.budget.frac, r.budget.bits) {
                (Some(f), Some(b)) => format!("{:.0}% f16, rest int{b}", f * 100.0),
                (Some(f), None) => format!("{:.0}%", f * 100.0),
                (None, Some(b)) => format!("int{b}"),
                (None, None) => "100%".into(),
            };
            s += &format!(
                "| {} | {} | {:.3} | {:+.2}% | {:.1}% | {:.4} | {:.1} | {:.1} |\n",
                r.policy,
                kept,
                r.quality.ppl,
                (r.quality.ppl / full - 1.0) * 100.0,
                r.quality.top1_agree * 100.0,
                r.quality.attn_rel_err,
                r.timing.attn_ms_per_step,
                r.timing.decode_ms_per_step
            );
        }
        if !self.passkey.is_empty() {
            let lens: Vec<usize> = self.passkey[0].results.iter().map(|r| r.0).collect();
            s += &format!(
                "\nPasskey retrieval (a 5-digit number at depths {:?} of the filler; retrieved = every answer token \
                 is the argmax):\n\n| policy |",
                self.setup.passkey_depths
            );
            for l in &lens {
                s += &format!(" {l} |");
            }
            s += "\n|---|";
            s += &"---|".repeat(lens.len());
            s += "\n";
            for p in &self.passkey {
                s += &format!("| {} |", p.label);
                for &(_, ok, n) in &p.results {
                    s += &format!(" {ok}/{n} |");
                }
                s += "\n";
            }
        }
        s += "\nPlot (`quality.png`): x = fraction of the prompt kept (KIVI: bits/16), 0 to 0.55; y = perplexity \
              relative to the full cache (clipped to 0.5..4); the thick grey line is 1.0, the thin grey lines are x = 0.05, 0.10, ... Colours: ";
        let names: Vec<String> = PLOT_LINES.iter().map(|(f, c, _)| format!("{f} {c}")).collect();
        s += &names.join(", ");
        s += ".\n";
        s
    }

    /// Writes `report.json`, `report.md` and `quality.png` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir)?;
        fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        fs::write(dir.join("report.md"), self.markdown())?;
        self.plot(&dir.join("quality.png"))
    }

    fn plot(&self, path: &Path) -> Result<()> {
        let (w, h) = (800u32, 480u32);
        let full = self.full_ppl().context("the plot needs the full-cache row")?;
        let series: Vec<Vec<(f64, f64)>> = PLOT_LINES
            .iter()
            .map(|(f, _, _)| {
                let mut pts: Vec<(f64, f64)> = self
                    .rows
                    .iter()
                    .filter(|r| r.policy == *f)
                    .filter_map(|r| {
                        let x = r.budget.frac.or(r.budget.bits.map(|b| f64::from(b) / 16.0))?;
                        Some((x, r.quality.ppl / full))
                    })
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                pts
            })
            .collect();
        let ymax = series.iter().flatten().map(|p| p.1).fold(1.05, f64::max).min(4.0) * 1.02;
        let ymin = series.iter().flatten().map(|p| p.1).fold(1.0, f64::min).max(0.5) - 0.02;
        let mut buf = vec![255u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
            let mut chart = ChartBuilder::on(&root)
                .margin(20)
                .build_cartesian_2d(0.0..0.55f64, ymin..ymax)
                .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
            let grey = RGBColor(180, 180, 180);
            for i in 0..=11 {
                let x = i as f64 * 0.05;
                chart
                    .draw_series(LineSeries::new([(x, ymin), (x, ymax)], grey.mix(0.4)))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            chart
                .draw_series(LineSeries::new([(0.0, 1.0), (0.55, 1.0)], grey.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for (pts, &(_, _, colour)) in series.iter().zip(&PLOT_LINES) {
                let clipped: Vec<(f64, f64)> = pts.iter().map(|&(x, y)| (x, y.min(ymax))).collect();
                chart
                    .draw_series(LineSeries::new(clipped.clone(), colour.stroke_width(3)))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                chart
                    .draw_series(clipped.iter().map(|&p| Circle::new(p, 5, colour.filled())))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            chart
                .draw_series(LineSeries::new(
                    [(0.0, ymin), (0.0, ymax), (0.55, ymax), (0.55, ymin), (0.0, ymin)],
                    BLACK,
                ))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        }
        fs::write(path, png_rgb(w, h, &buf))?;
        Ok(())
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// An 8-bit RGB PNG of `rgb [h, w, 3]` (zlib level 9, no row filter).
pub fn png_rgb(w: u32, h: u32, rgb: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(rgb.len() + h as usize);
    for row in rgb.chunks_exact(w as usize * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let z = miniz_oxide::deflate::compress_to_vec_zlib(&raw, 9);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}
