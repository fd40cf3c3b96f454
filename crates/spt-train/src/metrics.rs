//! Metrics: accuracy, macro-F1, mean loss, perplexity; `metrics.jsonl`; the `loss.svg` plot.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Predictions and labels pair up one to one: a length mismatch is a caller's bug, named.
fn check_pairs(what: &str, preds: &[u32], labels: &[u32]) -> Result<()> {
    if preds.len() != labels.len() {
        return Err(Error::Msg(format!(
            "{what}: {} predictions for {} labels; they pair up one to one",
            preds.len(),
            labels.len()
        )));
    }
    Ok(())
}

/// Fraction of `preds` equal to `labels` (0 for empty input); an error when their lengths differ.
pub fn accuracy(preds: &[u32], labels: &[u32]) -> Result<f64> {
    check_pairs("accuracy", preds, labels)?;
    if preds.is_empty() {
        return Ok(0.0);
    }
    Ok(preds.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / preds.len() as f64)
}

/// Unweighted mean over classes `0..num_classes` of per-class F1. A class absent from both
/// predictions and labels is left out of the mean (as scikit-learn does with `labels=` unset);
/// a class with no true positives scores 0. An error when the lengths differ.
pub fn macro_f1(preds: &[u32], labels: &[u32], num_classes: usize) -> Result<f64> {
    check_pairs("macro_f1", preds, labels)?;
    // Counts of the classes that occur only: a class id is data, and a vector sized by the
    // largest one (u32::MAX from a bad label) would not fit in memory.
    let mut counts: BTreeMap<u32, [u64; 3]> = BTreeMap::new(); // tp, fp, fn
    let known = |c: u32| (c as u64) < num_classes as u64;
    for (&p, &l) in preds.iter().zip(labels) {
        if p == l {
            if known(p) {
                counts.entry(p).or_default()[0] += 1;
            }
        } else {
            if known(p) {
                counts.entry(p).or_default()[1] += 1;
            }
            if known(l) {
                counts.entry(l).or_default()[2] += 1;
            }
        }
    }
    if counts.is_empty() {
        return Ok(0.0);
    }
    let sum: f64 = counts
        .values()
        .map(|[tp, fp, fneg]| 2.0 * *tp as f64 / (2 * tp + fp + fneg) as f64)
        .sum();
    Ok(sum / counts.len() as f64)
}

/// A weighted running mean (e.g. of per-token or per-example losses).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MeanLoss {
    pub sum: f64,
    pub weight: f64,
}

impl MeanLoss {
    /// Adds a mean `loss` over `weight` items.
    pub fn add(&mut self, loss: f64, weight: f64) {
        self.sum += loss * weight;
        self.weight += weight;
    }

    pub fn mean(&self) -> f64 {
        if self.weight > 0.0 {
            self.sum / self.weight
        } else {
            f64::NAN
        }
    }
}

/// `exp(mean token cross-entropy)`.
pub fn perplexity(mean_loss: f64) -> f64 {
    mean_loss.exp()
}

/// One line of `metrics.jsonl`. JSON has no NaN or infinity: serde_json writes them as `null`,
/// and reading takes `null` back as NaN (an absent `lr` stays `None`), so a diverged evaluation
/// does not make the file unreadable for a resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawRecord")]
pub struct MetricRecord {
    /// Optimizer updates done when the record was made.
    pub step: u64,
    /// Fractional epoch.
    pub epoch: f64,
    /// `"train"` or `"eval"`.
    pub split: String,
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    /// Other named values: accuracy, macro_f1, perplexity, grad_norm, tokens_per_s, …
    #[serde(flatten)]
    pub values: BTreeMap<String, f64>,
}

/// [`MetricRecord`] as read, `null` allowed where a number goes.
#[derive(Deserialize)]
struct RawRecord {
    step: u64,
    epoch: Option<f64>,
    split: String,
    loss: Option<f64>,
    /// Absent (`None`), or present and perhaps `null` (a NaN written).
    #[serde(default, deserialize_with = "present")]
    lr: Option<Option<f64>>,
    #[serde(flatten)]
    values: BTreeMap<String, Option<f64>>,
}

/// A field that is there, `null` or not: `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

