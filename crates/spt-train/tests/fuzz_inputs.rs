//! Adversarial inputs for spt-train's public parsers: training data (CSV, TSV, JSONL, LM text),
//! label maps, run configs (TOML, JSON, `--set`), checkpoint manifests and tensor files, model
//! safetensors and tokenizers. The rule: bad input is an `Err` naming what is wrong, never a
//! panic; a valid file reads back as written.
//!
//! The property tests draw their cases from the crate's seeded SplitMix64 (mutations of byte
//! strings, which proptest's strategies would only wrap), so every failure is reproducible; the
//! message names the case, and `SPT_FUZZ_SEED` / `SPT_FUZZ_SCALE` draw other and more cases. The plain `#[test]`s at the end of each section are minimal regressions.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use spt_train::checkpoint::{
    fnv1a64, load_checkpoint, load_checkpoint_weights, read_manifest, save_checkpoint, CheckpointData, FsIo,
};
use spt_train::config::FinetuneConfig;
use spt_train::data::{
    read_classification, read_lm_texts, ColumnSpec, DataFormat, LabelMap, RawExample, TextTokenizer,
};
use spt_train::rng::SplitMix64;

// ---------------------------------------------------------------------------------------------
// Harness: a seeded generator, mutations, and "no panic".
// ---------------------------------------------------------------------------------------------

/// Draws test cases from the crate's own seeded SplitMix64.
struct Rng(SplitMix64);

impl Rng {
    /// `SPT_FUZZ_SEED` (default 0) shifts every test's seed, to draw other cases.
    fn new(seed: u64) -> Self {
        let shift: u64 = std::env::var("SPT_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Self(SplitMix64::derive(seed, shift))
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.0.below(n as u64) as usize
        }
    }

    /// True with probability 1/n.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Byte strings that parsers trip on.
const SPICE: &[&[u8]] = &[
    b"\0",
    b"\r",
    b"\n",
    b"\r\n",
    b"\"",
    b"\"\"",
    b",",
    b"\t",
    b"\xEF\xBB\xBF",
    b"\xFF",
    b"\xC3",
    b"\xED\xA0\x80", // an encoded surrogate: not UTF-8
    "\u{2028}".as_bytes(),
    "\u{FEFF}".as_bytes(),
    "\u{202E}".as_bytes(),
    "e\u{301}".as_bytes(),
    "𝄞".as_bytes(),
    b"{",
    b"}",
    b"[",
    b"]",
    b"[[",
    b":",
    b"=",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"#",
    b"'",
    b"-1",
    b"0",
    b"1e999",
    b"-0.0",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"9223372036854775807",
    b"nan",
    b"inf",
    b"null",
    b"true",
    b"\"text\"",
    b"\"label\"",
];

/// One to three random edits of `input`: truncation, inserted spice, deleted or duplicated
/// ranges, flipped bits, CRLF line ends, a byte-order mark, a long run.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(3) {
        let len = b.len();
        let at = rng.below(len + 1);
        match rng.below(11) {
            0 => b.truncate(at),
            1 | 2 => {
                let s = rng.pick(SPICE);
                b.splice(at..at, s.iter().copied());
            }
            3 => {
                let end = (at + 1 + rng.below(16)).min(len);
                b.drain(at.min(end)..end);
            }
            4 => {
                let end = (at + 1 + rng.below(32)).min(len);
                let piece = b[at.min(end)..end].to_vec();
                b.splice(at..at, piece);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            6 => {
                let text = b.iter().fold(Vec::new(), |mut v, &c| {
                    if c == b'\n' {
                        v.push(b'\r');
                    }
                    v.push(c);
                    v
                });
                b = text;
            }
            7 => {
                b.splice(0..0, b"\xEF\xBB\xBF".iter().copied());
            }
            8 => {
                let c = *rng.pick(b"a \"{[9");
                let n = 1 + rng.below(20_000);
                b.splice(at..at, std::iter::repeat_n(c, n));
            }
            9 if len > 0 => {
                let i = rng.below(len);
                b[i] = rng.next_u64() as u8;
            }
            _ => {
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                b.splice(at..at, bytes);
            }
        }
    }
    b
}

/// `n` cases, times `SPT_FUZZ_SCALE` (default 1) for a longer hunt.
fn cases(n: usize) -> std::ops::Range<usize> {
    let scale: usize = std::env::var("SPT_FUZZ_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    0..n * scale
}

fn random_bytes(rng: &mut Rng, max: usize) -> Vec<u8> {
    let n = rng.below(max + 1);
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Shows an input in a failure message (escaped, at most ~400 characters).
fn show(bytes: &[u8]) -> String {
    let s = format!("{:?}", String::from_utf8_lossy(bytes));
    if s.len() > 400 {
        let cut = s.char_indices().nth(400).map_or(s.len(), |(i, _)| i);
        format!("{}… ({} bytes)", &s[..cut], bytes.len())
    } else {
        s
    }
}

/// Runs `f`, turning a panic into a test failure that names `what`.
fn no_panic<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => panic!("{}: panicked: {}", what(), panic_text(&*p)),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Random text from pieces that matter to the readers: delimiters, quotes, line ends, spaces,
/// unicode, NUL.
fn random_text(rng: &mut Rng, max_pieces: usize) -> String {
    const PIECES: &[&str] = &[
        "a", "b", "word", " ", "  ", ",", "\"", "\"\"", "\n", "\r\n", "\r", "\t", "é", "e\u{301}", "𝄞",
        "\u{2028}", "\u{FEFF}", "\u{202E}", "\0", "{", "}", "[", "]", ":", "\\", "'", "#", "=", "-1", "1.0",
        "null", "漢字", "🙂",
    ];
    let n = rng.below(max_pieces + 1);
    (0..n).map(|_| *rng.pick(PIECES)).collect()
}

fn spec(label: bool, group: bool) -> ColumnSpec {
    ColumnSpec {
        text: "text".into(),
        text_pair: None,
        label: label.then(|| "label".into()),
        group: group.then(|| "group".into()),
    }
}

/// What every successful read must satisfy, whatever the input: rows exist, labels are present,
/// trimmed and non-empty, and row lines increase within the file's line count.
///
/// Lines are counted as editors count them (`\r\n`, `\n` and a lone `\r` each end one).
fn check_read(data: &spt_train::data::ClassificationData, bytes: &[u8], header: bool, what: &str) {
    assert!(!data.examples.is_empty(), "{what}: Ok with no rows");
    let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n");
    let lines = text.matches(['\n', '\r']).count() as u64 + 1;
    let mut last = if header { 1 } else { 0 };
    for e in &data.examples {
        if data.columns.label.is_some() {
            let l = e
                .label
                .as_deref()
                .unwrap_or_else(|| panic!("{what}: row without a label"));
            assert!(!l.is_empty() && l.trim() == l, "{what}: label {l:?}");
        } else {
            assert!(e.label.is_none(), "{what}");
        }
        assert!(
            e.line > last && e.line <= lines,
            "{what}: row line {} after {last}, file has {lines} lines",
            e.line
        );
        last = e.line;
    }
}

// ---------------------------------------------------------------------------------------------
// Classification data: CSV, TSV, JSONL.
// ---------------------------------------------------------------------------------------------

const CSV_SEED: &[u8] = b"text,label,group\n\"A joy, from start\nto finish.\",pos,m1\nDull.,neg,m1\n\"Said \"\"meh\"\"\",neg,m2\n,pos,m3\n";
const TSV_SEED: &[u8] = b"text\tlabel\tgroup\nhi \"there\"\tpos\tm1\nlo\tneg\tm2\n\t neg \tm3\n";
const JSONL_SEED: &[u8] = b"{\"text\":\"a\",\"label\":\"pos\",\"group\":\"m1\"}\n\n{\"text\":\"b\\n\\u00e9\",\"label\":1,\"group\":2.0,\"x\":{\"y\":[1,{\"z\":null}]}}\n{\"text\":\"c\",\"label\":true,\"group\":\"m\"}\n";

#[test]
fn mutated_data_files_read_or_err_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(1);
    for case in cases(240) {
        let (seed, ext, header) = match case % 3 {
            0 => (CSV_SEED, "csv", true),
            1 => (TSV_SEED, "tsv", true),
            _ => (JSONL_SEED, "jsonl", false),
        };
        let bytes = mutate(&mut rng, seed);
        let p = write(dir.path(), &format!("d.{ext}"), &bytes);
        for (label, group) in [(true, true), (false, false)] {
            let what = || format!("case {case} .{ext} label={label}: {}", show(&bytes));
            let r = no_panic(what, || read_classification(&p, None, &spec(label, group), &[]));
            match r {
                Ok(d) => check_read(&d, &bytes, header, &what()),
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains(&format!("d.{ext}")),
                        "{}: the error names no file: {e}",
                        what()
                    );
                }
            }
        }
    }
}

