//! [`TextTokenizer`]: the `tokenizers` crate with our truncation policy.
//!
//! - BERT WordPiece from `tokenizer.json` (or `vocab.txt`), GPT-2 byte-level BPE from
//!   `tokenizer.json` or `vocab.json` + `merges.txt`.
//! - Any padding / truncation a `tokenizer.json` embeds (all-MiniLM-L6-v2 pads and truncates to
//!   128) is switched off: batches pad dynamically, and truncation is ours.
//! - Texts longer than `max_length` tokens (special tokens included) are truncated longest-first
//!   as transformers truncates them, so `[CLS] … [SEP]` survive; the first truncation logs one
//!   warning naming where it happened, and [`TextTokenizer::truncated_count`] counts them all.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, EncodeInput, PostProcessor, Tokenizer, TruncationParams, TruncationStrategy};

use super::DataError;

/// The settings of a folder's `tokenizer_config.json` that change token ids, applied as
/// transformers 5 applies them: to the tokenizer it builds from `vocab.txt` or `vocab.json` +
/// `merges.txt`, and over a `tokenizer.json`'s BERT normalizer and byte-level pre-tokenizer
/// (where the file has another layout, it is taken as it is, as transformers' generic fast
/// tokenizer takes it).
#[derive(Debug, Default, serde::Deserialize)]
struct TokenizerConfig {
    do_lower_case: Option<bool>,
    strip_accents: Option<bool>,
    tokenize_chinese_chars: Option<bool>,
    add_prefix_space: Option<bool>,
    add_bos_token: Option<bool>,
}

impl TokenizerConfig {
    /// `dir/tokenizer_config.json`, or transformers' defaults without one.
    fn read(dir: &Path) -> Result<Self, DataError> {
        let p = dir.join("tokenizer_config.json");
        if !p.is_file() {
            return Ok(Self::default());
        }
        let source = p.display().to_string();
        let text = std::fs::read_to_string(&p).map_err(|e| tok_err(&source, e))?;
        serde_json::from_str(super::strip_bom(&text)).map_err(|e| tok_err(&source, e))
    }

    /// BERT's normalizer as transformers builds it from these settings (accents follow
    /// lower-casing unless `strip_accents` says otherwise).
    fn bert_normalizer(&self) -> BertNormalizer {
        BertNormalizer::new(
            true,
            self.tokenize_chinese_chars.unwrap_or(true),
            self.strip_accents,
            self.do_lower_case.unwrap_or(true),
        )
    }

    /// The settings given, over a `tokenizer.json`'s BERT normalizer and bare byte-level
    /// pre-tokenizer.
    fn apply(&self, tok: &mut Tokenizer, source: &str) -> Result<(), DataError> {
        use tokenizers::{NormalizerWrapper, PreTokenizerWrapper};
        if let Some(NormalizerWrapper::BertNormalizer(n)) = tok.get_normalizer() {
            let mut n = *n;
            n.lowercase = self.do_lower_case.unwrap_or(n.lowercase);
            n.strip_accents = self.strip_accents.or(n.strip_accents);
            n.handle_chinese_chars = self.tokenize_chinese_chars.unwrap_or(n.handle_chinese_chars);
            tok.with_normalizer(Some(n)).map_err(|e| tok_err(source, e))?;
        }
        if let (Some(prefix), Some(PreTokenizerWrapper::ByteLevel(b))) =
            (self.add_prefix_space, tok.get_pre_tokenizer())
        {
            let mut b = *b;
            b.add_prefix_space = prefix;
            tok.with_pre_tokenizer(Some(b));
        }
        Ok(())
    }
}

/// Token ids and segment ids of one encoded text (or text pair).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// A tokenizer with padding disabled and a truncation limit.
pub struct TextTokenizer {
    plain: Tokenizer,
    truncating: Tokenizer,
    max_length: usize,
    /// Special tokens the tokenizer adds to a single text and to a pair.
    specials: [usize; 2],
    pad_id: u32,
    eos_id: Option<u32>,
    source: String,
    truncated: AtomicUsize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source)
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

thread_local! {
    /// Set while [`guarded`] runs on this thread: its panics become errors, not stderr output.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a tokenizers-library constructor, turning its panic on a malformed file into an error
/// (the library `expect`s on some inputs). The panic hook in place is wrapped once, so that it
/// stays silent for these panics only (on this thread, while `f` runs).
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static WRAP_HOOK: std::sync::Once = std::sync::Once::new();
    WRAP_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET_PANICS.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(was));
    result.map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        format!("the tokenizers library failed on it: {msg}")
    })
}

