//! Checks against the real assets fetched by the assets script (ignored by default: run with
//! `cargo test -p spt-train --test assets -- --ignored`). The assets are looked up under
//! `$SPT_ASSETS_DIR`, else the workspace root (`third_party/…`, `data/…`).

use std::path::PathBuf;

use spt_train::data::{read_classification, split_train_validation, ColumnSpec, LabelMap, TextTokenizer};

fn root() -> PathBuf {
    std::env::var_os("SPT_ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

#[test]
#[ignore = "needs third_party/all-MiniLM-L6-v2 (assets script)"]
fn minilm_tokenizer_json_without_its_fixed_padding() {
    let t =
        TextTokenizer::from_file(&root().join("third_party/all-MiniLM-L6-v2/tokenizer.json"), 512).unwrap();
    let e = t.encode("A man is playing a guitar.", None, "test").unwrap();
    // [CLS] a man is playing a guitar . [SEP] (ids as in vocab.txt) — not padded to the file's 128.
    assert_eq!(e.ids, vec![101, 1037, 2158, 2003, 2652, 1037, 2858, 1012, 102]);
    assert_eq!(t.pad_id(), 0);
    let long = "word ".repeat(300);
    assert_eq!(t.encode(&long, None, "test").unwrap().ids.len(), 302); // not truncated to 128

    // Pairs truncated longest-first to 128 keep, per side, what transformers 5.24's
    // AutoTokenizer(a, b, truncation=True, max_length=128) keeps: the odd token goes to the
    // longer side, also where both pass 128 and where one is cut before tokenizing.
    let t =
        TextTokenizer::from_file(&root().join("third_party/all-MiniLM-L6-v2/tokenizer.json"), 128).unwrap();
    let (fun, a) = (|n: usize| "fun ".repeat(n), |n: usize| "a ".repeat(n));
    let cases = [
        (fun(100), a(90), [63, 62]),
        (a(90), fun(100), [62, 63]),
        (fun(1100), a(1050), [63, 62]),
        (a(1050), fun(1100), [62, 63]),
    ];
    for (first, second, want) in cases {
        let e = t.encode(&first, Some(&second), "test").unwrap();
        let n_second = e.type_ids.iter().filter(|&&ty| ty == 1).count() - 1; // and its [SEP]
        assert_eq!(
            [e.ids.len() - 3 - n_second, n_second],
            want,
            "{} / {}",
            first.len(),
            second.len()
        );
    }
}

#[test]
#[ignore = "needs third_party/gpt2-tokenizer (assets script)"]
fn gpt2_tokenizer_known_ids() {
    let d = root().join("third_party/gpt2-tokenizer");
    let t =
        TextTokenizer::gpt2_from_vocab_merges(&d.join("vocab.json"), &d.join("merges.txt"), 1024).unwrap();
    assert_eq!(
        t.encode_raw("Hello world, this is GPT-2.").unwrap(),
        vec![15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    );
}

#[test]
#[ignore = "needs data/rt/rotten_tomatoes_corpus_full.csv (assets script)"]
fn rotten_tomatoes_rows_labels_and_movie_split() {
    let cols = ColumnSpec {
        text: "text".into(),
        text_pair: None,
        label: Some("category".into()),
        group: Some("movie_name".into()),
    };
    let path = root().join("data/rt/rotten_tomatoes_corpus_full.csv");
    let d = read_classification(&path, None, &cols, &["plot".into()]).unwrap();
    // The published counts: 13,905 rows, fresh 7,403 / rotten 5,405 / plot 1,097; 508 movies.
    assert_eq!(d.examples.len(), 12_808);
    let labels = LabelMap::from_data(&d).unwrap();
    assert_eq!(labels.labels(), ["fresh", "rotten"]);
    let fresh = d
        .examples
        .iter()
        .filter(|e| e.label.as_deref() == Some("fresh"))
        .count();
    assert_eq!(fresh, 7_403);
    let (tr, va) = split_train_validation(d, 0.1, 42, true).unwrap();
    let movies = |x: &spt_train::data::ClassificationData| {
        x.examples
            .iter()
            .map(|e| e.group.clone().unwrap())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert!(movies(&tr).is_disjoint(&movies(&va)));
    assert_eq!(movies(&tr).len() + movies(&va).len(), 508);
    assert!(
        va.examples.len() >= 1281 && va.examples.len() < 1281 + 200,
        "{}",
        va.examples.len()
    );
}