#[test]
fn random_bytes_as_data_files_read_or_err_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(2);
    for case in cases(150) {
        let bytes = random_bytes(&mut rng, 300);
        for fmt in [DataFormat::Csv, DataFormat::Tsv, DataFormat::Jsonl] {
            let p = write(dir.path(), "r.dat", &bytes);
            let r = no_panic(
                || format!("case {case} {fmt:?}: {}", show(&bytes)),
                || read_classification(&p, Some(fmt), &spec(false, false), &[]),
            );
            if let Ok(d) = r {
                check_read(
                    &d,
                    &bytes,
                    fmt != DataFormat::Jsonl,
                    &format!("case {case} {fmt:?}"),
                );
            }
        }
        let p = write(dir.path(), "r.txt", &bytes);
        let r = no_panic(
            || format!("case {case} lm: {}", show(&bytes)),
            || read_lm_texts(std::slice::from_ref(&p)),
        );
        if let Ok(files) = r {
            // Every line comes back, numbered from 1, without its line end.
            let lines = &files[0].1;
            assert!(lines.iter().enumerate().all(|(i, (n, _))| *n == i as u64 + 1));
            assert!(lines.iter().all(|(_, l)| !l.contains('\n')));
        }
    }
}

/// Writes `rows` (text, label, group) as RFC 4180 CSV: a field is quoted when it must be (and
/// at random when it need not be).
fn csv_file(rng: &mut Rng, rows: &[(String, String, String)], crlf: bool, bom: bool) -> (Vec<u8>, Vec<u64>) {
    let eol = if crlf { "\r\n" } else { "\n" };
    let quote = |rng: &mut Rng, f: &str| {
        let must = f.is_empty()
            || f.contains([',', '"', '\n', '\r'])
            || f.starts_with([' ', '\t'])
            || f.ends_with([' ', '\t']);
        if must || rng.one_in(4) {
            format!("\"{}\"", f.replace('"', "\"\""))
        } else {
            f.to_string()
        }
    };
    let mut out = String::new();
    if bom {
        out.push('\u{FEFF}');
    }
    out.push_str("text,label,group");
    out.push_str(eol);
    let mut lines = Vec::new();
    for (t, l, g) in rows {
        // Line ends as editors count them: `\r\n`, `\n` and a lone `\r`.
        let ends = out.replace("\r\n", "\n").matches(['\n', '\r']).count();
        lines.push(ends as u64 + 1);
        let row = [quote(rng, t), quote(rng, l), quote(rng, g)].join(",");
        out.push_str(&row);
        out.push_str(eol);
    }
    (out.into_bytes(), lines)
}

/// `n` rows of (text, label, group).
fn random_rows(rng: &mut Rng, n: usize) -> Vec<(String, String, String)> {
    (0..n)
        .map(|_| (random_text(rng, 8), random_label(rng), random_text(rng, 3)))
        .collect()
}

fn random_label(rng: &mut Rng) -> String {
    loop {
        let l = random_text(rng, 4);
        // Labels are read trimmed; a label blank after trimming is an error of its own.
        let l = l.trim().to_string();
        if !l.is_empty() {
            return l;
        }
    }
}

/// Writes `bytes` as `dir/name`, reads it (text, label and group columns) and compares the rows
/// with `want`, each at its line.
fn reads_back(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    want: &[(String, String, String)],
    lines: &[u64],
    case: usize,
) {
    let p = write(dir, name, bytes);
    let what = format!("case {case}: {}", show(bytes));
    let d = no_panic(
        || what.clone(),
        || read_classification(&p, None, &spec(true, true), &[]),
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    compare(&d.examples, want, lines, &what);
}

fn compare(got: &[RawExample], want: &[(String, String, String)], lines: &[u64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (i, (e, (t, l, g))) in got.iter().zip(want).enumerate() {
        assert_eq!(&e.text, t, "{what}: row {i} text");
        assert_eq!(e.label.as_deref(), Some(l.as_str()), "{what}: row {i} label");
        assert_eq!(e.group.as_deref(), Some(g.as_str()), "{what}: row {i} group");
        assert_eq!(e.line, lines[i], "{what}: row {i} line");
    }
}

#[test]
fn csv_written_by_the_rules_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(3);
    for case in cases(150) {
        let n = 1 + rng.below(6);
        // A bare `\r` inside a field is kept by RFC 4180 quoting; NUL and friends too.
        let rows = random_rows(&mut rng, n);
        let (crlf, bom) = (rng.one_in(2), rng.one_in(3));
        let (bytes, lines) = csv_file(&mut rng, &rows, crlf, bom);
        reads_back(dir.path(), "rt.csv", &bytes, &rows, &lines, case);
    }
}

#[test]
fn tsv_and_jsonl_written_by_the_rules_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(4);
    for case in cases(150) {
        let n = 1 + rng.below(6);
        // TSV has no quoting: its fields hold no tab or line end.
        let clean = |s: String| s.replace(['\t', '\n', '\r'], "_");
        let rows: Vec<(String, String, String)> = (0..n)
            .map(|_| {
                (
                    clean(random_text(&mut rng, 8)),
                    clean(random_label(&mut rng)).trim().to_string(),
                    clean(random_text(&mut rng, 3)),
                )
            })
            .map(|(t, l, g)| (t, if l.is_empty() { "x".into() } else { l }, g))
            .collect();
        let eol = if rng.one_in(2) { "\r\n" } else { "\n" };
        let mut tsv = String::from("text\tlabel\tgroup");
        tsv.push_str(eol);
        let mut lines = Vec::new();
        for (t, l, g) in &rows {
            lines.push(tsv.matches('\n').count() as u64 + 1);
            tsv.push_str(&format!("{t}\t{l}\t{g}{eol}"));
        }
        // A line holding one empty field would read as a blank line: give the text a letter.
        let skip = rows.iter().any(|(t, _, g)| t.is_empty() && g.is_empty());
        if !skip {
            reads_back(dir.path(), "rt.tsv", tsv.as_bytes(), &rows, &lines, case);
        }

        // JSONL: any text, keys in any order, blank lines between rows, other keys nested.
        let rows = random_rows(&mut rng, n);
        let mut jsonl = String::new();
        if rng.one_in(4) {
            jsonl.push('\u{FEFF}');
        }
        let mut lines = Vec::new();
        for (t, l, g) in &rows {
            while rng.one_in(4) {
                jsonl.push_str(if rng.one_in(2) { "\n" } else { "  \r\n" });
            }
            lines.push(jsonl.matches('\n').count() as u64 + 1);
            let mut fields = [
                format!("\"text\": {}", serde_json::to_string(t).unwrap()),
                format!("\"label\" :{}", serde_json::to_string(l).unwrap()),
                format!("\"group\":{}", serde_json::to_string(g).unwrap()),
                "\"extra\": {\"text\": [1, {\"label\": null}], \"deep\": [[[[[]]]]]}".to_string(),
            ];
            let k = rng.below(fields.len());
            fields.swap(0, k);
            jsonl.push_str(&format!(
                " {{{}}}{}",
                fields.join(", "),
                if rng.one_in(2) { "\r\n" } else { "\n" }
            ));
        }
        reads_back(dir.path(), "rt.jsonl", jsonl.as_bytes(), &rows, &lines, case);
    }
}