/// Every merge of `merges.txt` joins two tokens of `vocab.json` into a third: the BPE builder
/// panics on a merge whose result is longer than every token, rather than naming it.
fn check_merges(vocab: &Path, merges: &Path) -> Result<(), String> {
    let read = |p: &Path| {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        match text.starts_with('\u{feff}') {
            true => Err(without_bom(p)),
            false => Ok(text),
        }
    };
    let vocab_map: std::collections::HashMap<String, u64> = serde_json::from_str(&read(vocab)?)
        .map_err(|e| format!("{}: expected a JSON object of token → id ({e})", vocab.display()))?;
    for (i, line) in read(merges)?.lines().enumerate() {
        if line.starts_with("#version") {
            continue;
        }
        if line.trim().is_empty() {
            return Err(format!(
                "{} line {}: empty; each line after `#version` is one merge, two tokens",
                merges.display(),
                i + 1
            ));
        }
        let Some((a, b)) = line.split_once(' ') else {
            return Err(format!(
                "{} line {}: expected two tokens, got {line:?}",
                merges.display(),
                i + 1
            ));
        };
        for token in [a.to_string(), b.to_string(), format!("{a}{b}")] {
            if !vocab_map.contains_key(&token) {
                return Err(format!(
                    "{} line {}: merge `{line}` needs `{token}`, which {} lacks",
                    merges.display(),
                    i + 1,
                    vocab.display()
                ));
            }
        }
    }
    Ok(())
}

/// The tokenizers library reads these files itself and would take the mark as part of the first
/// token.
fn without_bom(p: &Path) -> String {
    format!(
        "{} starts with a UTF-8 byte-order mark: save it without one",
        p.display()
    )
}

fn tok_err(source: &str, e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer {
        source_name: source.to_string(),
        msg: e.to_string(),
    }
}