impl From<RawRecord> for MetricRecord {
    fn from(r: RawRecord) -> Self {
        let num = |v: Option<f64>| v.unwrap_or(f64::NAN);
        Self {
            step: r.step,
            epoch: num(r.epoch),
            split: r.split,
            loss: num(r.loss),
            lr: r.lr.map(num),
            values: r.values.into_iter().map(|(k, v)| (k, num(v))).collect(),
        }
    }
}

/// Appends JSON lines to `<output>/metrics.jsonl`, flushing each.
pub struct MetricsWriter {
    path: PathBuf,
}

impl MetricsWriter {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn append(&self, rec: &MetricRecord) -> Result<()> {
        // The values are flattened beside the fixed fields: a value named like one would write
        // a JSON key twice, and the file could not be read back.
        if let Some(k) = rec
            .values
            .keys()
            .find(|k| ["step", "epoch", "split", "loss", "lr"].contains(&k.as_str()))
        {
            return Err(Error::Msg(format!(
                "{}: a metric value is named `{k}`, as a fixed field of the record is; rename it",
                self.path.display()
            )));
        }
        let mut line = serde_json::to_string(rec).map_err(|e| Error::Msg(format!("metrics record: {e}")))?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        // An append cut short (a kill, a full disk) leaves a line without its end: this record
        // starts its own line rather than joining that fragment.
        if !ends_with_newline(&mut f).map_err(|e| Error::io(&self.path, e))? {
            line.insert(0, '\n');
        }
        f.write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        f.flush().map_err(|e| Error::io(&self.path, e))
    }

    /// All records (a missing file is empty). A malformed line is an error naming its number;
    /// a line cut short (JSON ending early) is skipped with a warning.
    pub fn read_all(&self) -> Result<Vec<MetricRecord>> {
        Ok(self.lines()?.into_iter().filter_map(|(r, _)| r).collect())
    }

    /// Each non-blank line with its record, `None` for a line cut short (warned about), as
    /// [`read_all`](Self::read_all) reads them.
    fn lines(&self) -> Result<Vec<(Option<MetricRecord>, String)>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&self.path, e)),
        };
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(line) {
                Ok(r) => out.push((Some(r), line.to_string())),
                // JSON cut short is an append that was cut short (a kill, a full disk): what it
                // held was never complete, and a resume must not be stopped by it. The records
                // appended after it start lines of their own.
                Err(e) if e.is_eof() => {
                    tracing::warn!(
                        "{}: line {} is unfinished (an interrupted write; {e}); it is skipped",
                        self.path.display(),
                        i + 1
                    );
                    out.push((None, line.to_string()));
                }
                Err(e) => {
                    return Err(Error::Msg(format!(
                        "{}: line {}: {e}",
                        self.path.display(),
                        i + 1
                    )));
                }
            }
        }
        Ok(out)
    }

    /// Drops records after `step` and lines cut short (atomically), so a resumed run does not
    /// repeat them. The lines kept are kept as written (parsed and written again, a float's last
    /// digit could change), and a file with nothing to drop is not written at all.
    pub fn truncate_after(&self, step: u64) -> Result<()> {
        let lines = self.lines()?;
        let n = lines.len();
        let keep: Vec<String> = lines
            .into_iter()
            .filter(|(r, _)| r.as_ref().is_some_and(|r| r.step <= step))
            .map(|(_, line)| line)
            .collect();
        if keep.len() == n {
            return Ok(());
        }
        let mut text = String::new();
        for line in &keep {
            text.push_str(line);
            text.push('\n');
        }
        crate::checkpoint::write_file_atomic(&self.path, text.as_bytes())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Whether `f` is empty or its last byte is a newline.
fn ends_with_newline(f: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if f.metadata()?.len() == 0 {
        return Ok(true);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Draws train and eval loss against the step into an SVG file.
pub fn plot_loss_svg(path: &Path, train: &[(u64, f64)], eval: &[(u64, f64)]) -> Result<()> {
    use plotters::prelude::*;
    let finite = |v: &[(u64, f64)]| -> Vec<(f64, f64)> {
        v.iter()
            .filter(|(_, y)| y.is_finite())
            .map(|&(x, y)| (x as f64, y))
            .collect()
    };
    let (tr, ev) = (finite(train), finite(eval));
    let all: Vec<&(f64, f64)> = tr.iter().chain(ev.iter()).collect();
    if all.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no finite loss values to plot",
            path.display()
        )));
    }
    let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_min = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    // The plotting library's tick search does not end on a range past f64 (it spun forever on
    // losses of ±1e308); no loss curve needs one.
    if !(y_min - pad).is_finite()
        || !(y_max + pad).is_finite()
        || !((y_max + pad) - (y_min - pad)).is_finite()
    {
        return Err(Error::Msg(format!(
            "{}: losses from {y_min:e} to {y_max:e} span more than a plot can (f64 overflows)",
            path.display()
        )));
    }
    let plot_err =
        |e: &dyn std::fmt::Display| Error::Msg(format!("{}: plotting failed: {e}", path.display()));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))
            .map_err(|e| plot_err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("loss")
            .draw()
            .map_err(|e| plot_err(&e))?;
        if !tr.is_empty() {
            chart
                .draw_series(LineSeries::new(tr.iter().copied(), &BLUE))
                .map_err(|e| plot_err(&e))?
                .label("train")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE));
        }
        if !ev.is_empty() {
            chart
                .draw_series(LineSeries::new(ev.iter().copied(), RED.stroke_width(2)))
                .map_err(|e| plot_err(&e))?
                .label("eval")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED));
            chart
                .draw_series(ev.iter().map(|&p| Circle::new(p, 3, RED.filled())))
                .map_err(|e| plot_err(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(&e))?;
        root.present().map_err(|e| plot_err(&e))?;
    }
    crate::checkpoint::write_file_atomic(path, svg.as_bytes()).map_err(|e| Error::io(path, e))
}