#[test]
fn odd_data_files_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(true, false);
    let cases: &[(&str, &[u8])] = &[
        ("empty.csv", b""),
        ("bom-only.csv", b"\xEF\xBB\xBF"),
        ("nul.csv", b"\0\0\0"),
        ("header-only-crlf.csv", b"text,label\r\n"),
        ("blank-lines.csv", b"\n\n\n"),
        ("empty.tsv", b""),
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n \r\n\t\n"),
        ("bom-only.jsonl", b"\xEF\xBB\xBF"),
        ("nul.jsonl", b"\0"),
        ("number.jsonl", b"1\n"),
        ("string.jsonl", b"\"text\"\n"),
        ("null.jsonl", b"null\n"),
        ("nested-text.jsonl", b"{\"text\":{\"a\":1},\"label\":\"x\"}\n"),
        ("null-label.jsonl", b"{\"text\":\"a\",\"label\":null}\n"),
        ("huge-number.jsonl", b"{\"text\":\"a\",\"label\":1e999}\n"),
        (
            "two-objects.jsonl",
            b"{\"text\":\"a\",\"label\":\"x\"}{\"text\":\"b\",\"label\":\"y\"}\n",
        ),
        ("ragged.tsv", b"text\tlabel\na\n"),
    ];
    for (name, bytes) in cases {
        let p = write(dir.path(), name, bytes);
        let e = no_panic(|| name.to_string(), || read_classification(&p, None, &s, &[]))
            .map(|d| format!("{:?}", d.examples))
            .expect_err(name);
        assert!(e.to_string().contains(name), "{name}: {e}");
    }
    // Deep nesting in a column we do not read: serde_json's depth limit, an error, not a stack
    // overflow.
    let deep = format!(
        "{{\"text\":\"a\",\"label\":\"x\",\"o\":{}1{}}}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let p = write(dir.path(), "deep.jsonl", deep.as_bytes());
    let e = no_panic(|| "deep.jsonl".into(), || read_classification(&p, None, &s, &[])).unwrap_err();
    assert!(
        e.to_string().contains("deep.jsonl") && e.to_string().contains("line 1"),
        "{e}"
    );
    // A directory, and a missing file, whatever the extension.
    for name in ["dir.csv", "dir.jsonl", "dir"] {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let e = read_classification(&d, Some(DataFormat::Csv), &s, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains(name) && e.contains("directory"), "{e}");
        let e = read_lm_texts(std::slice::from_ref(&d)).unwrap_err().to_string();
        assert!(e.contains(name), "{e}");
    }
    let e = read_classification(&dir.path().join("none.csv"), None, &s, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("none.csv"), "{e}");
    // A very long field reads whole.
    let long = "x".repeat(3_000_000);
    let p = write(
        dir.path(),
        "long.csv",
        format!("text,label\n{long},y\n").as_bytes(),
    );
    let d = read_classification(&p, None, &s, &[]).unwrap();
    assert_eq!(d.examples[0].text.len(), long.len());
}

// ---------------------------------------------------------------------------------------------
// Label maps.
// ---------------------------------------------------------------------------------------------

/// A random JSON value shaped roughly like a label map.
fn random_label_json(rng: &mut Rng) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let key = |rng: &mut Rng| -> String {
        match rng.below(6) {
            0 => rng.below(5).to_string(),
            1 => (*rng.pick(&[
                "00",
                "+0",
                "-1",
                " 1",
                "1.0",
                "",
                "18446744073709551616",
                "4294967296",
                "LABEL_0",
                "LABEL_x",
            ]))
            .to_string(),
            2 => u64::MAX.to_string(),
            _ => rng.below(3).to_string(),
        }
    };
    let value = |rng: &mut Rng| -> Value {
        match rng.below(8) {
            0 => json!(rng.below(4)),
            1 => json!(-1),
            2 => json!(u64::MAX),
            3 => Value::Null,
            4 => json!(1.5),
            5 => json!([1]),
            _ => json!(random_text(rng, 3)),
        }
    };
    let mut root = Map::new();
    if !rng.one_in(8) {
        let mut m = Map::new();
        for _ in 0..rng.below(5) {
            m.insert(key(rng), value(rng));
        }
        root.insert(
            "id2label".into(),
            if rng.one_in(10) {
                json!([1])
            } else {
                Value::Object(m)
            },
        );
    }
    if rng.one_in(2) {
        let mut m = Map::new();
        for _ in 0..rng.below(5) {
            let k = if rng.one_in(2) {
                format!("LABEL_{}", rng.below(3))
            } else {
                random_text(rng, 2)
            };
            m.insert(k, value(rng));
        }
        root.insert("label2id".into(), Value::Object(m));
    }
    Value::Object(root)
}

