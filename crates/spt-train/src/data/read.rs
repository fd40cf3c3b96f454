//! Reading classification files (CSV, TSV, JSONL) and plain-text LM files; label maps; splits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DataError;
use crate::rng::SplitMix64;

/// File format of a classification file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Comma-separated with a header row, RFC 4180 quoting (fields may hold newlines).
    Csv,
    /// Tab-separated with a header row, no quoting.
    Tsv,
    /// One JSON object per line.
    Jsonl,
}

impl DataFormat {
    /// From the extension: `.csv`; `.tsv` / `.tab`; `.jsonl` / `.ndjson` / `.json`.
    pub fn from_path(path: &Path) -> Result<Self, DataError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Ok(Self::Csv),
            "tsv" | "tab" => Ok(Self::Tsv),
            "jsonl" | "ndjson" | "json" => Ok(Self::Jsonl),
            _ => Err(DataError::Invalid(format!(
                "{}: cannot tell the format from the extension `{ext}`; use .csv, .tsv or .jsonl, or pass --format csv|tsv|jsonl (`format` in a config file)",
                path.display()
            ))),
        }
    }
}

/// Which columns (or JSON keys) hold the text, the optional second text, the label and the
/// optional group used for grouped splits (e.g. `movie_name`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSpec {
    pub text: String,
    pub text_pair: Option<String>,
    /// `None` for unlabeled input (prediction).
    pub label: Option<String>,
    pub group: Option<String>,
}

impl Default for ColumnSpec {
    fn default() -> Self {
        Self {
            text: "text".into(),
            text_pair: None,
            label: Some("label".into()),
            group: None,
        }
    }
}

impl ColumnSpec {
    /// The label read as input text leaks the answer to the model (a run reached accuracy 1.0
    /// that way), and the same column as both texts is a slip: both are refused by name.
    pub fn check(&self) -> Result<(), DataError> {
        let text = Some(("text column", "--text-column", self.text.as_str()));
        let pair = self
            .text_pair
            .as_deref()
            .map(|c| ("pair column", "--text-pair-column", c));
        let label = self
            .label
            .as_deref()
            .map(|c| ("label column", "--label-column", c));
        for (a, b) in [(text, label), (text, pair), (pair, label)] {
            if let (Some((what_a, flag_a, col)), Some((what_b, flag_b, other))) = (a, b) {
                if col == other {
                    return Err(DataError::Invalid(format!(
                        "column `{col}` is both the {what_a} and the {what_b} ({flag_a} and {flag_b}); \
                         the model would read {} as input",
                        if what_b == "label column" {
                            "its answer"
                        } else {
                            "the same text twice"
                        }
                    )));
                }
            }
        }
        Ok(())
    }
}

/// One row of a classification file, before tokenisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawExample {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: Option<String>,
    pub group: Option<String>,
    /// 1-based line where the row starts in `ClassificationData::path`.
    pub line: u64,
}

/// The rows of one file, remembered with the file and columns so later errors can name them.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassificationData {
    pub path: PathBuf,
    pub columns: ColumnSpec,
    pub examples: Vec<RawExample>,
}

/// Reads a classification file. Rows whose label is in `drop_labels` are skipped (e.g. `plot` in
/// the Rotten Tomatoes CSV). Errors: unreadable file, empty file, missing column, non-UTF-8 field,
/// malformed row, each naming the file and line (and column).
pub fn read_classification(
    path: &Path,
    format: Option<DataFormat>,
    columns: &ColumnSpec,
    drop_labels: &[String],
) -> Result<ClassificationData, DataError> {
    read_classification_counted(path, format, columns, drop_labels).map(|(data, _)| data)
}

/// [`read_classification`], also giving how many rows each of `drop_labels` removed: a label
/// that removes none in any file is most likely misspelt.
pub fn read_classification_counted(
    path: &Path,
    format: Option<DataFormat>,
    columns: &ColumnSpec,
    drop_labels: &[String],
) -> Result<(ClassificationData, Vec<usize>), DataError> {
    columns.check()?;
    // A missing file is named as missing, and a folder as a folder, before the extension is
    // looked at.
    match std::fs::metadata(path) {
        Err(e) => return Err(DataError::io(path, e)),
        Ok(m) if m.is_dir() => {
            return Err(DataError::Invalid(format!(
                "{}: is a directory; give a .csv, .tsv or .jsonl file",
                path.display()
            )))
        }
        Ok(_) => {}
    }
    let format = match format {
        Some(f) => f,
        None => DataFormat::from_path(path)?,
    };
    let mut examples = match format {
        DataFormat::Csv => read_delimited(path, b',', true, columns)?,
        DataFormat::Tsv => read_delimited(path, b'\t', false, columns)?,
        DataFormat::Jsonl => read_jsonl(path, columns)?,
    };
    let before = examples.len();
    let mut dropped = vec![0; drop_labels.len()];
    if !drop_labels.is_empty() {
        examples.retain(|e| {
            match e
                .label
                .as_ref()
                .and_then(|l| drop_labels.iter().position(|d| d == l))
            {
                Some(i) => {
                    dropped[i] += 1;
                    false
                }
                None => true,
            }
        });
    }
    // A blank label is missing data, not a class named "".
    if let Some(e) = examples.iter().find(|e| e.label.as_deref() == Some("")) {
        return Err(DataError::Parse {
            path: path.to_path_buf(),
            line: e.line,
            msg: format!(
                "the label (column `{}`) is empty; fill it in, or skip such rows with --drop-label \"\"",
                columns.label.as_deref().unwrap_or_default()
            ),
        });
    }
    if examples.is_empty() {
        let detail = if before > 0 {
            format!(" left after dropping labels {drop_labels:?} (every one of its {before} rows had one)")
        } else {
            String::new()
        };
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            detail,
        });
    }
    let data = ClassificationData {
        path: path.to_path_buf(),
        columns: columns.clone(),
        examples,
    };
    Ok((data, dropped))
}