impl TextTokenizer {
    /// Wraps a `tokenizers::Tokenizer`; its own padding and truncation are removed.
    /// `source` names it in errors (usually the file path).
    pub fn from_tokenizer(mut tok: Tokenizer, source: &str, max_length: usize) -> Result<Self, DataError> {
        // Room for one token of text beside the special tokens. tokenizers subtracts them from
        // the limit unchecked (an overflow panic in a debug build, a wrap in release).
        let added = |pair| tok.get_post_processor().map_or(0, |p| p.added_tokens(pair));
        let specials = [added(false), added(true)];
        if max_length <= specials[0] {
            return Err(tok_err(
                source,
                format!(
                    "max_length {max_length} leaves no room for the text: the tokenizer adds {} special \
                     tokens, so at least {} are needed",
                    specials[0],
                    specials[0] + 1
                ),
            ));
        }
        let padding_pad = tok.get_padding().map(|p| p.pad_id);
        tok.with_padding(None);
        tok.with_truncation(None).map_err(|e| tok_err(source, e))?;
        let pad_id = padding_pad
            .or_else(|| tok.token_to_id("[PAD]"))
            .or_else(|| tok.token_to_id("<pad>"))
            .or_else(|| tok.token_to_id("<|endoftext|>"))
            .unwrap_or(0);
        let eos_id = tok
            .token_to_id("<|endoftext|>")
            .or_else(|| tok.token_to_id("</s>"))
            .or_else(|| tok.token_to_id("[SEP]"));
        // A post-processor template naming a token it does not define panics on every encode
        // (tokenizers indexes its map): found here, once, rather than on the first row. (A pair
        // template only pairs use is guarded where it is used: see `encode`.)
        guarded(|| tok.encode("a", true))
            .map_err(|e| tok_err(source, format!("it cannot encode a text: {e}")))?
            .map_err(|e| tok_err(source, e))?;
        let mut truncating = tok.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                ..Default::default()
            }))
            .map_err(|e| tok_err(source, e))?;
        Ok(Self {
            plain: tok,
            truncating,
            max_length,
            specials,
            pad_id,
            eos_id,
            source: source.to_string(),
            truncated: AtomicUsize::new(0),
        })
    }

    /// Loads a `tokenizer.json` (WordPiece, BPE, …). The tokenizers library panics on some
    /// malformed files; those panics become errors, and the first load wraps the process's panic
    /// hook (once) so that they print nothing. Other panics reach the hook that was in place.
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, DataError> {
        let source = path.display().to_string();
        // A vocabulary file is one half of a tokenizer whose folder holds the rest.
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if ["vocab.txt", "vocab.json", "merges.txt"].contains(&name.as_str()) {
            return Err(tok_err(
                &source,
                format!(
                    "{name} is part of a tokenizer: give its folder (holding vocab.txt, or vocab.json and \
                     merges.txt), or a tokenizer.json"
                ),
            ));
        }
        let not_one = |why: String| {
            tok_err(
                &source,
                format!("not a tokenizer.json ({why}); give a tokenizer.json or a tokenizer's folder"),
            )
        };
        let text = std::fs::read_to_string(path).map_err(|e| not_one(e.to_string()))?;
        let text = super::strip_bom(&text);
        // JSON that is cut short (an interrupted download) is named by serde: the tokenizers
        // library panics on some of it, and on some valid JSON of the wrong shape, which is
        // caught below.
        serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| not_one(e.to_string()))?;
        let mut tok = guarded(|| text.parse::<Tokenizer>())
            .map_err(not_one)?
            .map_err(|e| not_one(e.to_string()))?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        TokenizerConfig::read(dir)?.apply(&mut tok, &source)?;
        Self::from_tokenizer(tok, &source, max_length)
    }

    /// GPT-2 byte-level BPE from `vocab.json` + `merges.txt` (ByteLevel pre-tokenizer and
    /// decoder, `add_prefix_space` from the folder's `tokenizer_config.json`, else false;
    /// `<|endoftext|>` registered as a special token).
    pub fn gpt2_from_vocab_merges(vocab: &Path, merges: &Path, max_length: usize) -> Result<Self, DataError> {
        let source = format!("{} + {}", vocab.display(), merges.display());
        let (v, m) = match (vocab.to_str(), merges.to_str()) {
            (Some(v), Some(m)) => (v, m),
            _ => return Err(tok_err(&source, "paths must be valid UTF-8")),
        };
        check_merges(vocab, merges).map_err(|e| tok_err(&source, e))?;
        let bpe = guarded(|| BPE::from_file(v, m).build())
            .map_err(|e| tok_err(&source, e))?
            .map_err(|e| tok_err(&source, e))?;
        let cfg = TokenizerConfig::read(vocab.parent().unwrap_or(Path::new(".")))?;
        // transformers' GPT2Tokenizer then puts <|endoftext|> before every text: not done here.
        if cfg.add_bos_token == Some(true) {
            return Err(tok_err(
                &source,
                "tokenizer_config.json sets add_bos_token: true, which this tokenizer does not do \
                 (the ids would differ from transformers'); give a tokenizer.json",
            ));
        }
        let mut tok = Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(
            cfg.add_prefix_space.unwrap_or(false),
            true,
            true,
        )));
        tok.with_decoder(Some(ByteLevel::default()));
        tok.with_post_processor(Some(ByteLevel::new(false, true, true)));
        if tok.token_to_id("<|endoftext|>").is_some() {
            tok.add_special_tokens([AddedToken::from("<|endoftext|>", true)])
                .map_err(|e| tok_err(&source, e))?;
        }
        Self::from_tokenizer(tok, &source, max_length)
    }

    /// BERT WordPiece from a `vocab.txt`: BertNormalizer as the folder's `tokenizer_config.json`
    /// sets it (`do_lower_case`, `strip_accents`, `tokenize_chinese_chars`; without one,
    /// transformers' defaults: uncased), BertPreTokenizer, the vocabulary's `[PAD]`, `[UNK]`,
    /// `[CLS]`, `[SEP]` and `[MASK]` as special tokens (typed in a text, each stays one token),
    /// and `[CLS] a [SEP] b [SEP]` post-processing.
    pub fn bert_from_vocab_txt(vocab: &Path, max_length: usize) -> Result<Self, DataError> {
        let source = vocab.display().to_string();
        let v = vocab
            .to_str()
            .ok_or_else(|| tok_err(&source, "path must be valid UTF-8"))?;
        let mut head = [0u8; 3];
        if std::fs::File::open(vocab)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .is_ok()
            && head == [0xEF, 0xBB, 0xBF]
        {
            return Err(tok_err(&source, without_bom(vocab)));
        }
        let wp = WordPiece::from_file(v).build().map_err(|e| tok_err(&source, e))?;
        let mut tok = Tokenizer::new(wp);
        let cls = tok
            .token_to_id("[CLS]")
            .ok_or_else(|| tok_err(&source, "vocab has no [CLS]"))?;
        let sep = tok
            .token_to_id("[SEP]")
            .ok_or_else(|| tok_err(&source, "vocab has no [SEP]"))?;
        let cfg = TokenizerConfig::read(vocab.parent().unwrap_or(Path::new(".")))?;
        tok.with_normalizer(Some(cfg.bert_normalizer()))
            .map_err(|e| tok_err(&source, e))?;
        tok.with_pre_tokenizer(Some(BertPreTokenizer));
        let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .into_iter()
            .filter(|t| tok.token_to_id(t).is_some())
            .map(|t| AddedToken::from(t, true))
            .collect();
        tok.add_special_tokens(specials)
            .map_err(|e| tok_err(&source, e))?;
        tok.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )));
        Self::from_tokenizer(tok, &source, max_length)
    }

    /// From a model directory: `tokenizer.json`, else `vocab.json` + `merges.txt`, else
    /// `vocab.txt`.
    pub fn from_model_dir(dir: &Path, max_length: usize) -> Result<Self, DataError> {
        let tj = dir.join("tokenizer.json");
        if tj.is_file() {
            return Self::from_file(&tj, max_length);
        }
        let (vj, mt) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vj.is_file() && mt.is_file() {
            return Self::gpt2_from_vocab_merges(&vj, &mt, max_length);
        }
        let vt = dir.join("vocab.txt");
        if vt.is_file() {
            return Self::bert_from_vocab_txt(&vt, max_length);
        }
        Err(tok_err(
            &dir.display().to_string(),
            "no tokenizer.json, vocab.json + merges.txt, or vocab.txt in this directory",
        ))
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// `<|endoftext|>` / `</s>` / `[SEP]`, if the vocabulary has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn vocab_size(&self) -> usize {
        self.plain.get_vocab_size(true)
    }

    /// How many texts were truncated so far.
    pub fn truncated_count(&self) -> usize {
        self.truncated.load(Ordering::Relaxed)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.plain
    }

    /// Encodes with special tokens, truncating to `max_length`. `location` (e.g. `file:line`)
    /// is named in the one-time truncation warning.
    ///
    /// The work per row is bounded by what it keeps: a text longer than
    /// [`TextTokenizer::char_budget`] characters is cut there before tokenizing (a 50 MB field
    /// would otherwise take gigabytes to tokenize, only to keep `max_length` tokens), and read
    /// further only while the cut yields fewer than `max_length` tokens, or, in a pair with one
    /// side cut, while that side shows no longer than the other (which decides where
    /// longest-first truncation puts an odd token). With both sides cut, the order they show
    /// decides it, which can differ from transformers' by that one token where the shorter
    /// whole text shows longer (both past 64 characters per kept token).
    pub fn encode(&self, text: &str, pair: Option<&str>, location: &str) -> Result<Encoded, DataError> {
        // A limit at or below the special tokens cannot hold the text: the tokenizer then
        // returns more than max_length tokens, or the special tokens alone.
        let specials = self.specials[usize::from(pair.is_some())];
        let need = specials + if pair.is_some() { 2 } else { 1 };
        if self.max_length < need {
            return Err(DataError::Invalid(format!(
                "{location}: max_length {} leaves no room for the text: the tokenizer adds {specials} \
                 special tokens{}, so at least {need} are needed",
                self.max_length,
                if pair.is_some() { " to a pair" } else { "" }
            )));
        }
        let input = |t: &str, p: Option<&str>| -> EncodeInput<'_> {
            match p {
                Some(p) => (t.to_string(), p.to_string()).into(),
                None => t.to_string().into(),
            }
        };
        // Each side has its own budget, so that reading further into a short side does not
        // tokenize a long one whole.
        let mut budget = [self.char_budget(); 2];
        let (mut enc, mut t, mut p) = loop {
            let (enc, t, p) = self.encode_cut(text, pair, budget)?;
            // A cut side that yields fewer tokens than max_length lost words there was room for
            // (a long run of whitespace, or one long word that WordPiece reads as a single
            // [UNK]): read twice as much of it.
            let short = |side: usize, kept: &str, whole: &str| {
                kept.len() < whole.len() && side_len(&enc, side) < self.max_length
            };
            let grow = [
                short(0, t, text),
                pair.zip(p).is_some_and(|(whole, kept)| short(1, kept, whole)),
            ];
            if grow == [false, false] {
                break (enc, t, p);
            }
            for (b, g) in budget.iter_mut().zip(grow) {
                if g {
                    *b = b.saturating_mul(2);
                }
            }
        };
        // Longest-first truncation gives an odd token to the longer side (to the second on a
        // tie): where one side was cut, it is read further until the encoding orders the sides
        // as their whole texts do (a cut side is at least as long as it shows; the other side
        // is whole). Where both were cut, the order they show decides: settling it would mean
        // tokenizing both whole.
        if let (Some(whole), Some(kept)) = (pair, p) {
            let odd = (self.max_length - specials) % 2 == 1;
            let cut_sides = [t.len() < text.len(), kept.len() < whole.len()];
            if odd && cut_sides[0] != cut_sides[1] {
                loop {
                    let n = [side_len(&enc, 0), side_len(&enc, 1)];
                    let side = match cut_sides {
                        [true, false] if n[0] <= n[1] => 0,
                        [false, true] if n[1] < n[0] => 1,
                        _ => break,
                    };
                    // A side read whole cannot show more.
                    let read = [t.len() == text.len(), p.is_some_and(|k| k.len() == whole.len())];
                    if read[side] {
                        break;
                    }
                    budget[side] = budget[side].saturating_mul(2);
                    (enc, t, p) = self.encode_cut(text, pair, budget)?;
                }
            }
        }
        let whole_read = t.len() == text.len() && pair.zip(p).is_none_or(|(w, k)| k.len() == w.len());
        if enc.len() <= self.max_length {
            return Ok(Encoded {
                ids: enc.get_ids().to_vec(),
                type_ids: enc.get_type_ids().to_vec(),
            });
        }
        if self.truncated.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "{location}: text is {}{} tokens, longer than max_length {}; truncating it (and any later \
                 ones, counted without further warnings)",
                if whole_read { "" } else { "at least " },
                enc.len(),
                self.max_length
            );
        }
        let enc = match p {
            None => self.encode_guarded(&self.truncating, input(t, None))?,
            Some(p) => self.truncate_pair(t, p, specials)?,
        };
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
        })
    }

    /// `text` and `pair` truncated longest-first to `max_length` with the special tokens.
    ///
    /// tokenizers 0.23.2 stops tokenizing each side at `max_length` tokens before it truncates,
    /// so two sides longer than that count as a tie, and the odd token goes to the second side
    /// even where the first is longer (transformers, on tokenizers 0.23.3, gives it to the
    /// longer side): the sides are tokenized in full here and truncated by its own rule.
    fn truncate_pair(
        &self,
        text: &str,
        pair: &str,
        specials: usize,
    ) -> Result<tokenizers::Encoding, DataError> {
        let err = |e| tok_err(&self.source, e);
        let first = self.plain.encode(text, false).map_err(err)?;
        let mut second = self.plain.encode(pair, false).map_err(err)?;
        // As the tokenizer types the second sequence of a pair, for post-processors that keep
        // the sequences' own type ids (byte-level).
        second.set_type_ids(vec![1; second.len()]);
        let params = TruncationParams {
            max_length: self.max_length - specials,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            ..Default::default()
        };
        let (mut first, mut second) =
            tokenizers::truncate_encodings(first, Some(second), &params).map_err(err)?;
        // The cut-off tokens are kept as overflowing pieces, which the post-processor would
        // pair one with another (hundreds of thousands of encodings for long texts).
        first.take_overflowing();
        second.as_mut().map(tokenizers::Encoding::take_overflowing);
        guarded(|| self.plain.post_process(first, second, true))
            .map_err(|e| tok_err(&self.source, format!("it cannot encode this input: {e}")))?
            .map_err(err)
    }

    /// The plain encoding of `text` and `pair` cut to `budget` characters each, with the cut texts.
    fn encode_cut<'t>(
        &self,
        text: &'t str,
        pair: Option<&'t str>,
        budget: [usize; 2],
    ) -> Result<(tokenizers::Encoding, &'t str, Option<&'t str>), DataError> {
        let (t, p) = (cut_chars(text, budget[0]), pair.map(|p| cut_chars(p, budget[1])));
        let input: EncodeInput<'_> = match p {
            Some(p) => (t.to_string(), p.to_string()).into(),
            None => t.to_string().into(),
        };
        Ok((self.encode_guarded(&self.plain, input)?, t, p))
    }

    /// `tok.encode(input)` with special tokens, its panic on a malformed post-processor (a pair
    /// template naming a token it does not define) an error.
    fn encode_guarded(
        &self,
        tok: &Tokenizer,
        input: EncodeInput<'_>,
    ) -> Result<tokenizers::Encoding, DataError> {
        guarded(|| tok.encode(input, true))
            .map_err(|e| tok_err(&self.source, format!("it cannot encode this input: {e}")))?
            .map_err(|e| tok_err(&self.source, e))
    }

    /// Characters of a text that are tokenized first: 64 per kept token (no more than
    /// WordPiece's longest word, 100, for realistic text), and at least 4096. A text whose first
    /// `char_budget` characters yield fewer than `max_length` tokens is read further.
    pub fn char_budget(&self) -> usize {
        self.max_length.saturating_mul(64).max(4096)
    }

    /// Encodes raw text without special tokens or truncation (LM packing).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let enc = self
            .plain
            .encode(text, false)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes many raw texts (in parallel inside `tokenizers`), order preserved.
    pub fn encode_raw_batch(&self, texts: Vec<String>) -> Result<Vec<Vec<u32>>, DataError> {
        let encs = self
            .plain
            .encode_batch(texts, false)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, DataError> {
        self.plain
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err(&self.source, e))
    }
}