#[test]
fn label_maps_from_any_json_never_panic_and_ok_ones_are_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(5);
    for case in cases(400) {
        let v = random_label_json(&mut rng);
        let r = no_panic(|| format!("case {case}: {v}"), || LabelMap::from_json(&v));
        if let Ok(m) = r {
            // What was accepted is what id2label says, in id order, and survives a round trip.
            let id2label = v["id2label"].as_object().unwrap();
            assert_eq!(m.len(), id2label.len(), "case {case}: {v}");
            for (k, l) in id2label {
                let id: u32 = k.parse().unwrap();
                assert_eq!(m.label(id), l.as_str(), "case {case}: {v}");
            }
            assert_eq!(LabelMap::from_json(&m.to_json()).unwrap(), m, "case {case}");
        }
        // The file form, mutated.
        let mut text = serde_json::to_vec(&v).unwrap();
        if rng.one_in(2) {
            text = mutate(&mut rng, &text);
        }
        let p = write(dir.path(), "labels.json", &text);
        no_panic(
            || format!("case {case} file: {}", show(&text)),
            || LabelMap::load(&p),
        )
        .ok();
    }
    // Random distinct labels round-trip through the file.
    for case in cases(100) {
        let labels: BTreeSet<String> = (0..1 + rng.below(6)).map(|_| random_text(&mut rng, 4)).collect();
        let labels: Vec<String> = labels.into_iter().collect();
        let m = LabelMap::new(labels.clone()).unwrap();
        let p = dir.path().join("rt.json");
        m.save(&p).unwrap();
        assert_eq!(LabelMap::load(&p).unwrap().labels(), &labels[..], "case {case}");
    }
    // Odd files: a directory, empty, BOM, NUL.
    let d = dir.path().join("labels-dir.json");
    std::fs::create_dir(&d).unwrap();
    assert!(LabelMap::load(&d)
        .unwrap_err()
        .to_string()
        .contains("labels-dir.json"));
    for bytes in [&b""[..], b"\xEF\xBB\xBF{}", b"\0", b"{\"id2label\":{}}"] {
        let p = write(dir.path(), "odd.json", bytes);
        let e = no_panic(|| show(bytes), || LabelMap::load(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("odd.json"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Run configs: TOML, JSON, --set.
// ---------------------------------------------------------------------------------------------

const TOML_SEED: &str = "model = \"bert\"\nmode = \"lora\"\n\n[data]\ntrain_files = [\"a.csv\", \"b.csv\"]\ntext_column = \"review\"\ndrop_labels = [\"plot\"]\nmax_length = 128\n\n[optim]\nlr = 0.001\nepochs = 2\nwarmup_ratio = 0.1\n\n[lora]\nrank = 4\n\n[spt.attention]\nk = 16\n";
const JSON_SEED: &str = "{\"model\": \"bert\", \"mode\": \"spt\", \"data\": {\"train_files\": [\"a.csv\"], \"validation_split\": 0.2}, \"optim\": {\"lr\": 1e-3, \"seed\": 7}, \"spt\": {\"ffn\": {\"blocks\": 4, \"top_k\": 1}}}";

#[test]
fn mutated_config_files_load_or_err_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(6);
    for case in cases(300) {
        let (seed, ext) = if case % 2 == 0 {
            (TOML_SEED, "toml")
        } else {
            (JSON_SEED, "json")
        };
        let bytes = mutate(&mut rng, seed.as_bytes());
        let p = write(dir.path(), &format!("c.{ext}"), &bytes);
        let what = || format!("case {case} .{ext}: {}", show(&bytes));
        for load in [FinetuneConfig::load, FinetuneConfig::load_run] {
            if let Err(e) = no_panic(what, || load(&p)) {
                let e = e.to_string();
                assert!(e.contains(&format!("c.{ext}")), "{}: {e}", what());
            }
        }
    }
    for case in cases(100) {
        let bytes = random_bytes(&mut rng, 200);
        for ext in ["toml", "json"] {
            let p = write(dir.path(), &format!("r.{ext}"), &bytes);
            no_panic(
                || format!("case {case} .{ext}: {}", show(&bytes)),
                || FinetuneConfig::load(&p),
            )
            .ok();
        }
    }
}

/// A config with random values in many settings, each within its type.
fn random_config(rng: &mut Rng) -> FinetuneConfig {
    let mut c = FinetuneConfig::default();
    let float = |rng: &mut Rng| -> f64 {
        *rng.pick(&[
            0.0,
            -0.0,
            1e-300,
            5e-324,
            1e300,
            f64::MAX,
            f64::MIN_POSITIVE,
            0.1,
            1.0 / 3.0,
            -2.5,
        ])
    };
    c.model = random_text(rng, 5);
    c.lr = float(rng);
    c.seed = rng.next_u64() >> 1; // a TOML integer is an i64
    c.epochs = rng.next_u64() >> 1;
    c.batch_size = rng.below(1 << 20);
    c.text_column = random_text(rng, 5);
    c.label_column = random_text(rng, 5);
    c.text_pair_column = rng.one_in(2).then(|| random_text(rng, 3));
    c.drop_labels = (0..rng.below(4)).map(|_| random_text(rng, 3)).collect();
    c.train_files = (0..rng.below(3))
        .map(|_| PathBuf::from(random_text(rng, 4).replace('\0', "")))
        .collect();
    c.max_length = rng.one_in(2).then(|| rng.below(100_000));
    c.warmup_ratio = float(rng);
    c.weight_decay = float(rng);
    c.attn_k = rng.one_in(2).then(|| rng.below(64));
    c.attn_k_fraction = if c.attn_k.is_none() && rng.one_in(2) {
        Some(float(rng))
    } else {
        None
    };
    c.device = random_text(rng, 3);
    c.resume = rng.one_in(3).then(|| random_text(rng, 3));
    c.modules_to_save = (0..rng.below(3)).map(|_| random_text(rng, 3)).collect();
    c
}

#[test]
fn configs_written_as_toml_or_json_read_back_equal() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(7);
    for case in cases(150) {
        let c = random_config(&mut rng);
        let toml = c.to_toml().unwrap_or_else(|e| panic!("case {case}: {e}: {c:?}"));
        let p = write(dir.path(), "rt.toml", toml.as_bytes());
        let back = no_panic(|| format!("case {case}: {toml}"), || FinetuneConfig::load_run(&p))
            .unwrap_or_else(|e| panic!("case {case}: {e}\n{toml}"));
        assert_eq!(back, c, "case {case}: {toml}");
        let json = serde_json::to_string(&c).unwrap();
        let p = write(dir.path(), "rt.json", json.as_bytes());
        let back = no_panic(|| format!("case {case}: {json}"), || FinetuneConfig::load_run(&p))
            .unwrap_or_else(|e| panic!("case {case}: {e}\n{json}"));
        assert_eq!(back, c, "case {case}: {json}");
        // And as a checkpoint manifest's `config`.
        let v = serde_json::to_value(&c).unwrap();
        let back = FinetuneConfig::from_checkpoint(Path::new("m.json"), &v).unwrap();
        assert_eq!(back, c, "case {case}");
    }
}

#[test]
fn set_overrides_of_any_text_never_panic() {
    let mut rng = Rng::new(8);
    const KEYS: &[&str] = &[
        "optim.lr",
        "lr",
        "data.max_length",
        "optim.seed",
        "spt.attention.k",
        "spt.attention.k_fraction",
        "data.drop_labels",
        "data.format",
        "lora.rank",
        "loop.progress",
        "optim.warmup_steps",
        "model",
        "spt",
        "data",
        "",
        ".",
        "spt.",
        "nope.x",
        "optim.lr.x",
    ];
    const VALUES: &[&str] = &[
        "0.001",
        "-1",
        "1e999",
        "nan",
        "inf",
        "-inf",
        "18446744073709551616",
        "9223372036854775807",
        "[1, 2]",
        "[nan]",
        "{a = 1}",
        "\"x\"",
        "'x'",
        "true",
        "",
        " ",
        "=",
        "csv",
        "[[1]]",
        "\"\\u0000\"",
        "1979-05-27",
        "[\"a\", 1]",
        "0x10",
        "1_000",
    ];
    for case in cases(400) {
        let n = 1 + rng.below(3);
        let sets: Vec<String> = (0..n)
            .map(|_| {
                let v = if rng.one_in(4) {
                    random_text(&mut rng, 4)
                } else {
                    rng.pick(VALUES).to_string()
                };
                match rng.below(8) {
                    0 => v,
                    _ => format!("{}={v}", rng.pick(KEYS)),
                }
            })
            .collect();
        let mut c = FinetuneConfig::default();
        let r = no_panic(|| format!("case {case}: {sets:?}"), || c.apply_sets(&sets));
        if r.is_ok() {
            // What was accepted survives the file round trip (no NaN slipped through JSON).
            if c.validate().is_ok() {
                let toml = c
                    .to_toml()
                    .unwrap_or_else(|e| panic!("case {case} {sets:?}: {e}"));
                let dir = tempfile::tempdir().unwrap();
                let p = write(dir.path(), "s.toml", toml.as_bytes());
                assert_eq!(FinetuneConfig::load_run(&p).unwrap(), c, "case {case}: {sets:?}");
            }
        }
    }
}

#[test]
fn odd_config_files_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[u8])] = &[
        ("empty.json", b""),
        ("nul.json", b"\0"),
        ("array.json", b"[1, 2]"),
        ("dup.json", b"{\"lr\": 1, \"lr\": 2}"),
        ("dup-nested.json", b"{\"optim\": {\"lr\": 1}, \"lr\": 2}"),
        (
            "dup-section.json",
            b"{\"optim\": {\"lr\": 1}, \"optim\": {\"epochs\": 2}}",
        ),
        ("neg.json", b"{\"epochs\": -1}"),
        ("huge.json", b"{\"seed\": 18446744073709551616}"),
        ("inf.json", b"{\"lr\": 1e999}"),
        ("str-num.json", b"{\"lr\": \"0.001\"}"),
        ("null-section.json", b"{\"optim\": null}"),
        ("nul.toml", b"model = \"a\0b\"\n"),
        ("nan.toml", b"lr = nan\n"),
        ("inf-array.toml", b"[data]\ndrop_labels = [inf]\n"),
        ("dup.toml", b"lr = 1\nlr = 2\n"),
        ("dup-section.toml", b"lr = 1.0\n[optim]\nlr = 2.0\n"),
        ("neg.toml", b"epochs = -1\n"),
        ("huge.toml", b"seed = 18446744073709551616\n"),
        ("date.toml", b"model = 1979-05-27\n"),
        ("unknown.toml", b"[spt.nope]\nk = 1\n"),
        ("wrong.txt", b"lr = 1\n"),
    ];
    for (name, bytes) in cases {
        let p = write(dir.path(), name, bytes);
        let e = no_panic(|| name.to_string(), || FinetuneConfig::load(&p))
            .map(|c| format!("{c:?}"))
            .expect_err(name);
        assert!(e.to_string().contains(name), "{name}: {e}");
    }
    let d = dir.path().join("cfg-dir.toml");
    std::fs::create_dir(&d).unwrap();
    let e = FinetuneConfig::load(&d).unwrap_err().to_string();
    assert!(e.contains("cfg-dir.toml"), "{e}");
    // Deep nesting: JSON's depth limit, an error.
    let deep = format!("{{\"model\": {}1{}}}", "[".repeat(50_000), "]".repeat(50_000));
    let p = write(dir.path(), "deep.json", deep.as_bytes());
    assert!(FinetuneConfig::load(&p).is_err());
    // CRLF line ends are no error.
    let p = write(
        dir.path(),
        "crlf.toml",
        TOML_SEED.replace('\n', "\r\n").as_bytes(),
    );
    assert_eq!(FinetuneConfig::load(&p).unwrap().lr, 0.001);
}