fn utf8_field(path: &Path, line: u64, column: &str, bytes: &[u8]) -> Result<String, DataError> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_string()),
        Err(e) => Err(DataError::NonUtf8 {
            path: path.to_path_buf(),
            line,
            column: format!("`{column}` (byte {} of the field)", e.valid_up_to() + 1),
        }),
    }
}

struct Cols {
    text: usize,
    pair: Option<usize>,
    label: Option<usize>,
    group: Option<usize>,
}

fn read_delimited(
    path: &Path,
    delimiter: u8,
    quoting: bool,
    spec: &ColumnSpec,
) -> Result<Vec<RawExample>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let lines = LineIndex::of(&bytes);
    let csv_error = |e| csv_error(path, &lines, e);
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quoting)
        .has_headers(true)
        .from_reader(&bytes[..]);
    let headers = rdr.byte_headers().map_err(csv_error)?.clone();
    if headers.is_empty() || (headers.len() == 1 && headers[0].is_empty()) {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            detail: String::new(),
        });
    }
    let mut names = Vec::with_capacity(headers.len());
    for (i, h) in headers.iter().enumerate() {
        let mut name = utf8_field(path, 1, &format!("#{}", i + 1), h)?;
        if i == 0 {
            name = name.trim_start_matches('\u{feff}').to_string();
        }
        names.push(name.trim().to_string());
    }
    let find = |col: &str| -> Result<usize, DataError> {
        let at: Vec<usize> = (0..names.len()).filter(|&i| names[i] == col).collect();
        match at[..] {
            [i] => Ok(i),
            [] => Err(DataError::MissingColumn {
                path: path.to_path_buf(),
                line: 1,
                column: col.to_string(),
                available: names.join(", "),
            }),
            // Either copy could be meant: picking one would silently train on the other's text.
            _ => Err(DataError::Parse {
                path: path.to_path_buf(),
                line: 1,
                msg: format!(
                    "the header names column `{col}` {} times (fields {}); rename all but one",
                    at.len(),
                    at.iter()
                        .map(|i| (i + 1).to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    };
    let cols = Cols {
        text: find(&spec.text)?,
        pair: spec.text_pair.as_deref().map(find).transpose()?,
        label: spec.label.as_deref().map(find).transpose()?,
        group: spec.group.as_deref().map(find).transpose()?,
    };
    let mut out = Vec::new();
    let mut rec = csv::ByteRecord::new();
    let mut last_multiline = None;
    loop {
        match rdr.read_byte_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(csv_error(e)),
        }
        // The start of the record if a field of it spans lines (see check_closed_quotes).
        last_multiline = rec
            .position()
            .filter(|_| rec.iter().any(|f| f.contains(&b'\n') || f.contains(&b'\r')))
            .map(|p| p.byte());
        let line = rec.position().map(|p| lines.line(p.byte())).unwrap_or(0);
        // A blank line is no record; a quoted empty field (`""`, as Python's csv writes an empty
        // text in a one-column file) is an empty text, whose row must not vanish from predict's
        // answers.
        // (A record's position can be the blank lines before it, which the reader skips.)
        let quoted = rec.position().is_some_and(|p| {
            let from = usize::try_from(p.byte()).unwrap_or(usize::MAX);
            bytes
                .get(from..)
                .and_then(|r| r.iter().find(|c| !matches!(c, b'\r' | b'\n')))
                == Some(&b'"')
        });
        if rec.len() == 1 && rec[0].is_empty() && !quoted {
            continue;
        }
        let field = |idx: usize, name: &str| -> Result<String, DataError> {
            let bytes = rec.get(idx).ok_or_else(|| DataError::Parse {
                path: path.to_path_buf(),
                line,
                msg: format!(
                    "row has {}, column `{name}` is field {}",
                    fields(rec.len()),
                    idx + 1
                ),
            })?;
            utf8_field(path, line, name, bytes)
        };
        out.push(RawExample {
            text: field(cols.text, &spec.text)?,
            text_pair: match (cols.pair, &spec.text_pair) {
                (Some(i), Some(n)) => Some(field(i, n)?),
                _ => None,
            },
            label: match (cols.label, &spec.label) {
                (Some(i), Some(n)) => Some(field(i, n)?.trim().to_string()),
                _ => None,
            },
            group: match (cols.group, &spec.group) {
                (Some(i), Some(n)) => Some(field(i, n)?),
                _ => None,
            },
            line,
        });
    }
    if let (true, Some(start)) = (quoting, last_multiline) {
        check_closed_quotes(path, &bytes, &lines, start, delimiter)?;
    }
    Ok(out)
}

/// The csv reader takes a quote that is never closed as a field running to the end of the file:
/// every later row would become one text, silently. Such a record is the file's last and spans
/// lines; this reads it again from `start` as the reader does (a field opening with `"` runs to
/// the next lone `"`, `""` is an escaped quote, a quote inside an unquoted field is literal) and
/// says whether the file ends inside a quoted field.
fn check_closed_quotes(
    path: &Path,
    bytes: &[u8],
    lines: &LineIndex,
    start: u64,
    delimiter: u8,
) -> Result<(), DataError> {
    let tail = bytes
        .get(usize::try_from(start).unwrap_or(usize::MAX)..)
        .unwrap_or_default();
    let (mut quoted, mut field_start) = (false, true);
    let mut i = 0;
    while i < tail.len() {
        let c = tail[i];
        if quoted {
            if c == b'"' {
                if tail.get(i + 1) == Some(&b'"') {
                    i += 1; // an escaped quote
                } else {
                    quoted = false;
                }
            }
        } else if c == b'"' && field_start {
            quoted = true;
        }
        field_start = !quoted && (c == delimiter || c == b'\n' || c == b'\r');
        i += 1;
    }
    if quoted {
        return Err(DataError::Parse {
            path: path.to_path_buf(),
            line: lines.line(start),
            msg: "a quoted field opens on this row and is never closed: the rest of the file \
                  would be read as one text; close the quote (or double a quote inside the text)"
                .into(),
        });
    }
    Ok(())
}

/// 1-based line numbers of byte offsets in a file. Why: after a CRLF line end (what Excel and
/// Python's csv module write) the csv crate starts the next record at the `\n` and counts its
/// line one short, so error messages would name the line above the bad row.
///
/// A line ends at `\r\n`, `\n` or a lone `\r`, as editors (and Python's `splitlines`) count
/// them: in old Mac files, in `\r` lines pasted into another file, and in `\r\r\n` (what Python's
/// csv writes on Windows to a file opened without `newline=''`, shown with a blank line between
/// rows).
struct LineIndex<'a> {
    newlines: Vec<u64>,
    bytes: &'a [u8],
}

impl<'a> LineIndex<'a> {
    fn of(bytes: &'a [u8]) -> Self {
        let newlines = (0..bytes.len())
            .filter(|&i| bytes[i] == b'\n' || (bytes[i] == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
            .map(|i| i as u64)
            .collect();
        Self { newlines, bytes }
    }

    /// The line of a record that starts at byte `byte`. The reader's position can be line ends
    /// it skips before the record (blank lines; the second `\r` of `\r\r\n`, as Python's csv
    /// writes on Windows): the record's line is that of its first other byte.
    fn line(&self, byte: u64) -> u64 {
        let from = usize::try_from(byte).unwrap_or(usize::MAX).min(self.bytes.len());
        let skipped = self.bytes[from..]
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        let at = (from + skipped) as u64;
        1 + self.newlines.partition_point(|&nl| nl < at) as u64
    }
}

/// "1 field", "3 fields".
fn fields(n: usize) -> String {
    format!("{n} field{}", if n == 1 { "" } else { "s" })
}

fn csv_error(path: &Path, lines: &LineIndex, e: csv::Error) -> DataError {
    let line = e.position().map(|p| lines.line(p.byte())).unwrap_or(0);
    match e.into_kind() {
        csv::ErrorKind::Io(io) => DataError::io(path, io),
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => DataError::Parse {
            path: path.to_path_buf(),
            line,
            msg: format!("row has {}, the header has {expected_len}", fields(len as usize)),
        },
        csv::ErrorKind::Utf8 { err, .. } => DataError::NonUtf8 {
            path: path.to_path_buf(),
            line,
            column: format!("#{}", err.field() + 1),
        },
        other => DataError::Parse {
            path: path.to_path_buf(),
            line,
            msg: format!("{other:?}"),
        },
    }
}

/// Splits file bytes into lines (without `\n` / `\r\n`), checking each is UTF-8.
/// Yields `(1-based line number, line)`.
fn utf8_lines(path: &Path, bytes: &[u8]) -> Result<Vec<(u64, String)>, DataError> {
    // A UTF-8 byte-order mark (Windows PowerShell and Notepad write one) is no text.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = i as u64 + 1;
        match std::str::from_utf8(raw) {
            Ok(s) => out.push((line, s.to_string())),
            Err(e) => {
                return Err(DataError::NonUtf8 {
                    path: path.to_path_buf(),
                    line,
                    column: format!("{}", e.valid_up_to() + 1),
                })
            }
        }
    }
    Ok(out)
}

/// A JSON number as a label or text: an integral float (`1.0`, `1e0`) reads as the integer it
/// equals, so that `1` and `1.0` in one file are one class.
fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => {
            format!("{}", f as i64)
        }
        _ => n.to_string(),
    }
}

fn read_jsonl(path: &Path, spec: &ColumnSpec) -> Result<Vec<RawExample>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let mut out = Vec::new();
    for (line, text) in utf8_lines(path, &bytes)? {
        if text.trim().is_empty() {
            continue;
        }
        let JsonRow(obj) = serde_json::from_str(&text).map_err(|e| DataError::Parse {
            path: path.to_path_buf(),
            line,
            msg: if e.is_data() {
                // Our own message (a key twice, not an object), without serde's "at line 1".
                let m = e.to_string();
                let m = m
                    .rsplit_once(" at line ")
                    .map_or(m.as_str(), |(m, _)| m)
                    .to_string();
                format!("{m} (column {})", e.column())
            } else {
                format!("invalid JSON at column {}: {e}", e.column())
            },
        })?;
        let obj = &obj;
        let get = |key: &str| -> Result<String, DataError> {
            match obj.get(key) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(number_text(n)),
                Some(v @ serde_json::Value::Bool(_)) => Ok(v.to_string()),
                Some(other) => Err(DataError::Parse {
                    path: path.to_path_buf(),
                    line,
                    msg: format!("key `{key}` must be a string, number or bool, got {other}"),
                }),
                None => Err(DataError::MissingColumn {
                    path: path.to_path_buf(),
                    line,
                    column: key.to_string(),
                    available: obj.keys().cloned().collect::<Vec<_>>().join(", "),
                }),
            }
        };
        out.push(RawExample {
            text: get(&spec.text)?,
            text_pair: spec.text_pair.as_deref().map(get).transpose()?,
            label: spec
                .label
                .as_deref()
                .map(get)
                .transpose()?
                .map(|l| l.trim().to_string()),
            group: spec.group.as_deref().map(get).transpose()?,
            line,
        });
    }
    Ok(out)
}