/// Tokens of side `side` (0: the text, 1: the pair) in `enc`.
fn side_len(enc: &tokenizers::Encoding, side: usize) -> usize {
    enc.get_sequence_ids()
        .iter()
        .filter(|s| **s == Some(side))
        .count()
}

/// `text` up to its first `max_chars` characters, ended at the last whitespace before them: a
/// word cut in two would be tokenized as pieces that are not in the text (a word of more than
/// 100 characters, one `[UNK]` whole, became dozens of `##` pieces). A text with no whitespace
/// there is cut at the budget.
fn cut_chars(text: &str, max_chars: usize) -> &str {
    if text.len() <= max_chars {
        return text;
    }
    let kept = match text.char_indices().nth(max_chars) {
        Some((i, _)) => &text[..i],
        None => return text,
    };
    match kept.rfind(char::is_whitespace) {
        Some(i) if i > 0 => &kept[..i],
        _ => kept,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A vocabulary file or a non-tokenizer JSON given as the tokenizer says what is expected
    /// ("invalid type: sequence, expected struct Tokenizer" named neither).
    #[test]
    fn a_file_that_is_not_a_tokenizer_json_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = dir.path().join("vocab.txt");
        std::fs::write(&vocab, "[PAD]\n[UNK]\n").unwrap();
        let e = TextTokenizer::from_file(&vocab, 8).err().unwrap().to_string();
        assert!(
            e.contains("vocab.txt is part of a tokenizer: give its folder"),
            "{e}"
        );
        let other = dir.path().join("other.json");
        std::fs::write(&other, "[1, 2]").unwrap();
        let e = TextTokenizer::from_file(&other, 8).err().unwrap().to_string();
        assert!(e.contains("not a tokenizer.json"), "{e}");
    }

    /// A tiny WordPiece tokenizer.json that, like MiniLM's, embeds Fixed padding and truncation.
    pub(crate) fn tiny_bert_json() -> String {
        let vocab = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "is", "playing", "guitar", ".", "the",
            "movie", "was", "great", "bad", "##s", "fun", "dull", "not",
        ];
        let vocab: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), serde_json::json!(i)))
            .collect();
        serde_json::json!({
            "version": "1.0",
            "truncation": {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0},
            "padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                         "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
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
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": vocab}
        })
        .to_string()
    }

    pub(crate) fn tiny_bert(dir: &Path, max_length: usize) -> TextTokenizer {
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, tiny_bert_json()).unwrap();
        TextTokenizer::from_file(&p, max_length).unwrap()
    }

    #[test]
    fn bert_json_padding_and_truncation_are_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let t = tiny_bert(dir.path(), 64);
        let e = t.encode("A man is playing", None, "x").unwrap();
        assert_eq!(e.ids, vec![2, 5, 6, 7, 8, 3]); // not padded to the file's Fixed 8
        let long = "the movie was great the movie was great the movie";
        let e = t.encode(long, None, "x").unwrap();
        assert_eq!(e.ids.len(), 12); // not truncated to the file's 8
        assert_eq!(t.pad_id(), 0);
        assert_eq!(t.truncated_count(), 0);
        let p = t.encode("movies fun", Some("not dull"), "x").unwrap();
        assert_eq!(p.ids, vec![2, 12, 16, 17, 3, 19, 18, 3]);
        assert_eq!(p.type_ids, vec![0, 0, 0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn truncation_keeps_special_tokens_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let t = tiny_bert(dir.path(), 5);
        let e = t.encode("the movie was great fun", None, "f.csv:2").unwrap();
        assert_eq!(e.ids, vec![2, 11, 12, 13, 3]);
        let e = t.encode("the movie was great fun .", None, "f.csv:3").unwrap();
        assert_eq!(e.ids.len(), 5);
        assert_eq!(t.truncated_count(), 2);
        let e = t.encode("fun", None, "f.csv:4").unwrap();
        assert_eq!(e.ids, vec![2, 17, 3]);
        assert_eq!(t.truncated_count(), 2);
        // A limit the special tokens fill: named (max_length 1 gave 3 tokens, a pair at 3 gave
        // [CLS] [SEP] [SEP] with no text).
        // At construction for a single text (tokenizers' own subtraction overflowed there, a
        // panic in a debug build), at the encoding for a pair.
        let file = dir.path().join("tokenizer.json");
        for m in [0, 1, 2] {
            let e = TextTokenizer::from_file(&file, m)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("tokenizer.json") && e.contains(&format!("max_length {m}")),
                "{e}"
            );
        }
        for m in [3, 4] {
            let t = tiny_bert(dir.path(), m);
            let e = t
                .encode("the movie", Some("fun"), "f.csv:5")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("f.csv:5") && e.contains(&format!("max_length {m}")) && e.contains("adds 3"),
                "{e}"
            );
        }
        let t = tiny_bert(dir.path(), 5);
        assert_eq!(
            t.encode("the movie was", Some("fun"), "f.csv:6")
                .unwrap()
                .ids
                .len(),
            5
        );
    }

    #[test]
    fn a_huge_text_is_cut_before_tokenizing() {
        let dir = tempfile::tempdir().unwrap();
        let t = tiny_bert(dir.path(), 5);
        assert_eq!(t.char_budget(), 4096);
        // 5 M characters: tokenized whole this would take seconds and hundreds of MB.
        let huge = "the movie was great fun . ".repeat(200_000);
        let started = std::time::Instant::now();
        let e = t.encode(&huge, Some(&huge), "f.csv:9").unwrap();
        assert_eq!(e.ids.len(), 5);
        assert!(started.elapsed().as_secs_f64() < 1.0, "{:?}", started.elapsed());
        // Also where the texts' share of max_length is odd (8 − 3 = 5), so that which side is
        // longer decides the truncation: both cut, the order they show decides (counting both
        // whole took seconds here).
        let t = tiny_bert(dir.path(), 8);
        let started = std::time::Instant::now();
        assert_eq!(t.encode(&huge, Some(&huge), "f.csv:9").unwrap().ids.len(), 8);
        assert!(started.elapsed().as_secs_f64() < 1.0, "{:?}", started.elapsed());
        assert_eq!(cut_chars("aé€b", 3), "aé€");
        assert_eq!(cut_chars("ab", 3), "ab");
    }

    /// Words past the budget are read when the cut kept too few tokens: after 5000 spaces, or
    /// after one 5000-character word (a single [UNK]), the review used to vanish.
    #[test]
    fn words_past_a_long_blank_or_unknown_stretch_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let t = tiny_bert(dir.path(), 8);
        let want = t.encode("not great fun", None, "x").unwrap().ids;
        let e = t
            .encode(&format!("{}not great fun", " ".repeat(5000)), None, "x")
            .unwrap();
        assert_eq!(e.ids, want);
        let e = t
            .encode(&format!("{} not great fun", "x".repeat(5000)), None, "x")
            .unwrap();
        assert_eq!(e.ids, [2, 1, 19, 14, 17, 3]); // [CLS] [UNK] not great fun [SEP]
                                                  // In the pair too, and on the side that was cut only.
        let e = t
            .encode("the movie", Some(&format!("{}dull", " ".repeat(9000))), "x")
            .unwrap();
        assert_eq!(e.ids, [2, 11, 12, 3, 18, 3]);
        // Reading further into a short side leaves the other one cut: a blank first text beside a
        // 5 M-character second one is not tokenized whole (seconds). With one budget for both
        // sides this took 0.80 s here against 0.26 s, too close to assert on a shared machine.
        let blank = format!("{}not", " ".repeat(300_000));
        let huge = "the movie was great fun . ".repeat(200_000);
        let started = std::time::Instant::now();
        let e = t.encode(&blank, Some(&huge), "x").unwrap();
        assert_eq!(e.ids.len(), 8);
        assert_eq!(e.ids[1], 19); // `not`, read past the blanks
        assert!(started.elapsed().as_secs_f64() < 2.0, "{:?}", started.elapsed());
    }

    /// A byte-level BPE whose merges spell "Hello" and "Ġworld".
    pub(crate) fn tiny_gpt2(dir: &Path) -> TextTokenizer {
        let tokens = [
            "H",
            "e",
            "l",
            "o",
            "Ġ",
            "w",
            "r",
            "d",
            ",",
            "ll",
            "llo",
            "He",
            "Hello",
            "Ġw",
            "or",
            "Ġwor",
            "Ġworl",
            "Ġworld",
            "<|endoftext|>",
            "Ċ",
        ];
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), serde_json::json!(i)))
            .collect();
        let merges = "#version: 0.2\nl l\nll o\nH e\nHe llo\nĠ w\no r\nĠw or\nĠwor l\nĠworl d\n";
        let v = dir.join("vocab.json");
        let m = dir.join("merges.txt");
        std::fs::write(&v, serde_json::Value::Object(vocab).to_string()).unwrap();
        std::fs::write(&m, merges).unwrap();
        TextTokenizer::gpt2_from_vocab_merges(&v, &m, 1024).unwrap()
    }

    /// tokenizer_config.json's settings change ids as transformers applies them: casing, accents
    /// and Chinese characters for a vocab.txt (defaults: uncased), special tokens typed in text
    /// stay whole, a prefix space for vocab.json + merges.txt, and the same settings over a
    /// tokenizer.json; what cannot be honoured is refused by name.
    #[test]
    fn tokenizer_config_settings_apply_as_in_transformers() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let vocab = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "Hello", "cafe", "Café", "日", "##本",
        ];
        std::fs::write(d.join("vocab.txt"), vocab.join("\n")).unwrap();
        let id = |t: &str| vocab.iter().position(|v| *v == t).unwrap() as u32;
        let config = |json: &str| std::fs::write(d.join("tokenizer_config.json"), json).unwrap();
        let bert = || TextTokenizer::bert_from_vocab_txt(&d.join("vocab.txt"), 32);
        // No config: uncased, accents stripped; [MASK] in the text is one token (it was [ mask ]).
        let t = bert().unwrap();
        assert_eq!(t.encode_raw("Hello Café").unwrap(), [id("hello"), id("cafe")]);
        assert_eq!(t.encode_raw("hello [MASK]").unwrap(), [id("hello"), id("[MASK]")]);
        // A cased model.
        config(r#"{"do_lower_case": false}"#);
        assert_eq!(
            bert().unwrap().encode_raw("Hello Café").unwrap(),
            [id("Hello"), id("Café")]
        );
        config(r#"{"tokenize_chinese_chars": false}"#);
        assert_eq!(
            bert().unwrap().encode_raw("日本").unwrap(),
            [id("日"), id("##本")]
        );
        // The same setting over a tokenizer.json holding that BERT tokenizer.
        let mut tj = Tokenizer::new(
            WordPiece::from_file(d.join("vocab.txt").to_str().unwrap())
                .build()
                .unwrap(),
        );
        tj.with_normalizer(Some(BertNormalizer::default())).unwrap();
        tj.with_pre_tokenizer(Some(BertPreTokenizer));
        let bert_json = d.join("bert");
        std::fs::create_dir(&bert_json).unwrap();
        std::fs::write(bert_json.join("tokenizer.json"), tj.to_string(false).unwrap()).unwrap();
        let from_json = || TextTokenizer::from_file(&bert_json.join("tokenizer.json"), 32);
        assert_eq!(from_json().unwrap().encode_raw("Hello").unwrap(), [id("hello")]);
        std::fs::write(
            bert_json.join("tokenizer_config.json"),
            r#"{"do_lower_case": false}"#,
        )
        .unwrap();
        assert_eq!(from_json().unwrap().encode_raw("Hello").unwrap(), [id("Hello")]);

        // GPT-2: a prefix space makes "world" the one token "Ġworld" (17).
        let g = tempfile::tempdir().unwrap();
        let t = tiny_gpt2(g.path());
        assert_ne!(t.encode_raw("world").unwrap(), [17]);
        std::fs::write(
            g.path().join("tokenizer_config.json"),
            r#"{"add_prefix_space": true}"#,
        )
        .unwrap();
        let (v, m) = (g.path().join("vocab.json"), g.path().join("merges.txt"));
        assert_eq!(
            TextTokenizer::gpt2_from_vocab_merges(&v, &m, 64)
                .unwrap()
                .encode_raw("world")
                .unwrap(),
            [17]
        );
        std::fs::write(g.path().join("tokenizer.json"), t.plain.to_string(false).unwrap()).unwrap();
        let from_json = TextTokenizer::from_file(&g.path().join("tokenizer.json"), 64).unwrap();
        assert_eq!(from_json.encode_raw("world").unwrap(), [17]);
        // Over a tokenizer.json, a BERT setting for a byte-level tokenizer and add_bos_token
        // change nothing (transformers 5 keeps the file's post-processor); from vocab.json +
        // merges.txt, transformers would put a BOS first: refused.
        for json in [r#"{"do_lower_case": false}"#, r#"{"add_bos_token": true}"#] {
            std::fs::write(g.path().join("tokenizer_config.json"), json).unwrap();
            let t = TextTokenizer::from_file(&g.path().join("tokenizer.json"), 64).unwrap();
            assert_eq!(t.encode_raw("Hello world").unwrap(), [12, 17], "{json}");
        }
        let e = TextTokenizer::gpt2_from_vocab_merges(&v, &m, 64)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("add_bos_token"), "{e}");
    }

    /// Longest-first truncation gives the odd token to the longer side of a pair, as
    /// transformers does: where both sides pass max_length (tokenizers 0.23.2 counted them as a
    /// tie and gave it to the second), and where a cut made the longer side show shorter (one
    /// side cut, and both).
    #[test]
    fn a_long_pair_truncates_as_transformers() {
        let dir = tempfile::tempdir().unwrap();
        let t = tiny_bert(dir.path(), 8); // 3 special tokens: 5 for the texts, odd
        let (fun, a) = ([2, 17, 17, 17, 3, 5, 5, 3], [2, 5, 5, 3, 17, 17, 17, 3]);
        let cases = [
            // 20 tokens against 15: no cut. tokenizers 0.23.2 gave the first 2.
            ("fun ".repeat(20), "a ".repeat(15), fun),
            ("a ".repeat(15), "fun ".repeat(20), a),
            // 1100 tokens against 1050; the cut at 4096 characters shows 1024 of the first.
            ("fun ".repeat(1100), "a ".repeat(1050), fun),
            ("a ".repeat(1050), "fun ".repeat(1100), a),
            // Both cut, where what they show orders them as their whole texts: 2500 tokens
            // (1024 shown) against 2600 (1774 shown).
            (
                "fun ".repeat(2500),
                format!("{}{}", "a ".repeat(1500), "fun ".repeat(1100)),
                [2, 17, 17, 3, 5, 5, 5, 3],
            ),
        ];
        for (i, (first, second, want)) in cases.iter().enumerate() {
            let e = t.encode(first, Some(second), "x").unwrap();
            assert_eq!(e.ids, want, "case {i}");
            let n_first = want.iter().position(|&id| id == 3).unwrap() + 1;
            assert!(
                e.type_ids
                    .iter()
                    .enumerate()
                    .all(|(j, &ty)| ty == u32::from(j >= n_first)),
                "case {i}: {:?}",
                e.type_ids
            );
        }
        // A tie gives it to the second; a short side stays whole.
        assert_eq!(
            t.encode(&"fun ".repeat(9), Some(&"a ".repeat(9)), "x")
                .unwrap()
                .ids,
            [2, 17, 17, 3, 5, 5, 5, 3]
        );
        assert_eq!(
            t.encode("fun", Some(&"a ".repeat(9)), "x").unwrap().ids,
            [2, 17, 3, 5, 5, 5, 5, 3]
        );
    }

    /// A long text is cut at whitespace before tokenizing: the 150-character word after 125
    /// words is one [UNK] that fits max_length 128, as transformers reads it (cut inside it,
    /// its first 67 characters became `##x` pieces and pushed it past the limit).
    #[test]
    fn a_long_text_is_cut_between_words() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "x", "##x"];
        std::fs::write(dir.path().join("vocab.txt"), vocab.join("\n")).unwrap();
        let t = TextTokenizer::bert_from_vocab_txt(&dir.path().join("vocab.txt"), 128).unwrap();
        let text = format!(
            "{}{}",
            format!("hello{}", " ".repeat(60)).repeat(125),
            "x".repeat(150)
        );
        assert!(text.chars().count() > t.char_budget());
        let enc = t.encode(&text, None, "test").unwrap();
        assert_eq!(enc.ids.len(), 128);
        assert_eq!(enc.ids[125..], [4, 1, 3], "hello [UNK] [SEP]");
        assert_eq!(t.truncated_count(), 0);
    }

    #[test]
    fn gpt2_bpe_from_vocab_and_merges() {
        let dir = tempfile::tempdir().unwrap();
        let t = tiny_gpt2(dir.path());
        assert_eq!(t.encode_raw("Hello world").unwrap(), vec![12, 17]);
        assert_eq!(t.encode_raw("Hello, world").unwrap(), vec![12, 8, 17]);
        assert_eq!(t.encode_raw("Hello<|endoftext|>").unwrap(), vec![12, 18]);
        assert_eq!(t.eos_id(), Some(18));
        assert_eq!(t.pad_id(), 18);
        assert_eq!(t.decode(&[12, 17], false).unwrap(), "Hello world");
        let t2 = TextTokenizer::from_model_dir(dir.path(), 8).unwrap();
        assert_eq!(t2.encode_raw("Hello world").unwrap(), vec![12, 17]);
    }
}
