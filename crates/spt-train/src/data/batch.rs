//! Encoded datasets, LM packing, length-bucketed batch order and batch tensors.

use std::path::PathBuf;

use candle_core::{Device, Tensor};

use super::read::{ClassificationData, LabelMap};
use super::tokenize::TextTokenizer;
use super::{DataError, TaskKind};
use crate::rng::SplitMix64;

/// One tokenised example. `label` is the class id for classification and `None` for LM blocks
/// (whose labels are their own input ids).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedItem {
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    pub label: Option<u32>,
}

/// A tokenised dataset, ready to batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedDataset {
    pub task: TaskKind,
    pub items: Vec<EncodedItem>,
    pub pad_id: u32,
}

/// Which rows a dataset holds: their count and an FNV-1a-64 checksum of their contents, in order.
/// [`EncodedDataset::fingerprint`] reads the rows as the model sees them (a resume on changed
/// training rows is noticed by it); [`raw_rows_fingerprint`] reads a classification file's rows
/// before tokenising (the held-out rows `eval --split validation` must find again, whatever its
/// `--max-length`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataFingerprint {
    pub rows: usize,
    pub fnv1a64: String,
}

/// See [`DataFingerprint`]: every row's text, second text and label, in order.
pub fn raw_rows_fingerprint(parts: &[ClassificationData]) -> DataFingerprint {
    use crate::checkpoint::{fnv1a64_extend, FNV_OFFSET};
    let field = |h: u64, f: Option<&str>| match f {
        Some(t) => fnv1a64_extend(fnv1a64_extend(h, &(t.len() as u64).to_le_bytes()), t.as_bytes()),
        None => fnv1a64_extend(h, &u64::MAX.to_le_bytes()),
    };
    let (mut h, mut rows) = (FNV_OFFSET, 0);
    for e in parts.iter().flat_map(|p| &p.examples) {
        h = field(h, Some(&e.text));
        h = field(h, e.text_pair.as_deref());
        h = field(h, e.label.as_deref());
        rows += 1;
    }
    DataFingerprint {
        rows,
        fnv1a64: format!("{h:016x}"),
    }
}

impl EncodedDataset {
    /// See [`DataFingerprint`].
    pub fn fingerprint(&self) -> DataFingerprint {
        use crate::checkpoint::{fnv1a64_extend, FNV_OFFSET};
        let mut h = FNV_OFFSET;
        let words = |h: u64, v: &[u32]| {
            let h = fnv1a64_extend(h, &(v.len() as u64).to_le_bytes());
            v.iter().fold(h, |h, x| fnv1a64_extend(h, &x.to_le_bytes()))
        };
        for it in &self.items {
            h = words(h, &it.input_ids);
            h = words(h, &it.token_type_ids);
            h = fnv1a64_extend(h, &it.label.map_or(u64::MAX, u64::from).to_le_bytes());
        }
        DataFingerprint {
            rows: self.items.len(),
            fnv1a64: format!("{h:016x}"),
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn lengths(&self) -> Vec<usize> {
        self.items.iter().map(|i| i.input_ids.len()).collect()
    }

    /// The batch of the items at `indices`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<Batch, DataError> {
        let mut items = Vec::with_capacity(indices.len());
        for &i in indices {
            items.push(self.items.get(i).ok_or_else(|| {
                DataError::Invalid(format!(
                    "batch index {i} is out of range for {} items",
                    self.items.len()
                ))
            })?);
        }
        make_batch(&items, self.pad_id, self.task, device)
    }
}

/// Tokenises classification rows and maps labels to ids. A label missing from `labels` is an
/// error naming the file, line and label column.
pub fn encode_classification(
    data: &ClassificationData,
    tok: &TextTokenizer,
    labels: &LabelMap,
) -> Result<EncodedDataset, DataError> {
    let label_col = data.columns.label.as_deref();
    let mut items = Vec::with_capacity(data.examples.len());
    for ex in &data.examples {
        let location = format!("{}:{}", data.path.display(), ex.line);
        let label = match (&ex.label, label_col) {
            (Some(l), Some(col)) => Some(labels.id(l).ok_or_else(|| DataError::UnknownLabel {
                path: data.path.clone(),
                line: ex.line,
                column: col.to_string(),
                label: escape_controls(l),
                known: known_labels(labels.labels()),
            })?),
            _ => None,
        };
        let enc = tok.encode(&ex.text, ex.text_pair.as_deref(), &location)?;
        items.push(EncodedItem {
            input_ids: enc.ids,
            token_type_ids: enc.type_ids,
            label,
        });
    }
    Ok(EncodedDataset {
        task: TaskKind::Classify,
        items,
        pad_id: tok.pad_id(),
    })
}

/// Tokenises LM text files (lines keep their `\n`; an end-of-text token, if the vocabulary has
/// one, separates files) and packs the stream into blocks of exactly `block_size` tokens,
/// dropping the remainder.
pub fn pack_lm(
    files: &[(PathBuf, Vec<(u64, String)>)],
    tok: &TextTokenizer,
    block_size: usize,
) -> Result<EncodedDataset, DataError> {
    if block_size < 2 {
        return Err(DataError::Invalid(format!(
            "block_size must be at least 2, got {block_size}"
        )));
    }
    let mut stream: Vec<u32> = Vec::new();
    for (i, (_, lines)) in files.iter().enumerate() {
        if i > 0 {
            if let Some(eos) = tok.eos_id() {
                stream.push(eos);
            }
        }
        let n = lines.len();
        let texts: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(j, (_, l))| if j + 1 < n { format!("{l}\n") } else { l.clone() })
            .filter(|l| !l.is_empty())
            .collect();
        for ids in tok.encode_raw_batch(texts)? {
            stream.extend(ids);
        }
    }
    if stream.len() < block_size {
        let names: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
        return Err(DataError::Invalid(format!(
            "{}: only {} tokens, fewer than block_size {block_size}",
            names.join(", "),
            stream.len()
        )));
    }
    tracing::info!(
        "{} tokens packed into {} blocks of {block_size}; the last {} (less than a block) are not used",
        stream.len(),
        stream.len() / block_size,
        stream.len() % block_size
    );
    let items = stream
        .chunks_exact(block_size)
        .map(|c| EncodedItem {
            input_ids: c.to_vec(),
            token_type_ids: vec![0; block_size],
            label: None,
        })
        .collect();
    Ok(EncodedDataset {
        task: TaskKind::Lm,
        items,
        pad_id: tok.pad_id(),
    })
}