/// One JSONL row: an object whose keys are distinct ([`crate::unique_json`]).
struct JsonRow(serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for JsonRow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = JsonRow;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<JsonRow, A::Error> {
                // The top level only: a repeat inside a column's nested value reads no text.
                crate::unique_json::unique_map::<A, serde_json::Value>(map).map(JsonRow)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Reads plain-text files for LM training: `(path, [(line number, line)])` per file, every line
/// checked to be UTF-8. A file with no non-blank text is an error.
#[allow(clippy::type_complexity)]
pub fn read_lm_texts(paths: &[PathBuf]) -> Result<Vec<(PathBuf, Vec<(u64, String)>)>, DataError> {
    if paths.is_empty() {
        return Err(DataError::Invalid("no LM text files given".into()));
    }
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let lines = utf8_lines(path, &bytes)?;
        if lines.iter().all(|(_, l)| l.trim().is_empty()) {
            return Err(DataError::Empty {
                path: path.clone(),
                detail: String::new(),
            });
        }
        out.push((path.clone(), lines));
    }
    Ok(out)
}

/// String labels ↔ ids, saved as Hugging Face style JSON (`id2label`, `label2id`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMap {
    labels: Vec<String>,
    index: HashMap<String, u32>,
}

impl LabelMap {
    /// Ids in the order given; duplicates are an error.
    pub fn new(labels: Vec<String>) -> Result<Self, DataError> {
        let mut index = HashMap::with_capacity(labels.len());
        for (i, l) in labels.iter().enumerate() {
            if index.insert(l.clone(), i as u32).is_some() {
                return Err(DataError::Invalid(format!(
                    "label `{l}` appears twice in the label mapping"
                )));
            }
        }
        if labels.is_empty() {
            return Err(DataError::Invalid(
                "a label mapping needs at least one label".into(),
            ));
        }
        Ok(Self { labels, index })
    }