// ---------------------------------------------------------------------------------------------
// Checkpoints: manifests and their tensor files; model safetensors.
// ---------------------------------------------------------------------------------------------

fn small_checkpoint(dir: &Path) -> PathBuf {
    let dev = Device::Cpu;
    let mut model = BTreeMap::new();
    model.insert("w".to_string(), Tensor::new(&[1f32, 2.0, 3.0], &dev).unwrap());
    let mut optimizer = BTreeMap::new();
    optimizer.insert("w.m".to_string(), Tensor::new(&[0f32, 0.0, 0.0], &dev).unwrap());
    let data = CheckpointData {
        step: 5,
        config: serde_json::json!({"lr": 0.001}),
        model,
        optimizer,
        ..Default::default()
    };
    save_checkpoint(dir, &data, 0, &FsIo).unwrap()
}

/// Rewrites `ck`'s manifest so that its entry for `fname` matches `bytes`, and writes them.
fn put_tensor_file(ck: &Path, fname: &str, bytes: &[u8]) {
    std::fs::write(ck.join(fname), bytes).unwrap();
    let mp = ck.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
    m["files"][fname] =
        serde_json::json!({"bytes": bytes.len(), "fnv1a64": format!("{:016x}", fnv1a64(bytes))});
    std::fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
}

/// A safetensors file: the header as given, then `data`.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn mutated_manifests_load_or_err_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ck = small_checkpoint(&dir.path().join("checkpoints"));
    let good = std::fs::read(ck.join("manifest.json")).unwrap();
    assert_eq!(read_manifest(&ck).unwrap().step, 5);
    let mut rng = Rng::new(9);
    for case in cases(200) {
        let bytes = mutate(&mut rng, &good);
        std::fs::write(ck.join("manifest.json"), &bytes).unwrap();
        let what = || format!("case {case}: {}", show(&bytes));
        let r = no_panic(what, || read_manifest(&ck));
        let l = no_panic(what, || load_checkpoint(&ck, &Device::Cpu));
        if let Err(e) = &l {
            assert!(e.to_string().contains("step-00000005"), "{}: {e}", what());
        }
        // What loads is what was saved.
        if let (Ok(m), Ok(l)) = (r, l) {
            assert_eq!(l.manifest, m);
            assert_eq!(
                l.model["w"].to_vec1::<f32>().unwrap(),
                [1.0, 2.0, 3.0],
                "{}",
                what()
            );
        }
    }
}

#[test]
fn mutated_tensor_files_with_matching_checksums_load_or_err_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ck = small_checkpoint(&dir.path().join("checkpoints"));
    let good = std::fs::read(ck.join("model.safetensors")).unwrap();
    let mut rng = Rng::new(10);
    let model_file = dir.path().join("model.safetensors");
    for case in cases(250) {
        let bytes = mutate(&mut rng, &good);
        put_tensor_file(&ck, "model.safetensors", &bytes);
        let what = || format!("case {case}: {}", show(&bytes));
        no_panic(what, || load_checkpoint_weights(&ck, &Device::Cpu)).ok();
        std::fs::write(&model_file, &bytes).unwrap();
        no_panic(what, || spt_models::WeightSource::from_file(&model_file)).ok();
    }
}