/// A padded batch on a device. All tensors are `u32`.
///
/// - `input_ids`, `attention_mask` (1 = token, 0 = padding), `token_type_ids`: `[B, L]` with L the
///   longest item in the batch (dynamic padding with the tokenizer's pad id, on the right).
/// - `labels`: `[B]` class ids (classification) or `[B, L]` = `input_ids` (LM; the model shifts
///   them and masks padding with `attention_mask`, as candle's cross-entropy has no ignore index).
#[derive(Clone, Debug)]
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub token_type_ids: Tensor,
    pub labels: Tensor,
    pub task: TaskKind,
    /// Real (non-padding) tokens in the batch.
    pub n_tokens: usize,
    /// Number of examples.
    pub size: usize,
}

/// Pads `items` to their longest and builds the tensors.
pub fn make_batch(
    items: &[&EncodedItem],
    pad_id: u32,
    task: TaskKind,
    device: &Device,
) -> Result<Batch, DataError> {
    if items.is_empty() {
        return Err(DataError::ZeroBatchSize);
    }
    let b = items.len();
    let l = items.iter().map(|i| i.input_ids.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![pad_id; b * l];
    let mut mask = vec![0u32; b * l];
    let mut types = vec![0u32; b * l];
    let mut n_tokens = 0;
    let mut class_labels = Vec::with_capacity(b);
    for (r, it) in items.iter().enumerate() {
        let n = it.input_ids.len();
        n_tokens += n;
        ids[r * l..r * l + n].copy_from_slice(&it.input_ids);
        mask[r * l..r * l + n].fill(1);
        // One type per token, or none (all 0); any other length was cut or padded silently.
        let nt = it.token_type_ids.len();
        if nt != n && nt != 0 {
            return Err(DataError::Invalid(format!(
                "batch example {r}: {nt} token_type_ids for {n} input_ids; give one per token, or none"
            )));
        }
        types[r * l..r * l + nt].copy_from_slice(&it.token_type_ids);
        if task == TaskKind::Classify {
            class_labels.push(it.label.ok_or_else(|| {
                DataError::Invalid(format!(
                    "batch example {r} has no label; a classification batch needs one on every example"
                ))
            })?);
        }
    }
    let input_ids = Tensor::from_vec(ids, (b, l), device)?;
    let labels = match task {
        TaskKind::Classify => Tensor::from_vec(class_labels, b, device)?,
        TaskKind::Lm => input_ids.clone(),
    };
    Ok(Batch {
        attention_mask: Tensor::from_vec(mask, (b, l), device)?,
        token_type_ids: Tensor::from_vec(types, (b, l), device)?,
        input_ids,
        labels,
        task,
        n_tokens,
        size: b,
    })
}

/// How [`epoch_batches`] orders a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchOrder {
    /// Seeded shuffle (training); otherwise file order (evaluation).
    pub shuffle: bool,
    /// Group similar lengths: sort within windows of `bucket_batches` batches, so padding is
    /// small; then (when shuffling) shuffle the batches. 0 or 1 disables bucketing.
    pub bucket_batches: usize,
}