    /// The sorted distinct labels of `data` (so ids do not depend on row order).
    pub fn from_data(data: &ClassificationData) -> Result<Self, DataError> {
        let set: BTreeSet<&str> = data.examples.iter().filter_map(|e| e.label.as_deref()).collect();
        if set.is_empty() {
            return Err(DataError::Invalid(format!(
                "{}: no labels found",
                data.path.display()
            )));
        }
        Self::new(set.into_iter().map(String::from).collect())
    }

    /// Pairs of labels that differ only in letter case (`Positive` and `positive`): two classes
    /// to the model, though most likely one class spelt two ways in the data.
    pub fn case_twins(&self) -> Vec<(&str, &str)> {
        let mut seen: HashMap<String, &str> = HashMap::new();
        let mut twins = Vec::new();
        for l in &self.labels {
            match seen.entry(l.to_lowercase()) {
                std::collections::hash_map::Entry::Occupied(e) => twins.push((*e.get(), l.as_str())),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(l);
                }
            }
        }
        twins
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn id(&self, label: &str) -> Option<u32> {
        self.index.get(label).copied()
    }

    pub fn label(&self, id: u32) -> Option<&str> {
        self.labels.get(id as usize).map(String::as_str)
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn to_json(&self) -> serde_json::Value {
        let id2label: BTreeMap<String, &str> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l.as_str()))
            .collect();
        let label2id: BTreeMap<&str, usize> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i))
            .collect();
        serde_json::json!({ "id2label": id2label, "label2id": label2id })
    }

    pub fn from_json(value: &serde_json::Value) -> Result<Self, String> {
        let map = value
            .get("id2label")
            .and_then(|v| v.as_object())
            .ok_or("missing object `id2label`")?;
        let mut pairs = Vec::with_capacity(map.len());
        for (k, v) in map {
            // "00" and "+0" parse as 0 too, and would then be reported as a missing id.
            let id: usize = k
                .parse()
                .ok()
                .filter(|id: &usize| id.to_string() == *k)
                .ok_or_else(|| format!("id2label key `{k}` is not an integer id (0, 1, …)"))?;
            let label = v
                .as_str()
                .ok_or_else(|| format!("id2label[{k}] is not a string"))?;
            pairs.push((id, label.to_string()));
        }
        pairs.sort();
        for (i, (id, _)) in pairs.iter().enumerate() {
            if *id != i {
                return Err(format!("id2label ids must be 0..{}, missing {i}", pairs.len()));
            }
        }
        let map = Self::new(pairs.into_iter().map(|(_, l)| l).collect()).map_err(|e| e.to_string())?;
        // HF writes both directions; one that contradicts the other is a broken file. Many hub
        // configs name their classes in id2label but leave label2id at HF's placeholders
        // (`LABEL_0`: 0, …); transformers reads id2label, and so does this. A placeholder that
        // is also one of id2label's labels must have its id there too: `LABEL_1` at id 0 is a
        // contradiction, not a placeholder.
        let placeholders = |l2i: &serde_json::Map<String, serde_json::Value>| {
            l2i.iter().all(|(k, v)| {
                let n = k.strip_prefix("LABEL_").and_then(|n| n.parse::<u64>().ok());
                n.is_some()
                    && v.as_u64() == n
                    && map.id(k).is_none_or(|i| u64::from(i) == n.unwrap_or(u64::MAX))
            })
        };
        if let Some(l2i) = value
            .get("label2id")
            .and_then(|v| v.as_object())
            .filter(|m| !placeholders(m))
        {
            for (label, id) in l2i {
                if id.as_u64().map(|i| i as usize) != map.id(label).map(|i| i as usize) {
                    return Err(format!(
                        "label2id[{label:?}] = {id}, but id2label gives {}",
                        map.id(label)
                            .map_or("no such label".to_string(), |i| format!("id {i}"))
                    ));
                }
            }
        }
        Ok(map)
    }

    /// Writes the JSON next to `path` then renames it into place.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let text =
            serde_json::to_string_pretty(&self.to_json()).map_err(|e| DataError::Invalid(e.to_string()))?;
        crate::checkpoint::write_file_atomic(path, text.as_bytes()).map_err(|e| DataError::io(path, e))
    }

    pub fn load(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let text = super::strip_bom(&text);
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| DataError::Parse {
            path: path.to_path_buf(),
            line: e.line() as u64,
            msg: e.to_string(),
        })?;
        Self::from_json(&value).map_err(|msg| DataError::Parse {
            path: path.to_path_buf(),
            line: 1,
            msg,
        })
    }
}