/// Headers with random dtypes, shapes (zero, huge) and offsets: each loads or is an error.
#[test]
fn crafted_safetensors_headers_load_or_err_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ck = small_checkpoint(&dir.path().join("checkpoints"));
    let model_file = dir.path().join("model.safetensors");
    let mut rng = Rng::new(11);
    const DTYPES: &[&str] = &[
        "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3",
        "F8_E5M2", "F4", "F6_E2M3", "F8_E8M0", "C64", "X",
    ];
    // Huge dimensions beside a zero hold no bytes, yet their strides overflow usize.
    const DIMS: &[usize] = &[0, 1, 2, 3, 4, 7, 8, 16, 1 << 40, usize::MAX];
    for case in cases(300) {
        let dtype = rng.pick(DTYPES);
        let rank = rng.below(5);
        let shape: Vec<usize> = (0..rank).map(|_| *rng.pick(DIMS)).collect();
        let data_len = rng.below(80);
        let (a, b) = if rng.one_in(3) {
            (rng.below(data_len + 2), rng.below(data_len + 2))
        } else {
            (0, data_len)
        };
        let meta = if rng.one_in(4) {
            ",\"__metadata__\":{\"k\":\"v\"}"
        } else {
            ""
        };
        let header = format!(
            "{{\"t\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{a},{b}]}}{meta}}}"
        );
        let mut bytes = safetensors_bytes(&header, &vec![0x3Fu8; data_len]);
        if rng.one_in(4) {
            bytes = mutate(&mut rng, &bytes);
        }
        let what = || format!("case {case}: {}", show(&bytes));
        std::fs::write(&model_file, &bytes).unwrap();
        let w = no_panic(what, || spt_models::WeightSource::from_file(&model_file));
        put_tensor_file(&ck, "extra.safetensors", &bytes);
        let l = no_panic(what, || load_checkpoint(&ck, &Device::Cpu));
        if let Ok(l) = l {
            // What loads has the shape the header says.
            assert_eq!(l.extra["t"].dims(), &shape[..], "{}", what());
            assert!(w.is_ok(), "{}", what());
        }
    }
}

#[test]
fn odd_checkpoint_folders_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ck = small_checkpoint(&dir.path().join("checkpoints"));
    let mp = ck.join("manifest.json");
    let good = std::fs::read(&mp).unwrap();
    let good_v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let patched = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good_v.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("bom", [&b"\xEF\xBB\xBF"[..], &good].concat()),
        ("nul", b"\0".to_vec()),
        ("array", b"[]".to_vec()),
        ("no files", patched(&|v| v["files"] = serde_json::json!({}))),
        (
            "negative bytes",
            patched(&|v| v["files"]["model.safetensors"]["bytes"] = serde_json::json!(-1)),
        ),
        (
            "huge bytes",
            patched(&|v| v["files"]["model.safetensors"]["bytes"] = serde_json::json!(u64::MAX)),
        ),
        (
            "step too big",
            patched(&|v| v["step"] = serde_json::json!(18446744073709551616.0)),
        ),
        (
            "version 2^32+1",
            patched(&|v| v["version"] = serde_json::json!(4_294_967_297u64)),
        ),
        ("other format", patched(&|v| v["format"] = serde_json::json!("x"))),
        ("unknown key", patched(&|v| v["surprise"] = serde_json::json!(1))),
        (
            "escape in path",
            patched(&|v| {
                v["files"]["../model.safetensors"] = v["files"]["model.safetensors"].clone();
            }),
        ),
    ];
    for (name, bytes) in &cases {
        std::fs::write(&mp, bytes).unwrap();
        let e = no_panic(|| name.to_string(), || load_checkpoint(&ck, &Device::Cpu))
            .map(|l| format!("{:?}", l.manifest))
            .err()
            .map(|e| e.to_string());
        // A file listed under a name that is not a checkpoint file is ignored, not read.
        if *name == "escape in path" || *name == "unknown key" {
            continue;
        }
        let e = e.unwrap_or_else(|| panic!("{name}: loaded"));
        assert!(e.contains("step-00000005"), "{name}: {e}");
    }
    std::fs::write(&mp, &good).unwrap();
    // manifest.json a directory; the checkpoint a file; missing.
    std::fs::remove_file(&mp).unwrap();
    std::fs::create_dir(&mp).unwrap();
    let e = read_manifest(&ck).unwrap_err().to_string();
    assert!(e.contains("step-00000005"), "{e}");
    let f = write(dir.path(), "file-not-dir", b"x");
    assert!(read_manifest(&f).is_err());
    assert!(read_manifest(&dir.path().join("missing")).is_err());
}

// ---------------------------------------------------------------------------------------------
// Tokenizers.
// ---------------------------------------------------------------------------------------------

/// A WordPiece tokenizer.json like MiniLM's. `decoder`: whether it has one (the tokenizers
/// library panics on a malformed decoder value, which the loader catches).
fn tiny_bert_json(decoder: bool) -> String {
    let vocab = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "man", "is", "play", "##ing", "the", "movie",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), serde_json::json!(i)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0},
        "padding": null,
        "added_tokens": [],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": if decoder { serde_json::json!({"type": "WordPiece", "prefix": "##", "cleanup": true}) } else { serde_json::Value::Null },
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab}
    })
    .to_string()
}

/// Encodes a few awkward texts with a tokenizer that loaded: each is Ok or Err, and an Ok one
/// fits max_length.
fn exercise(t: &TextTokenizer, rng: &mut Rng, what: &str) {
    for _ in 0..4 {
        let text = random_text(rng, 12);
        let pair = rng.one_in(2).then(|| random_text(rng, 6));
        if let Ok(e) = no_panic(
            || format!("{what}: encode {text:?} / {pair:?}"),
            || t.encode(&text, pair.as_deref(), "x:1"),
        ) {
            assert!(
                e.ids.len() <= t.max_length(),
                "{what}: {} ids > {}",
                e.ids.len(),
                t.max_length()
            );
            assert_eq!(e.ids.len(), e.type_ids.len(), "{what}");
            let ids = e.ids.clone();
            no_panic(
                || format!("{what}: decode {ids:?}"),
                || t.decode(&ids, rng.one_in(2)),
            )
            .ok();
        }
        no_panic(|| format!("{what}: encode_raw {text:?}"), || t.encode_raw(&text)).ok();
    }
    // Ids the vocabulary does not have.
    no_panic(
        || format!("{what}: decode unknown ids"),
        || t.decode(&[u32::MAX, 0, 12345], false),
    )
    .ok();
}

#[test]
fn mutated_tokenizer_files_load_or_err_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "tokenizer.json", tiny_bert_json(true).as_bytes());
    let t = TextTokenizer::from_file(&p, 16).unwrap();
    assert_eq!(
        t.encode("A man is playing", None, "x").unwrap().ids,
        [2, 4, 5, 6, 7, 8, 3]
    );
    assert_eq!(t.decode(&[4, 5, 7, 8], false).unwrap(), "a man playing");
    // Mutants of files with and without a decoder (the library panics on a malformed one).
    let (with, without) = (tiny_bert_json(true), tiny_bert_json(false));
    let mut rng = Rng::new(12);
    for case in cases(120) {
        let good = if rng.one_in(2) { &with } else { &without };
        let bytes = mutate(&mut rng, good.as_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let max = *rng.pick(&[0, 1, 2, 3, 4, 16, usize::MAX]);
        let what = format!("case {case} max_length {max}: {}", show(&bytes));
        if let Ok(t) = no_panic(|| what.clone(), || TextTokenizer::from_file(&p, max)) {
            exercise(&t, &mut rng, &what);
        }
    }
}