impl BatchOrder {
    pub const TRAIN: BatchOrder = BatchOrder {
        shuffle: true,
        bucket_batches: 50,
    };
    pub const EVAL: BatchOrder = BatchOrder {
        shuffle: false,
        bucket_batches: usize::MAX,
    };
}

/// The batches (lists of item indices) of one epoch: a pure function of the lengths, the batch
/// size, `seed` and `epoch`, so a resumed run recomputes exactly the same order. The last batch
/// may be smaller.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
    order: BatchOrder,
) -> Result<Vec<Vec<usize>>, DataError> {
    if batch_size == 0 {
        return Err(DataError::ZeroBatchSize);
    }
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    let mut rng = SplitMix64::derive(seed, epoch.wrapping_add(1));
    if order.shuffle {
        rng.shuffle(&mut idx);
    }
    if order.bucket_batches > 1 {
        let window = batch_size.saturating_mul(order.bucket_batches);
        for w in idx.chunks_mut(window) {
            w.sort_by_key(|&i| lengths[i]); // stable: ties keep the shuffled order
        }
    }
    let mut batches: Vec<Vec<usize>> = idx.chunks(batch_size).map(|c| c.to_vec()).collect();
    if order.shuffle && order.bucket_batches > 1 {
        rng.shuffle(&mut batches);
    }
    Ok(batches)
}

/// `s` with its control characters (a NUL, a newline) escaped, for an error message.
fn escape_controls(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            esc
        })
        .collect()
}