/// Seeded train / validation split. With `by_group` every distinct `group` value (e.g. a movie)
/// goes wholly to one side; otherwise each row is its own group. Groups are shuffled with `seed`
/// and moved to validation until it holds at least `valid_fraction` of the rows. Row order within
/// each side is the file order.
pub fn split_train_validation(
    data: ClassificationData,
    valid_fraction: f64,
    seed: u64,
    by_group: bool,
) -> Result<(ClassificationData, ClassificationData), DataError> {
    if !(valid_fraction > 0.0 && valid_fraction < 1.0) {
        return Err(DataError::Invalid(format!(
            "validation fraction must be in (0, 1), got {valid_fraction}"
        )));
    }
    let n = data.examples.len();
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, e) in data.examples.iter().enumerate() {
        let key = if by_group {
            match &e.group {
                Some(g) => g.clone(),
                None => {
                    return Err(DataError::Invalid(format!(
                        "{}: line {}: a grouped split needs a group column",
                        data.path.display(),
                        e.line
                    )))
                }
            }
        } else {
            format!("{i:012}")
        };
        groups.entry(key).or_default().push(i);
    }
    if groups.len() < 2 {
        let what = if by_group {
            format!(
                "{} group(s) (distinct values of column `{}`)",
                groups.len(),
                data.columns.group.as_deref().unwrap_or_default()
            )
        } else {
            format!("{} row(s)", groups.len())
        };
        return Err(DataError::Invalid(format!(
            "{}: cannot split {what} into train and validation; give more rows, or a --validation-file",
            data.path.display(),
        )));
    }
    let mut keys: Vec<&String> = groups.keys().collect();
    SplitMix64::derive(seed, 0x5EED_5B11).shuffle(&mut keys);
    let want = ((n as f64) * valid_fraction).ceil() as usize;
    let mut in_valid = vec![false; n];
    let mut taken = 0;
    for k in keys.iter().take(keys.len() - 1) {
        if taken >= want {
            break;
        }
        for &i in &groups[*k] {
            in_valid[i] = true;
        }
        taken += groups[*k].len();
    }
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for (e, v) in data.examples.into_iter().zip(in_valid) {
        if v {
            valid.push(e)
        } else {
            train.push(e)
        }
    }
    Ok((
        ClassificationData {
            path: data.path.clone(),
            columns: data.columns.clone(),
            examples: train,
        },
        ClassificationData {
            path: data.path,
            columns: data.columns,
            examples: valid,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn rt_spec() -> ColumnSpec {
        ColumnSpec {
            text: "text".into(),
            text_pair: None,
            label: Some("category".into()),
            group: Some("movie_name".into()),
        }
    }

    const RT: &str = "category,text,movie_name,has_plot_and_reviews\n\
        fresh,\"A joy, from start\nto finish.\",Movie A,True\n\
        rotten,Dull.,Movie A,True\n\
        plot,A man walks.,Movie B,True\n\
        fresh,Great fun,Movie B,True\n\
        rotten,\"Said \"\"meh\"\"\",Movie C,False\n";

    #[test]
    fn csv_with_quotes_newlines_and_dropped_labels() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "rt.csv", RT.as_bytes());
        let d = read_classification(&p, None, &rt_spec(), &["plot".into()]).unwrap();
        assert_eq!(d.examples.len(), 4);
        assert_eq!(d.examples[0].text, "A joy, from start\nto finish.");
        assert_eq!(d.examples[0].line, 2);
        assert_eq!(d.examples[1].line, 4);
        assert_eq!(d.examples[3].text, "Said \"meh\"");
        assert_eq!(d.examples[3].group.as_deref(), Some("Movie C"));
        let labels = LabelMap::from_data(&d).unwrap();
        assert_eq!(labels.labels(), ["fresh", "rotten"]);
        // Dropping every label that occurs leaves no rows: said so, not "the file is empty".
        let drop_all: Vec<String> = ["plot", "fresh", "rotten"].map(String::from).to_vec();
        let e = read_classification(&p, None, &rt_spec(), &drop_all)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no data rows left after dropping labels") && !e.contains("file is empty"),
            "{e}"
        );
        let empty = write(dir.path(), "empty.csv", b"category,text,movie_name\n");
        let e = read_classification(&empty, None, &rt_spec(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("the file is empty"), "{e}");
    }

    #[test]
    fn crlf_files_name_the_same_lines_as_lf_files() {
        let dir = tempfile::tempdir().unwrap();
        // Only the record ends become CRLF; the newline inside the quoted field stays.
        let crlf = RT
            .replace(",True\n", ",True\r\n")
            .replace(",False\n", ",False\r\n");
        let crlf = crlf.replacen("reviews\n", "reviews\r\n", 1);
        assert!(crlf.matches("\r\n").count() >= 4, "{crlf:?}");
        let lf =
            read_classification(&write(dir.path(), "lf.csv", RT.as_bytes()), None, &rt_spec(), &[]).unwrap();
        let p = write(dir.path(), "crlf.csv", crlf.as_bytes());
        let d = read_classification(&p, None, &rt_spec(), &[]).unwrap();
        let lines = |d: &ClassificationData| d.examples.iter().map(|e| e.line).collect::<Vec<_>>();
        assert_eq!(lines(&d), lines(&lf));
        assert_eq!(d.examples[0].text, "A joy, from start\nto finish.");
        // Errors too: a ragged row and a non-UTF-8 field, each on line 3.
        let spec = rt_spec();
        let p = write(
            dir.path(),
            "r.csv",
            b"category,text,movie_name\r\nfresh,ok,A\r\nrotten,two\r\n",
        );
        let e = read_classification(&p, None, &spec, &[]).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
        let p = write(
            dir.path(),
            "u.csv",
            b"category,text,movie_name\r\nfresh,ok,A\r\nrotten,b\xff,B\r\n",
        );
        let e = read_classification(&p, None, &spec, &[]).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn tsv_and_jsonl_with_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.tsv",
            b"s1\ts2\tlabel\nhi \"there\"\tyo\tpos\nlo\tyo\tneg\n",
        );
        let spec = ColumnSpec {
            text: "s1".into(),
            text_pair: Some("s2".into()),
            ..Default::default()
        };
        let d = read_classification(&p, None, &spec, &[]).unwrap();
        assert_eq!(d.examples[0].text, "hi \"there\"");
        assert_eq!(d.examples[0].text_pair.as_deref(), Some("yo"));
        assert_eq!(d.examples[1].label.as_deref(), Some("neg"));
        let p = write(
            dir.path(),
            "a.jsonl",
            b"{\"s1\":\"x\",\"s2\":\"y\",\"label\":1}\n\n{\"s1\":\"z\",\"s2\":\"w\",\"label\":0}\n",
        );
        let d = read_classification(&p, None, &spec, &[]).unwrap();
        assert_eq!(d.examples.len(), 2);
        assert_eq!(d.examples[0].label.as_deref(), Some("1"));
        assert_eq!(d.examples[1].line, 3);
    }

    #[test]
    fn a_quote_never_closed_is_named_not_read_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ColumnSpec {
            text: "text".into(),
            label: None,
            ..Default::default()
        };
        let p = write(
            dir.path(),
            "u.csv",
            b"text\nfine\n\"unclosed start\nsecond row\nthird row\n",
        );
        let e = read_classification(&p, None, &spec, &[]).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("never closed"), "{e}");
        // Closed quotes spanning lines, and a literal quote inside an unquoted field, are fine.
        let p = write(
            dir.path(),
            "ok.csv",
            b"text\n\"two\nlines, \"\"quoted\"\"\"\nhe said \"hi\n\"last\nrow\"\n",
        );
        let d = read_classification(&p, None, &spec, &[]).unwrap();
        let texts: Vec<_> = d.examples.iter().map(|e| e.text.as_str()).collect();
        assert_eq!(texts, ["two\nlines, \"quoted\"", "he said \"hi", "last\nrow"]);
        // An odd number of quotes in a last row that closes its quoted field.
        let spec2 = ColumnSpec {
            text: "text".into(),
            label: Some("size".into()),
            ..Default::default()
        };
        let p = write(dir.path(), "odd.csv", b"text,size\n\"Great\nTV\",55\" screen\n");
        let d = read_classification(&p, None, &spec2, &[]).unwrap();
        assert_eq!(d.examples[0].label.as_deref(), Some("55\" screen"));
    }

    #[test]
    fn integral_json_numbers_are_one_label() {
        let dir = tempfile::tempdir().unwrap();
        let rows: String = ["1", "1.0", "1e0", "2.5", "-0.0", "12345678901234567890"]
            .iter()
            .map(|l| format!("{{\"text\":\"t\",\"label\":{l}}}\n"))
            .collect();
        let p = write(dir.path(), "n.jsonl", rows.as_bytes());
        let spec = ColumnSpec {
            text: "text".into(),
            label: Some("label".into()),
            ..Default::default()
        };
        let d = read_classification(&p, None, &spec, &[]).unwrap();
        let labels: Vec<_> = d.examples.iter().map(|e| e.label.clone().unwrap()).collect();
        assert_eq!(labels, ["1", "1", "1", "2.5", "0", "12345678901234567890"]);
    }

    #[test]
    fn bad_input_errors_name_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let spec = rt_spec();
        // Missing column.
        let p = write(dir.path(), "m.csv", b"category,text\nfresh,ok\n");
        let e = read_classification(&p, None, &spec, &[]).unwrap_err().to_string();
        assert!(
            e.contains("m.csv") && e.contains("line 1") && e.contains("`movie_name`"),
            "{e}"
        );
        // Empty file, and header only.
        let p = write(dir.path(), "e.csv", b"");
        let e = read_classification(&p, None, &spec, &[]).unwrap_err().to_string();
        assert!(e.contains("e.csv") && e.contains("empty"), "{e}");
        let p = write(dir.path(), "h.csv", b"category,text,movie_name\n");
        let e = read_classification(&p, None, &spec, &[]).unwrap_err().to_string();
        assert!(e.contains("h.csv") && e.contains("empty"), "{e}");
        // A folder where a file goes.
        let folder = dir.path().join("data.csv");
        std::fs::create_dir(&folder).unwrap();
        let e = read_classification(&folder, None, &spec, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.csv") && e.contains("is a directory"), "{e}");
        // Non-UTF-8 in a CSV field and in a JSONL line.
        let p = write(
            dir.path(),
            "u.csv",
            b"category,text,movie_name\nfresh,ok,A\nrotten,bad \xff byte,B\n",
        );
        let e = read_classification(&p, None, &spec, &[]).unwrap_err().to_string();
        assert!(
            e.contains("u.csv") && e.contains("line 3") && e.contains("`text`") && e.contains("UTF-8"),
            "{e}"
        );
        let p = write(
            dir.path(),
            "u.jsonl",
            b"{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"\xc3\x28\",\"label\":\"y\"}\n",
        );
        let e = read_classification(&p, None, &ColumnSpec::default(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("u.jsonl") && e.contains("line 2") && e.contains("column 10"),
            "{e}"
        );
        // Missing key in JSONL, on its line.
        let p = write(
            dir.path(),
            "k.jsonl",
            b"{\"text\":\"a\",\"label\":\"x\"}\n{\"txt\":\"b\",\"label\":\"y\"}\n",
        );
        let e = read_classification(&p, None, &ColumnSpec::default(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("k.jsonl") && e.contains("line 2") && e.contains("`text`"),
            "{e}"
        );
        // A quoted empty text in a one-column file is a row (blank lines are none), and a
        // JSONL file's byte-order mark is no JSON.
        let one = b"text\ngreat film\n\n\"\"\nawful film\n";
        let p = write(dir.path(), "one.csv", one);
        let pred = ColumnSpec {
            label: None,
            ..ColumnSpec::default()
        };
        let texts: Vec<String> = read_classification(&p, None, &pred, &[])
            .unwrap()
            .examples
            .into_iter()
            .map(|e| e.text)
            .collect();
        assert_eq!(texts, ["great film", "", "awful film"]);
        let p = write(
            dir.path(),
            "bom.jsonl",
            b"\xEF\xBB\xBF{\"text\":\"a\",\"label\":\"x\"}\n",
        );
        let rows = read_classification(&p, None, &ColumnSpec::default(), &[]).unwrap();
        assert_eq!(rows.examples[0].text, "a");
        // A blank label: named, and skipped with --drop-label "".
        let blank = b"category,text,movie_name\nfresh,ok,A\n ,meh,B\nrotten,bad,C\n";
        let p = write(dir.path(), "b.csv", blank);
        let e = read_classification(&p, None, &spec, &[]).unwrap_err().to_string();
        assert!(
            e.contains("b.csv")
                && e.contains("line 3")
                && e.contains("`category`")
                && e.contains("--drop-label"),
            "{e}"
        );
        let d = read_classification(&p, None, &spec, &["".into()]).unwrap();
        assert_eq!(d.examples.len(), 2);
        // A used column named twice in the header, and a JSONL key given twice: named, since
        // either copy could be the one meant (an unused duplicate column is harmless).
        let p = write(
            dir.path(),
            "d.csv",
            b"category,text,text,movie_name,x,x\nfresh,a,b,A,1,2\n",
        );
        let e = read_classification(&p, None, &spec, &[]).unwrap_err().to_string();
        assert!(
            e.contains("d.csv")
                && e.contains("line 1")
                && e.contains("`text` 2 times")
                && e.contains("fields 2, 3"),
            "{e}"
        );
        let p = write(
            dir.path(),
            "ok.csv",
            b"category,text,movie_name,x,x\nfresh,a,A,1,2\n",
        );
        assert_eq!(
            read_classification(&p, None, &spec, &[]).unwrap().examples.len(),
            1
        );
        let p = write(
            dir.path(),
            "d.jsonl",
            b"{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\",\"label\":\"y\",\"text\":\"c\"}\n",
        );
        let e = read_classification(&p, None, &ColumnSpec::default(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("d.jsonl") && e.contains("line 2") && e.contains("key `text` appears twice"),
            "{e}"
        );
        let p = write(dir.path(), "a.jsonl", b"[1, 2]\n");
        let e = read_classification(&p, None, &ColumnSpec::default(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1") && e.contains("expected a JSON object"),
            "{e}"
        );
        // Dropped rows are counted per label, so a label that matches nothing can be named.
        let p = write(
            dir.path(),
            "c.csv",
            b"category,text,movie_name\nfresh,a,A\nplot,b,B\nrotten,c,C\n",
        );
        let drops = ["plot".to_string(), "plto".to_string()];
        let (d, n) = read_classification_counted(&p, None, &spec, &drops).unwrap();
        assert_eq!((d.examples.len(), n), (2, vec![1, 0]));
        // Ragged CSV row.
        let p = write(
            dir.path(),
            "r.csv",
            b"category,text,movie_name\nfresh,ok,A\nrotten,two\n",
        );
        let e = read_classification(&p, None, &spec, &[]).unwrap_err().to_string();
        assert!(e.contains("r.csv") && e.contains("line 3"), "{e}");
        // LM text: non-UTF-8 and empty.
        let p = write(dir.path(), "t.txt", b"fine\nalso fine\nnot \xfe fine\n");
        let e = read_lm_texts(&[p]).unwrap_err().to_string();
        assert!(
            e.contains("t.txt") && e.contains("line 3") && e.contains("column 5"),
            "{e}"
        );
        let p = write(dir.path(), "z.txt", b"\n  \n");
        let e = read_lm_texts(&[p]).unwrap_err().to_string();
        assert!(e.contains("z.txt") && e.contains("empty"), "{e}");
    }

    #[test]
    fn labels_that_differ_only_in_case_are_paired() {
        let m = LabelMap::new(vec![
            "Neg".into(),
            "POS".into(),
            "neg".into(),
            "pos".into(),
            "Ünï".into(),
            "ünï".into(),
        ])
        .unwrap();
        assert_eq!(m.case_twins(), [("Neg", "neg"), ("POS", "pos"), ("Ünï", "ünï")]);
        let m = LabelMap::new(vec!["neg".into(), "pos".into(), "neutral".into()]).unwrap();
        assert!(m.case_twins().is_empty());
    }

    #[test]
    fn label_maps_with_odd_ids_or_directions_that_disagree_are_refused() {
        let bad = |j: serde_json::Value| LabelMap::from_json(&j).unwrap_err();
        let e = bad(serde_json::json!({"id2label": {"0": "a", "00": "b"}}));
        assert!(e.contains("`00`"), "{e}");
        let e = bad(serde_json::json!({"id2label": {"+0": "a", "1": "b"}}));
        assert!(e.contains("`+0`"), "{e}");
        let e = bad(serde_json::json!({"id2label": {"0": "a", "1": "b"}, "label2id": {"a": 1, "b": 0}}));
        assert!(e.contains("label2id[\"a\"] = 1") && e.contains("id 0"), "{e}");
        let placeholders = serde_json::json!({"id2label": {"0": "neg", "1": "pos"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1}});
        assert_eq!(
            LabelMap::from_json(&placeholders).unwrap().labels(),
            ["neg", "pos"]
        );
        let ok = serde_json::json!({"id2label": {"0": "a", "1": "b"}, "label2id": {"a": 0, "b": 1}});
        assert_eq!(LabelMap::from_json(&ok).unwrap().labels(), ["a", "b"]);
    }

    #[test]
    fn label_map_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = LabelMap::new(vec!["neg".into(), "pos".into(), "neutral".into()]).unwrap();
        let p = dir.path().join("labels.json");
        m.save(&p).unwrap();
        let back = LabelMap::load(&p).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.id("neutral"), Some(2));
        assert_eq!(back.label(1), Some("pos"));
        assert!(LabelMap::new(vec!["a".into(), "a".into()]).is_err());
    }

    #[test]
    fn grouped_split_keeps_groups_whole_and_is_seeded() {
        let examples: Vec<RawExample> = (0..200)
            .map(|i| RawExample {
                text: format!("t{i}"),
                text_pair: None,
                label: Some(if i % 2 == 0 { "a" } else { "b" }.into()),
                group: Some(format!("movie{}", i % 37)),
                line: i + 2,
            })
            .collect();
        let data = ClassificationData {
            path: "x.csv".into(),
            columns: rt_spec(),
            examples,
        };
        let (tr, va) = split_train_validation(data.clone(), 0.2, 1, true).unwrap();
        assert_eq!(tr.examples.len() + va.examples.len(), 200);
        assert!(
            va.examples.len() >= 40 && va.examples.len() < 60,
            "{}",
            va.examples.len()
        );
        let tg: BTreeSet<_> = tr.examples.iter().map(|e| e.group.clone()).collect();
        let vg: BTreeSet<_> = va.examples.iter().map(|e| e.group.clone()).collect();
        assert!(tg.is_disjoint(&vg));
        let (tr2, va2) = split_train_validation(data.clone(), 0.2, 1, true).unwrap();
        assert_eq!((tr2, va2), (tr.clone(), va.clone()));
        let (_, va3) = split_train_validation(data.clone(), 0.2, 2, true).unwrap();
        assert_ne!(va3, va);
        let (tr4, va4) = split_train_validation(data.clone(), 0.25, 1, false).unwrap();
        assert_eq!((tr4.examples.len(), va4.examples.len()), (150, 50));
        // Too little to split: rows, or the group column's values, are named as what is short.
        let one = |n: usize| ClassificationData {
            examples: data.examples[..n].to_vec(),
            ..data.clone()
        };
        let e = split_train_validation(one(1), 0.2, 1, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.csv") && e.contains("1 row(s)") && !e.contains("group"),
            "{e}"
        );
        let mut same = one(3);
        same.examples.iter_mut().for_each(|e| e.group = Some("m".into()));
        let e = split_train_validation(same, 0.2, 1, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 group(s)") && e.contains("`movie_name`"), "{e}");
    }
}