#[test]
fn random_vocab_files_load_or_err_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(13);
    let vocab_txt = dir.path().join("vocab.txt");
    let vocab_json = dir.path().join("vocab.json");
    let merges = dir.path().join("merges.txt");
    for case in cases(100) {
        // vocab.txt: one token a line, some specials, some odd lines.
        let mut lines: Vec<String> = vec!["[PAD]".into(), "[UNK]".into(), "[CLS]".into(), "[SEP]".into()];
        lines.retain(|_| !rng.one_in(6));
        for _ in 0..rng.below(8) {
            lines.push(random_text(&mut rng, 3));
        }
        let mut txt = lines.join(if rng.one_in(2) { "\n" } else { "\r\n" }).into_bytes();
        if rng.one_in(3) {
            txt = mutate(&mut rng, &txt);
        }
        std::fs::write(&vocab_txt, &txt).unwrap();
        let max = *rng.pick(&[2, 3, 4, 8, 64]);
        let what = format!("case {case} vocab.txt: {}", show(&txt));
        if let Ok(t) = no_panic(
            || what.clone(),
            || TextTokenizer::bert_from_vocab_txt(&vocab_txt, max),
        ) {
            exercise(&t, &mut rng, &what);
        }
        // vocab.json + merges.txt.
        let mut vocab = serde_json::Map::new();
        for (i, tok) in ["H", "e", "l", "o", "Ġ", "w", "He", "ll", "<|endoftext|>"]
            .iter()
            .enumerate()
        {
            if !rng.one_in(6) {
                let id = if rng.one_in(8) {
                    serde_json::json!(u32::MAX)
                } else {
                    serde_json::json!(i)
                };
                vocab.insert(tok.to_string(), id);
            }
        }
        let mut vj = serde_json::to_vec(&vocab).unwrap();
        let mut mt = b"#version: 0.2\nH e\nl l\nHe ll\n".to_vec();
        match rng.below(4) {
            0 => vj = mutate(&mut rng, &vj),
            1 => mt = mutate(&mut rng, &mt),
            _ => {}
        }
        std::fs::write(&vocab_json, &vj).unwrap();
        std::fs::write(&merges, &mt).unwrap();
        let what = format!("case {case} vocab.json {} merges {}", show(&vj), show(&mt));
        if let Ok(t) = no_panic(
            || what.clone(),
            || TextTokenizer::gpt2_from_vocab_merges(&vocab_json, &merges, 16),
        ) {
            exercise(&t, &mut rng, &what);
        }
        no_panic(|| what.clone(), || TextTokenizer::from_model_dir(dir.path(), 16)).ok();
    }
    // Odd paths: a directory as the file, an empty file, a missing folder.
    let d = dir.path().join("tok-dir.json");
    std::fs::create_dir(&d).unwrap();
    assert!(TextTokenizer::from_file(&d, 8).is_err());
    let e = write(dir.path(), "empty.json", b"");
    assert!(TextTokenizer::from_file(&e, 8).is_err());
    assert!(TextTokenizer::from_model_dir(&dir.path().join("missing"), 8).is_err());
}

/// Was a defect: a tokenizer.json cut short (or otherwise malformed) inside its `decoder` value
/// panics instead of erring. Cause: TextTokenizer::from_file (src/data/tokenize.rs:131) calls
/// tokenizers' Tokenizer::from_file unguarded, whose decoder deserializer does
/// `.expect("Helper")` (tokenizers-0.23.2 src/decoders/mod.rs:90).
#[test]
fn regression_tokenizer_json_malformed_inside_decoder_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // What an interrupted download of a real tokenizer.json looks like, and the minimal form.
    let full = tiny_bert_json(true);
    let cut = &full[..full.find("\"decoder\"").unwrap() + 20];
    for bytes in [cut.as_bytes(), b"{\"decoder\":["] {
        let p = write(dir.path(), "tokenizer.json", bytes);
        let r = no_panic(|| show(bytes), || TextTokenizer::from_file(&p, 8).map(|_| ()));
        let e = r.unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}

/// Was a defect: a post_processor template naming a special token it does not define loaded,
/// and the first encode panicked ("no entry found for key", tokenizers' template.rs) on the
/// first row. Found by the mutation test above; the loader now tries both templates once.
#[test]
fn regression_template_with_an_undefined_special_token_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&tiny_bert_json(true)).unwrap();
    v["post_processor"]["special_tokens"]
        .as_object_mut()
        .unwrap()
        .remove("[SEP]");
    let bytes = v.to_string();
    let p = write(dir.path(), "tokenizer.json", bytes.as_bytes());
    let r = no_panic(
        || show(bytes.as_bytes()),
        || TextTokenizer::from_file(&p, 8).map(|_| ()),
    );
    let e = r.unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("cannot encode"), "{e}");
}

/// A template whose pair form alone is broken loads (single texts work), and a pair is an error
/// naming the tokenizer, not a panic.
#[test]
fn a_broken_pair_template_fails_only_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&tiny_bert_json(true)).unwrap();
    v["post_processor"]["pair"][3] = serde_json::json!({"SpecialToken": {"id": "[MISSING]", "type_id": 1}});
    let bytes = v.to_string();
    let p = write(dir.path(), "tokenizer.json", bytes.as_bytes());
    let t = TextTokenizer::from_file(&p, 8).unwrap();
    t.encode("a man", None, "row 1").unwrap();
    let r = no_panic(
        || show(bytes.as_bytes()),
        || t.encode("a man", Some("the movie"), "row 1"),
    );
    let e = r.unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("cannot encode"), "{e}");
}

/// Was a defect: a merges.txt line whose merged token is longer than every vocab.json token
/// panics ("range end index 2 out of range for slice of length 1") instead of erring that the
/// merge is not in the vocabulary. Cause: TextTokenizer::gpt2_from_vocab_merges
/// (src/data/tokenize.rs:148) calls BpeBuilder::build unguarded, which copies the merge into a
/// buffer sized to the longest token (tokenizers-0.23.2 src/models/bpe/model.rs:251, 264-267).
#[test]
fn regression_bpe_merge_longer_than_every_token_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let v = write(dir.path(), "vocab.json", b"{\"a\":0,\"b\":1}");
    let m = write(dir.path(), "merges.txt", b"#version: 0.2\na b\n");
    let r = no_panic(
        || "vocab {a, b}, merge `a b`".into(),
        || TextTokenizer::gpt2_from_vocab_merges(&v, &m, 8).map(|_| ()),
    );
    assert!(r.unwrap_err().to_string().contains("vocab.json"));
    // From the model folder too.
    let r = no_panic(
        || "from_model_dir".into(),
        || TextTokenizer::from_model_dir(dir.path(), 8).map(|_| ()),
    );
    assert!(r.is_err());
}

/// Was a defect (debug and test builds, which check overflow): a safetensors tensor of shape
/// [0, 2^40, 2^40] (no bytes, so the header is valid) panics with "attempt to multiply with
/// overflow" instead of erring; in a release build the strides wrap silently. Cause: candle's
/// Shape::stride_contiguous (candle-core-0.11.1 src/shape.rs:144) on the shape safetensors
/// accepted, reached unguarded from load_checkpoint (src/checkpoint.rs:665 at HEAD, its
/// `load_buffer` call) and, for a model
/// file, WeightSource::from_file (crates/spt-models/src/weights.rs:125).
#[test]
fn regression_safetensors_zero_sized_tensor_with_huge_dims_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let big: u64 = 1 << 40;
    let header = format!("{{\"t\":{{\"dtype\":\"F32\",\"shape\":[0,{big},{big}],\"data_offsets\":[0,0]}}}}");
    let bytes = safetensors_bytes(&header, b"");
    let f = write(dir.path(), "model.safetensors", &bytes);
    let r = no_panic(
        || show(&bytes),
        || spt_models::WeightSource::from_file(&f).map(|_| ()),
    );
    assert!(r.unwrap_err().to_string().contains("model.safetensors"));
    let ck = small_checkpoint(&dir.path().join("checkpoints"));
    put_tensor_file(&ck, "extra.safetensors", &bytes);
    let r = no_panic(|| show(&bytes), || load_checkpoint(&ck, &Device::Cpu).map(|_| ()));
    assert!(r.unwrap_err().to_string().contains("extra.safetensors"));
}