/// The labels a mapping knows, for an error: the first 20, control characters escaped (a label
/// column that holds texts would otherwise print them all).
fn known_labels<S: AsRef<str>>(labels: &[S]) -> String {
    const SHOWN: usize = 20;
    let mut s: Vec<String> = labels
        .iter()
        .take(SHOWN)
        .map(|l| escape_controls(&l.as_ref().chars().take(60).collect::<String>()))
        .collect();
    if labels.len() > SHOWN {
        s.push(format!("… and {} more", labels.len() - SHOWN));
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    /// An unknown label's error lists at most 20 known ones, each cut to 60 characters, with
    /// control characters escaped.
    #[test]
    fn known_labels_are_listed_briefly() {
        assert_eq!(super::known_labels(&["fresh\0", "don't"]), "fresh\\u{0}, don't");
        let many: Vec<String> = (0..25).map(|i| format!("{i} {}", "x".repeat(100))).collect();
        let s = super::known_labels(&many);
        assert!(s.ends_with("… and 5 more") && s.len() < 20 * 64 + 20, "{s}");
    }

    use super::super::read::{ColumnSpec, RawExample};
    use super::super::tokenize::tests::{tiny_bert, tiny_gpt2};
    use super::*;

    #[test]
    fn batches_pad_dynamically() {
        let items = [
            EncodedItem {
                input_ids: vec![2, 5, 3],
                token_type_ids: vec![0, 0, 0],
                label: Some(1),
            },
            EncodedItem {
                input_ids: vec![2, 5, 6, 7, 3],
                token_type_ids: vec![0, 0, 0, 1, 1],
                label: Some(0),
            },
        ];
        let refs: Vec<&EncodedItem> = items.iter().collect();
        let b = make_batch(&refs, 0, TaskKind::Classify, &Device::Cpu).unwrap();
        assert_eq!(b.input_ids.dims(), &[2, 5]);
        assert_eq!(
            b.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![2, 5, 3, 0, 0], vec![2, 5, 6, 7, 3]]
        );
        assert_eq!(
            b.attention_mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1, 0, 0], vec![1; 5]]
        );
        assert_eq!(b.token_type_ids.to_vec2::<u32>().unwrap()[1], vec![0, 0, 0, 1, 1]);
        // Types of another length than the ids are named (they were cut or padded silently);
        // none at all means all 0.
        let mut odd = items.clone();
        odd[1].token_type_ids.pop();
        let refs: Vec<&EncodedItem> = odd.iter().collect();
        let e = make_batch(&refs, 0, TaskKind::Classify, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("example 1") && e.contains("4 token_type_ids for 5 input_ids"),
            "{e}"
        );
        odd[1].token_type_ids.clear();
        let refs: Vec<&EncodedItem> = odd.iter().collect();
        let b = make_batch(&refs, 0, TaskKind::Classify, &Device::Cpu).unwrap();
        assert_eq!(b.token_type_ids.to_vec2::<u32>().unwrap()[1], vec![0; 5]);
        assert_eq!(b.labels.to_vec1::<u32>().unwrap(), vec![1, 0]);
        assert_eq!((b.n_tokens, b.size), (8, 2));
        assert!(matches!(
            make_batch(&[], 0, TaskKind::Classify, &Device::Cpu),
            Err(DataError::ZeroBatchSize)
        ));
    }

    #[test]
    fn bucketed_order_is_seeded_complete_and_groups_lengths() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 7919) % 97 + 1).collect();
        let order = BatchOrder {
            shuffle: true,
            bucket_batches: 10,
        };
        let a = epoch_batches(&lengths, 8, 3, 0, order).unwrap();
        assert_eq!(a, epoch_batches(&lengths, 8, 3, 0, order).unwrap());
        assert_ne!(a, epoch_batches(&lengths, 8, 3, 1, order).unwrap());
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        // Padding waste with buckets is far below that of a plain shuffle.
        let waste = |bs: &[Vec<usize>]| -> usize {
            bs.iter()
                .map(|b| {
                    let m = b.iter().map(|&i| lengths[i]).max().unwrap();
                    b.iter().map(|&i| m - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let plain = epoch_batches(
            &lengths,
            8,
            3,
            0,
            BatchOrder {
                shuffle: true,
                bucket_batches: 0,
            },
        )
        .unwrap();
        assert!(
            waste(&a) * 5 < waste(&plain),
            "{} vs {}",
            waste(&a),
            waste(&plain)
        );
        assert!(matches!(
            epoch_batches(&lengths, 0, 3, 0, order),
            Err(DataError::ZeroBatchSize)
        ));
        let eval = epoch_batches(&[3, 1, 2], 2, 0, 0, BatchOrder::EVAL).unwrap();
        assert_eq!(eval, vec![vec![1, 2], vec![0]]);
    }

    #[test]
    fn unknown_label_names_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tiny_bert(dir.path(), 16);
        let spec = ColumnSpec {
            label: Some("category".into()),
            ..Default::default()
        };
        let ex = |t: &str, l: &str, line| RawExample {
            text: t.into(),
            text_pair: None,
            label: Some(l.into()),
            group: None,
            line,
        };
        let data = ClassificationData {
            path: "valid.csv".into(),
            columns: spec,
            examples: vec![ex("great fun", "fresh", 2), ex("dull", "mixed", 3)],
        };
        let labels = LabelMap::new(vec!["fresh".into(), "rotten".into()]).unwrap();
        let e = encode_classification(&data, &tok, &labels)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("valid.csv")
                && e.contains("line 3")
                && e.contains("`category`")
                && e.contains("`mixed`"),
            "{e}"
        );
        let ok = ClassificationData {
            examples: data.examples[..1].to_vec(),
            ..data
        };
        let d = encode_classification(&ok, &tok, &labels).unwrap();
        assert_eq!(d.items[0].input_ids, vec![2, 14, 17, 3]);
        assert_eq!(d.items[0].label, Some(0));
    }

    #[test]
    fn lm_packing_into_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tiny_gpt2(dir.path());
        let files = vec![
            (
                "a.txt".into(),
                vec![(1, "Hello world".to_string()), (2, "Hello".to_string())],
            ),
            ("b.txt".into(), vec![(1, "Hello, world".to_string())]),
        ];
        // a.txt: Hello Ġworld Ċ | Hello; <|endoftext|>; b.txt: Hello , Ġworld
        let d = pack_lm(&files, &tok, 2).unwrap();
        let blocks: Vec<Vec<u32>> = d.items.iter().map(|i| i.input_ids.clone()).collect();
        assert_eq!(
            blocks,
            vec![vec![12, 17], vec![19, 12], vec![18, 12], vec![8, 17]]
        );
        assert!(d.items.iter().all(|i| i.label.is_none()));
        let d3 = pack_lm(&files, &tok, 3).unwrap();
        assert_eq!(d3.items.len(), 2); // 8 tokens: two blocks of 3, remainder dropped
        let b = d.batch(&[0, 1], &Device::Cpu).unwrap();
        assert_eq!(
            b.labels.to_vec2::<u32>().unwrap(),
            b.input_ids.to_vec2::<u32>().unwrap()
        );
        assert!(pack_lm(&files, &tok, 100).is_err());
    }
}