/// Plots the train / eval loss curves found in a `metrics.jsonl`.
pub fn plot_metrics_file(metrics: &Path, svg: &Path) -> Result<()> {
    let recs = MetricsWriter::new(metrics).read_all()?;
    let pick = |split: &str| -> Vec<(u64, f64)> {
        recs.iter()
            .filter(|r| r.split == split)
            .map(|r| (r.step, r.loss))
            .collect()
    };
    plot_loss_svg(svg, &pick("train"), &pick("eval"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_macro_f1_by_hand() {
        let labels = [0, 0, 1, 1, 2, 2];
        let preds = [0, 1, 1, 1, 2, 0];
        assert!((accuracy(&preds, &labels).unwrap() - 4.0 / 6.0).abs() < 1e-12);
        // class 0: tp1 fp1 fn1 → 0.5; class 1: tp2 fp1 fn0 → 0.8; class 2: tp1 fp0 fn1 → 2/3
        let want = (0.5 + 0.8 + 2.0 / 3.0) / 3.0;
        assert!((macro_f1(&preds, &labels, 3).unwrap() - want).abs() < 1e-12);
        assert_eq!(macro_f1(&[1, 1], &[1, 1], 3).unwrap(), 1.0); // absent classes are left out
        assert_eq!(accuracy(&[], &[]).unwrap(), 0.0);
        // Mismatched lengths are named, not scored (accuracy used to return 0, macro-F1 to
        // score the shorter prefix).
        let e = accuracy(&[1, 2], &[1]).unwrap_err().to_string();
        assert!(e.contains("2 predictions for 1 labels"), "{e}");
        assert!(macro_f1(&[1], &[1, 0], 2).is_err());
    }

    #[test]
    fn mean_loss_and_perplexity() {
        let mut m = MeanLoss::default();
        m.add(2.0, 1.0);
        m.add(4.0, 3.0);
        assert_eq!(m.mean(), 3.5);
        assert!((perplexity(2f64.ln()) - 2.0).abs() < 1e-12);
        assert!(MeanLoss::default().mean().is_nan());
    }

    #[test]
    fn jsonl_append_read_truncate_and_plot() {
        let dir = tempfile::tempdir().unwrap();
        let w = MetricsWriter::new(dir.path().join("metrics.jsonl"));
        for s in 1..=4u64 {
            let mut values = BTreeMap::new();
            values.insert("grad_norm".to_string(), 0.5);
            w.append(&MetricRecord {
                step: s,
                epoch: s as f64 / 4.0,
                split: "train".into(),
                loss: 2.0 / s as f64,
                lr: Some(1e-3),
                values,
            })
            .unwrap();
        }
        let mut values = BTreeMap::new();
        values.insert("accuracy".to_string(), 0.75);
        w.append(&MetricRecord {
            step: 4,
            epoch: 1.0,
            split: "eval".into(),
            loss: 0.6,
            lr: None,
            values,
        })
        .unwrap();
        let recs = w.read_all().unwrap();
        assert_eq!(recs.len(), 5);
        assert_eq!(recs[4].values["accuracy"], 0.75);
        let line = std::fs::read_to_string(w.path()).unwrap();
        assert!(line.lines().next().unwrap().contains("\"grad_norm\":0.5"));
        let svg = dir.path().join("loss.svg");
        plot_metrics_file(w.path(), &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("polyline") && text.contains("eval"),
            "{}",
            &text[..200]
        );
        // Nothing after step 5: the file is not rewritten. Then records 3-5 dropped, and the
        // lines kept as written, not parsed and printed again (a hand-written line, spaced and
        // with a 17-digit loss that serde_json's parser rounds twice, shows it).
        let hand = r#"{"step": 2, "epoch": 0.50, "split": "eval", "loss": 0.9596412069339625}"#;
        let mut text = std::fs::read_to_string(w.path()).unwrap();
        text.push_str(hand);
        text.push('\n');
        std::fs::write(w.path(), &text).unwrap();
        let before = std::fs::read(w.path()).unwrap();
        // An atomic rewrite is a new file: a new inode.
        #[cfg(unix)]
        let inode = || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(w.path()).unwrap());
        #[cfg(unix)]
        let first = inode();
        w.truncate_after(5).unwrap();
        assert_eq!(std::fs::read(w.path()).unwrap(), before);
        #[cfg(unix)]
        assert_eq!(inode(), first, "rewritten with nothing to drop");
        w.truncate_after(2).unwrap();
        assert_eq!(
            w.read_all().unwrap().iter().map(|r| r.step).collect::<Vec<_>>(),
            vec![1, 2, 2]
        );
        let lines: Vec<&str> = text.lines().collect();
        let want = format!("{}\n{}\n{hand}\n", lines[0], lines[1]);
        assert_eq!(std::fs::read_to_string(w.path()).unwrap(), want);
        assert!(plot_loss_svg(&svg, &[], &[]).is_err());
        // A range past f64 is an error, not an endless tick search in the plotting library.
        let e = plot_loss_svg(&svg, &[(0, -1e308), (5, 1e308)], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("span more than a plot can"), "{e}");
        assert!(plot_loss_svg(&svg, &[(0, 0.7), (5, 1.7e308)], &[]).is_err());
        // NaN and infinite values (an evaluation that diverged) are written as null and read
        // back as NaN: the file stays readable for a resume.
        w.append(&MetricRecord {
            step: 3,
            epoch: 0.75,
            split: "eval".into(),
            loss: f64::NAN,
            lr: Some(f64::NAN),
            values: BTreeMap::from([("perplexity".to_string(), f64::INFINITY)]),
        })
        .unwrap();
        let mut all = w.read_all().unwrap();
        let last = all.pop().unwrap();
        assert!(last.loss.is_nan() && last.values["perplexity"].is_nan());
        // A NaN lr too (it came back as no lr at all); an absent one stays absent.
        assert!(last.lr.is_some_and(f64::is_nan), "{:?}", last.lr);
        assert_eq!(all[2].lr, None);
        let clash = MetricRecord {
            values: BTreeMap::from([("loss".to_string(), 1.0)]),
            ..last
        };
        let e = w.append(&clash).unwrap_err().to_string();
        assert!(e.contains("named `loss`"), "{e}");
        assert_eq!(w.read_all().unwrap().len(), 4);
        // Macro-F1 counts only the classes that occur: a label id of u32::MAX is data, not a
        // class count (it allocated 3 × 2^32 counters and aborted).
        assert_eq!(macro_f1(&[0, u32::MAX], &[0, u32::MAX], usize::MAX).unwrap(), 1.0);
        assert_eq!(macro_f1(&[0, 1], &[0, 1], 1 << 40).unwrap(), 1.0);
    }
}