/// Was a defect: a JSON config saved with a UTF-8 byte-order mark (Notepad, PowerShell) is refused
/// as "expected value at line 1 column 1", which names neither the mark nor a fix, while the same
/// settings as TOML with a mark load (and JSONL data strips it). Cause: read_table parses the
/// text as read (src/config/mod.rs:370).
#[test]
fn regression_json_config_with_a_byte_order_mark_loads_like_toml() {
    let dir = tempfile::tempdir().unwrap();
    let t = write(dir.path(), "bom.toml", b"\xEF\xBB\xBFlr = 0.5\n");
    assert_eq!(FinetuneConfig::load(&t).unwrap().lr, 0.5);
    let j = write(dir.path(), "bom.json", b"\xEF\xBB\xBF{\"lr\": 0.5}");
    let r = FinetuneConfig::load(&j).map(|c| c.lr).map_err(|e| e.to_string());
    assert_eq!(r, Ok(0.5));
}

/// Was a defect: the same for a label map (`label_map = "labels.json"`): "expected value at line 1
/// column 1". Cause: LabelMap::load parses the text as read (src/data/read.rs:713-714).
#[test]
fn regression_label_map_with_a_byte_order_mark_loads() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "labels.json",
        b"\xEF\xBB\xBF{\"id2label\": {\"0\": \"neg\", \"1\": \"pos\"}}",
    );
    let r = LabelMap::load(&p)
        .map(|m| m.labels().to_vec())
        .map_err(|e| e.to_string());
    assert_eq!(r, Ok(vec!["neg".to_string(), "pos".to_string()]));
}

/// Was a defect: id2label and label2id that contradict each other are accepted when the labels
/// happen to be named `LABEL_n`: {"0": "LABEL_1", "1": "LABEL_0"} against {"LABEL_0": 0,
/// "LABEL_1": 1} reads as id 0 = LABEL_1, silently, though a contradiction is otherwise refused.
/// Cause: label2id is skipped as HF placeholders whenever its keys are all `LABEL_n`, even when
/// they are id2label's own labels (src/data/read.rs:681-690).
#[test]
fn regression_label_map_contradiction_between_label_n_names_is_refused() {
    let v = serde_json::json!({"id2label": {"0": "LABEL_1", "1": "LABEL_0"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1}});
    let r = LabelMap::from_json(&v).map(|m| m.labels().to_vec());
    assert!(r.is_err(), "accepted: {r:?}");
    // HF's placeholders beside a class renamed in id2label alone are no contradiction.
    let v = serde_json::json!({"id2label": {"0": "neg", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1}});
    let m = LabelMap::from_json(&v).unwrap();
    assert_eq!(m.labels(), ["neg", "LABEL_1"]);
}

/// Was a defect: in a CSV or TSV whose lines end `\r\r\n` (what Python's csv module writes on
/// Windows to a file opened without `newline=''`), every row was numbered too early, the first
/// data row as line 1, the header's. Cause: the csv reader ends the record at the first `\r` and
/// starts the next at the second. An editor shows such a file with a blank line after each row
/// (`\r`, then `\r\n`): the blank label is on line 5.
#[test]
fn regression_csv_rows_after_cr_cr_lf_are_numbered_right() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "w.csv", b"text,label\r\r\nok,x\r\r\nbad, \r\r\n");
    let e = read_classification(&p, None, &spec(true, false), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 5"), "{e}");
    let p = write(dir.path(), "w.tsv", b"text\tlabel\r\r\nok\tx\r\r\n");
    let d = read_classification(&p, None, &spec(true, false), &[]).unwrap();
    assert_eq!(d.examples[0].line, 3);
}

/// Was a defect: a CSV whose lines end in `\r` alone (old Mac) was read row by row, but every
/// error was reported at line 1.
#[test]
fn regression_cr_only_rows_are_numbered() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "mac.csv", b"text,label\rok,x\rfine,y\rbad, \r");
    let e = read_classification(&p, None, &spec(true, false), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 4"), "{e}");
    // A quote never closed in such a file is found as in a `\n` file (it spanned `\r` lines
    // only, so the check for it did not run: the rest of the file became one text).
    let p = write(dir.path(), "mac.csv", b"text\rok\r\"open\rmore\rrows\r");
    let e = read_classification(&p, None, &spec(false, false), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 3") && e.contains("never closed"), "{e}");
}

/// Was a defect: in a file whose lines end both ways (`\r` lines pasted into a Unix or Windows
/// file), only the `\n`s were counted, so rows after a lone `\r` were named lines too early.
#[test]
fn regression_mixed_line_ends_are_numbered_as_editors_do() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "mixed.csv",
        b"text,label\rok,x\nfine,y\r\nsame,z\rbad, \n",
    );
    let e = read_classification(&p, None, &spec(true, false), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 5"), "{e}");
    let p = write(dir.path(), "mixed.csv", b"text,label\rok,x\n\nfine,y\r\nlast,z\r");
    let d = read_classification(&p, None, &spec(true, false), &[]).unwrap();
    let lines: Vec<_> = d.examples.iter().map(|e| e.line).collect();
    assert_eq!(lines, [2, 4, 5]);
}

/// Was a defect: a blank line in merges.txt (a trailing one too) got the tokenizers library's
/// "invalid at line N", one line off; a byte-order mark in vocab.txt, vocab.json or merges.txt
/// (which the library reads itself) was taken as part of the first token.
#[test]
fn regression_vocab_files_with_blank_lines_or_a_mark_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let v = write(dir.path(), "vocab.json", br#"{"a":0,"b":1,"ab":2}"#);
    for (merges, line) in [
        (&b"#version: 0.2\n\na b\n"[..], "line 2"),
        (b"#version: 0.2\na b\n\n", "line 3"),
    ] {
        let m = write(dir.path(), "merges.txt", merges);
        let e = TextTokenizer::gpt2_from_vocab_merges(&v, &m, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains(line) && e.contains("empty"), "{e}");
    }
    let m = write(dir.path(), "merges.txt", b"\xEF\xBB\xBF#version: 0.2\na b\n");
    let e = TextTokenizer::gpt2_from_vocab_merges(&v, &m, 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("byte-order mark") && e.contains("merges.txt"), "{e}");
    let t = write(
        dir.path(),
        "vocab.txt",
        b"\xEF\xBB\xBF[PAD]\n[UNK]\n[CLS]\n[SEP]\na\n",
    );
    let e = TextTokenizer::bert_from_vocab_txt(&t, 8).unwrap_err().to_string();
    assert!(e.contains("byte-order mark") && e.contains("vocab.txt"), "{e}");
    // tokenizer.json, which spt-train reads itself, loads with one.
    let j = write(
        dir.path(),
        "tokenizer.json",
        &[&b"\xEF\xBB\xBF"[..], tiny_bert_json(true).as_bytes()].concat(),
    );
    TextTokenizer::from_file(&j, 8).unwrap();
}
