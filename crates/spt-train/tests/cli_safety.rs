//! `spt-train` never loses a user's files, leaves a usable state after every fault, and refuses
//! bad input by name. Run as a user would, on the tiny fixture models.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{fixture, fixture_with, last_json, reviews_csv, run, run_err, run_in, run_ok, snapshot};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Finetune args for the tiny BERT on `data` into `out`: `steps` LoRA steps, a checkpoint each.
fn finetune_args<'a>(model: &'a str, data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "finetune",
        "--model",
        model,
        "--train-file",
        data,
        "--split-by",
        "movie",
        "--validation-split",
        "0.3",
        "--output-dir",
        out,
        "--mode",
        "lora",
        "--max-steps",
        steps,
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--save-every",
        "1",
        "--keep-last",
        "0",
        "--no-progress",
    ]
}

fn steps_in(run: &Path) -> Vec<u64> {
    spt_train::checkpoint::list_checkpoints(&run.join("checkpoints"))
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    data: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let model = fixture("tiny-bert-cls", &root);
    let data = reviews_csv(&root, "d.csv", "text,label,movie");
    Setup {
        _tmp: tmp,
        root,
        model,
        data,
    }
}

#[test]
fn export_never_deletes_or_replaces_files_it_did_not_write() {
    let t = setup();
    let run_dir = t.root.join("run");
    run_ok(&finetune_args(s(&t.model), s(&t.data), s(&run_dir), "2"), None);
    let export = |out: &Path, overwrite: bool| {
        let mut a = vec![
            "export",
            "--model",
            s(&t.model),
            "--checkpoint",
            s(&run_dir),
            "--out",
            s(out),
        ];
        if overwrite {
            a.push("--overwrite");
        }
        run(&a, None)
    };
    // 1. Into the source model folder, with --overwrite: refused, every byte kept.
    std::fs::write(t.model.join("README.md"), "the model card").unwrap();
    let before = snapshot(&t.model);
    let o = export(&t.model, true);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("the model being exported from"), "{e}");
    assert_eq!(snapshot(&t.model), before);
    // Another user folder holding a model's files: refused, naming them.
    let other = t.root.join("other-model");
    std::fs::create_dir(&other).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(t.model.join(f), other.join(f)).unwrap();
    }
    let before = snapshot(&other);
    let o = export(&other, true);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("config.json") && e.contains("model.safetensors") && e.contains("did not write"),
        "{e}"
    );
    assert_eq!(snapshot(&other), before);
    // A foreign folder without name clashes: only with --overwrite, and the user's file stays.
    let notes = t.root.join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("todo.txt"), "mine").unwrap();
    assert!(!export(&notes, false).status.success());
    assert!(export(&notes, true).status.success());
    assert_eq!(std::fs::read(notes.join("todo.txt")).unwrap(), b"mine");
    assert!(notes.join("model.safetensors").is_file());
    // 2. Re-export into an earlier export holding a file the user added: refused without
    // --overwrite; with it, the export's files are replaced and the user's file survives.
    let out = t.root.join("export");
    assert!(export(&out, false).status.success());
    std::fs::write(out.join("README.md"), "my notes").unwrap();
    let o = export(&out, false);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
    assert!(export(&out, true).status.success());
    assert_eq!(std::fs::read(out.join("README.md")).unwrap(), b"my notes");
    assert!(out.join("config.json").is_file());
    // That export as the base model of another export into itself: refused, bytes kept.
    let before = snapshot(&out);
    let o = run(
        &[
            "export",
            "--model",
            s(&out),
            "--checkpoint",
            s(&run_dir),
            "--out",
            s(&out),
            "--overwrite",
        ],
        None,
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("the model being exported from"));
    assert_eq!(snapshot(&out), before);
    // A run folder is not an export folder.
    let o = export(&run_dir, true);
    assert!(String::from_utf8_lossy(&o.stderr).contains("fine-tuning run"));
    // A link to an empty folder is exported through (it said "Not a directory"); the link
    // stays a link. A link to nothing is named.
    let target = t.root.join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    let link = t.root.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let o = export(&link, false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    assert!(target.join("model.safetensors").is_file());
    let dangling = t.root.join("dangling");
    std::os::unix::fs::symlink(t.root.join("gone"), &dangling).unwrap();
    let o = export(&dangling, false);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("which does not exist") && e.contains("gone"), "{e}");
    assert!(!t.root.join("gone").exists());
    // `--out .` from inside an empty folder fills that folder (it failed after the load, and an
    // empty --out was removed and made anew); `--out /` is refused by name.
    let here = t.root.join("here");
    std::fs::create_dir(&here).unwrap();
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = ino(&here);
    let (m, r) = (
        std::path::absolute(&t.model).unwrap(),
        std::path::absolute(&run_dir).unwrap(),
    );
    let o = run_in(
        &here,
        &["export", "--model", s(&m), "--checkpoint", s(&r), "--out", "."],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(here.join("model.safetensors").is_file() && ino(&here) == before);
    let o = export(Path::new("/"), true);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--out /: the root folder"));
    // No staging folder left behind.
    let debris: Vec<_> = std::fs::read_dir(&t.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(debris.is_empty(), "{debris:?}");
}

#[test]
fn finetune_overwrite_never_touches_the_users_files() {
    let t = setup();
    // 3. A folder with the user's own checkpoints/ and metrics.jsonl: refused even with
    // --overwrite, naming them, and nothing changes.
    let mine = t.root.join("mine");
    std::fs::create_dir_all(mine.join("checkpoints")).unwrap();
    std::fs::write(mine.join("checkpoints/model.pt"), "weights").unwrap();
    std::fs::write(mine.join("metrics.jsonl"), "{\"mine\": 1}\n").unwrap();
    let before = snapshot(&mine);
    let mut a = finetune_args(s(&t.model), s(&t.data), s(&mine), "2");
    a.push("--overwrite");
    let e = run_err(&a);
    assert!(e.contains("checkpoints") && e.contains("metrics.jsonl"), "{e}");
    assert_eq!(snapshot(&mine), before);
    // A folder with only other files: adopted with --overwrite, twice; the file stays as it was.
    let adopted = t.root.join("adopted");
    std::fs::create_dir(&adopted).unwrap();
    std::fs::write(adopted.join("notes.txt"), "mine").unwrap();
    let mut a = finetune_args(s(&t.model), s(&t.data), s(&adopted), "2");
    assert!(run_err(&a).contains("--overwrite"));
    a.push("--overwrite");
    run_ok(&a, None);
    // Notes the user left inside the run's checkpoints survive the next --overwrite run.
    let step1 = adopted.join("checkpoints/step-00000001");
    std::fs::write(step1.join("README.md"), "my notes").unwrap();
    std::fs::write(adopted.join("checkpoints/NOTES.txt"), "mine").unwrap();
    run_ok(&a, None);
    assert_eq!(std::fs::read(adopted.join("notes.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read(step1.join("README.md")).unwrap(), b"my notes");
    assert_eq!(
        std::fs::read(adopted.join("checkpoints/NOTES.txt")).unwrap(),
        b"mine"
    );
    assert_eq!(steps_in(&adopted), vec![1, 2]);
    let metrics = std::fs::read_to_string(adopted.join("metrics.jsonl")).unwrap();
    assert!(!metrics.contains("mine"));
}

#[test]
fn resuming_an_older_checkpoint_forks_or_discards_but_never_mixes() {
    let t = setup();
    let run_dir = t.root.join("run");
    run_ok(&finetune_args(s(&t.model), s(&t.data), s(&run_dir), "4"), None);
    assert_eq!(steps_in(&run_dir), vec![1, 2, 3, 4]);
    let step1 = run_dir.join("checkpoints/step-00000001");
    // 4. Refused by default, naming the later checkpoints and both ways out.
    let mut a = finetune_args(s(&t.model), s(&t.data), s(&run_dir), "4");
    a.extend(["--resume", s(&step1)]);
    let e = run_err(&a);
    assert!(
        e.contains("step-00000004") && e.contains("--output-dir") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(steps_in(&run_dir), vec![1, 2, 3, 4]);
    // A fork into a new folder leaves the original run as it was.
    let before = snapshot(&run_dir.join("checkpoints"));
    let fork = t.root.join("fork");
    let mut a = finetune_args(s(&t.model), s(&t.data), s(&fork), "4");
    a.extend(["--resume", s(&step1)]);
    let o = run_ok(&a, None);
    assert!(String::from_utf8_lossy(&o.stderr).contains("a new run folder (a fork)"));
    assert_eq!(steps_in(&fork), vec![2, 3, 4]);
    assert_eq!(snapshot(&run_dir.join("checkpoints")), before);
    // A later checkpoint whose manifest was cut short cannot vouch for its files: --overwrite
    // is refused before the data is read (this data would fail, and is not what is named).
    let manifest4 = run_dir.join("checkpoints/step-00000004/manifest.json");
    let kept = std::fs::read(&manifest4).unwrap();
    std::fs::write(&manifest4, &kept[..kept.len() / 2]).unwrap();
    let bad_data = t.root.join("bad.csv");
    std::fs::write(&bad_data, "no,such,columns\n1,2,3\n").unwrap();
    let mut a = finetune_args(s(&t.model), s(&bad_data), s(&run_dir), "4");
    a.extend(["--resume", s(&step1), "--overwrite"]);
    let e = run_err(&a);
    assert!(e.contains("step-00000004") && e.contains("not removed"), "{e}");
    std::fs::write(&manifest4, &kept).unwrap();
    assert_eq!(snapshot(&run_dir.join("checkpoints")), before);
    // With --overwrite the later checkpoints go first, and the run continues from step 1.
    let mut a = finetune_args(s(&t.model), s(&t.data), s(&run_dir), "4");
    a.extend(["--resume", s(&step1), "--overwrite"]);
    let o = run_ok(&a, None);
    assert!(String::from_utf8_lossy(&o.stderr).contains("discarded"));
    assert_eq!(steps_in(&run_dir), vec![1, 2, 3, 4]);
    // Training is deterministic: the fork and the rerun reach the same weights.
    let w = |r: &Path| std::fs::read(r.join("checkpoints/step-00000004/model.safetensors")).unwrap();
    assert_eq!(w(&fork), w(&run_dir));
    // A resume path that does not exist is named as missing, not as corrupt.
    let mut a = finetune_args(s(&t.model), s(&t.data), s(&run_dir), "4");
    let missing = t.root.join("nope");
    a.extend(["--resume", s(&missing)]);
    let e = run_err(&a);
    assert!(e.contains("no such checkpoint") && !e.contains("corrupt"), "{e}");
    // A checkpoint named from inside checkpoints/ (a path with no folder) is the run's own, not
    // a fork (the trainer compared its empty parent).
    let ckpts = run_dir.join("checkpoints");
    let (m, d) = (
        std::path::absolute(&t.model).unwrap(),
        std::path::absolute(&t.data).unwrap(),
    );
    let mut a = finetune_args(s(&m), s(&d), s(&run_dir), "5");
    a.extend(["--resume", "step-00000004"]);
    let o = run_in(&ckpts, &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(steps_in(&run_dir), vec![1, 2, 3, 4, 5]);
    // The latest checkpoint without its manifest: the run's latest complete one is used, with a
    // warning naming the one passed over (it was an INFO line, which -q hid); named directly, it
    // is "no manifest.json", not a missing checkpoints/ inside it.
    let manifest5 = run_dir.join("checkpoints/step-00000005/manifest.json");
    std::fs::rename(&manifest5, t.root.join("manifest5")).unwrap();
    let o = run_ok(
        &[&predict_args(&t, &run_dir, &t.data)[..], &["-q"]].concat(),
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("passed over step-00000005") && err.contains("step-00000004"),
        "{err}"
    );
    assert_eq!(err.matches("passed over").count(), 1, "said once: {err}");
    let step5 = run_dir.join("checkpoints/step-00000005");
    let e = run_err(&predict_args(&t, &step5, &t.data));
    assert!(e.contains("step-00000005: no manifest.json"), "{e}");
}

/// `args` without its `--mode lora`, for a caller that sets the mode.
fn without_mode(mut args: Vec<&str>) -> Vec<&str> {
    let i = args.iter().position(|x| *x == "--mode").unwrap();
    args.drain(i..i + 2);
    args
}

/// Uninterrupted vs stopped at step 3 and resumed (forked into another folder): the step-6
/// weights must be the same bytes, with dropout on.
fn resume_is_exact(model: &Path, data: &Path, root: &Path, extra: &[&str]) {
    let full = root.join(format!("full-{}", extra.join("")));
    let mut a = without_mode(finetune_args(s(model), s(data), s(&full), "6"));
    a.extend_from_slice(extra);
    let f = last_json(&run_ok(&a, None));
    let resumed = root.join(format!("resumed-{}", extra.join("")));
    let step3 = full.join("checkpoints/step-00000003");
    let mut a = without_mode(finetune_args(s(model), s(data), s(&resumed), "6"));
    a.extend_from_slice(extra);
    a.extend(["--resume", s(&step3)]);
    let r = last_json(&run_ok(&a, None));
    let w = |r: &Path| std::fs::read(r.join("checkpoints/step-00000006/model.safetensors")).unwrap();
    assert!(w(&full) == w(&resumed), "{extra:?}: resumed weights differ");
    assert_eq!(f["eval"]["loss"], r["eval"]["loss"], "{extra:?}");
}

#[test]
fn resume_with_dropout_is_bit_exact_in_every_mode() {
    let tmp = tempfile::tempdir().unwrap();
    // Dropout on everywhere the model has it (the fixture ships it off).
    let model = fixture_with("tiny-bert-cls", tmp.path(), |c| {
        c["hidden_dropout_prob"] = 0.1.into();
        c["attention_probs_dropout_prob"] = 0.1.into();
    });
    let data = reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    resume_is_exact(&model, &data, tmp.path(), &["--mode", "dense"]);
    resume_is_exact(
        &model,
        &data,
        tmp.path(),
        &["--mode", "lora", "--lora-dropout", "0.2"],
    );
    // SPT: LoRA dropout inside the routed FFN too (its own seed source, reseeded per step).
    resume_is_exact(
        &model,
        &data,
        tmp.path(),
        &[
            "--mode",
            "spt",
            "--lora-dropout",
            "0.2",
            "--ffn-blocks",
            "4",
            "--ffn-top-k",
            "2",
        ],
    );
}

#[test]
fn kill_during_saves_always_leaves_a_loadable_checkpoint_and_no_debris() {
    let t = setup();
    let run_dir = t.root.join("run");
    let mut a = finetune_args(s(&t.model), s(&t.data), s(&run_dir), "60");
    let keep = a.iter().position(|x| *x == "--keep-last").unwrap();
    a[keep + 1] = "2";
    // A fixed sequence of kill times (ms after start), spread over loading, training and saving.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for round in 0..8 {
        let mut args = a.clone();
        if !steps_in(&run_dir).is_empty() {
            args.push("--resume");
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let wait = Duration::from_millis(150 + x % 900);
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spt-train"))
            .args(&args)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(wait);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // Whatever was interrupted, every checkpoint that looks complete loads.
        for (step, p) in spt_train::checkpoint::list_checkpoints(&run_dir.join("checkpoints")).unwrap() {
            let ck = spt_train::checkpoint::load_checkpoint(&p, &candle_core::Device::Cpu);
            assert!(
                ck.is_ok(),
                "round {round}: step {step} does not load: {:?}",
                ck.err()
            );
        }
    }
    // Resume runs to the end, and no temporary of a killed save is left.
    let mut args = a.clone();
    if !steps_in(&run_dir).is_empty() {
        args.push("--resume");
    }
    let o = run_ok(&args, None);
    assert_eq!(last_json(&o)["step"], 60);
    let names: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("step-")), "{names:?}");
    assert_eq!(steps_in(&run_dir), vec![59, 60]);
    let top: Vec<String> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(top.is_empty(), "{top:?}");
}

#[test]
fn ctrl_c_saves_and_exits_130() {
    interrupted_run_saves("-INT");
}

/// SIGTERM (docker stop, Slurm) saves and stops as Ctrl-C does; it used to kill the run unsaved.
/// While the run trains, a second finetune into its folder is refused and changes nothing there:
/// two runs used to interleave their checkpoints, metrics and settings in one folder.
#[test]
fn sigterm_saves_too_and_a_second_run_into_a_busy_folder_is_refused() {
    interrupted_run_saves("-TERM");
}

/// Under `nohup` a run survives its terminal's SIGHUP (SIGTERM's handler must not take SIGHUP
/// over from nohup's ignore), and still saves on Ctrl-C.
#[test]
fn a_nohup_run_survives_sighup() {
    let t = setup();
    let mut child = start_long_run(&t, Some("nohup"));
    send(&child, "-HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP stopped a nohup run");
    stop_and_wait(child, "-INT");
}

/// A LoRA run of the tiny BERT into `t.root/run` with no end in sight (through `wrapper`, e.g.
/// nohup), returned once it has saved its first checkpoint.
fn start_long_run(t: &Setup, wrapper: Option<&str>) -> std::process::Child {
    let run_dir = t.root.join("run");
    let a = finetune_args(s(&t.model), s(&t.data), s(&run_dir), "100000");
    let exe = env!("CARGO_BIN_EXE_spt-train");
    let mut c = std::process::Command::new(wrapper.unwrap_or(exe));
    if wrapper.is_some() {
        c.arg(exe);
    }
    let child = c
        .args(&a)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while steps_in(&run_dir).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no checkpoint after 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// `signal` to `child`, which must then save and exit with status 130; its output.
fn stop_and_wait(child: std::process::Child, signal: &str) -> std::process::Output {
    send(&child, signal);
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `kill SIGNAL` to `child`.
fn send(child: &std::process::Child, signal: &str) {
    let st = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn interrupted_run_saves(signal: &str) {
    let t = setup();
    let run_dir = t.root.join("run");
    let child = start_long_run(&t, None);
    if signal == "-TERM" {
        for extra in [&["--resume"][..], &["--overwrite"][..]] {
            let mut b = finetune_args(s(&t.model), s(&t.data), s(&run_dir), "2");
            b.extend_from_slice(extra);
            let e = run_err(&b);
            assert!(e.contains("in use by another spt-train process"), "{e}");
        }
        // The refused --overwrite did not put its settings in the running run's folder.
        let toml = std::fs::read_to_string(run_dir.join("finetune.toml")).unwrap();
        assert!(toml.contains("max_steps = 100000"), "{toml}");
    }
    let o = stop_and_wait(child, signal);
    let summary = last_json(&o);
    assert_eq!(summary["stopped"], true);
    let last = *steps_in(&run_dir).last().unwrap();
    assert_eq!(summary["step"], last);
}

#[test]
fn bad_numbers_and_conflicting_flags_are_refused_by_name() {
    let t = setup();
    let out = t.root.join("run");
    let base = finetune_args(s(&t.model), s(&t.data), s(&out), "2");
    for (flags, name) in [
        (&["--weight-decay", "NaN"][..], "weight_decay"),
        (&["--adam-eps", "0"], "adam_eps"),
        (&["--adam-eps", "NaN"], "adam_eps"),
        (&["--max-grad-norm", "NaN"], "max_grad_norm"),
        (&["--lora-alpha=-16"], "lora_alpha"),
        // Past a TOML integer: the run trained, then could not be resumed or evaluated.
        (&["--seed", "18446744073709551615"], "seed"),
        // alpha / rank past f32: the adapter's output was inf, every eval NaN.
        (&["--lora-alpha", "1e40"], "lora_alpha"),
        (&["--lora-rank", "100"], "lora_rank"),
        (&["--warmup-steps", "2", "--warmup-ratio", "0.1"], "warmup"),
        (&["--validation-file", s(&t.data)], "validation"),
        (&["--task", "lm"], "BERT"),
    ] {
        let mut a = base.clone();
        a.extend_from_slice(flags);
        let e = run_err(&a);
        assert!(e.contains(name), "{flags:?}: {e}");
    }
    // Four labels against a three-way classifier: said in those words.
    let four = t.root.join("four.csv");
    let mut rows = String::from("text,label,movie\n");
    for i in 0..40 {
        rows.push_str(&format!("the movie,{},m{}\n", ["a", "b", "c", "d"][i % 4], i % 5));
    }
    std::fs::write(&four, rows).unwrap();
    let e = run_err(&finetune_args(s(&t.model), s(&four), s(&t.root.join("r4")), "2"));
    assert!(
        e.contains("4 labels against a classifier of 3 classes") && e.contains("--drop-label"),
        "{e}"
    );
    // GPT-2 asked to classify.
    let gpt2 = fixture("tiny-gpt2", &t.root);
    let e = run_err(&finetune_args(s(&gpt2), s(&t.data), s(&t.root.join("r5")), "2"));
    assert!(e.contains("GPT-2") && e.contains("--task lm"), "{e}");
    // A one-token benchmark of a language model, refused before a child builds it.
    let e = run_err(&["bench", "--model", s(&gpt2), "--seq-len", "1", "--steps", "1"]);
    assert!(
        e.contains("--seq-len 1") && e.contains("at least 2 tokens"),
        "{e}"
    );
}

/// Settings that only the data or the model can refute are refused before the run directory
/// exists, by name.
#[test]
fn what_the_data_or_model_cannot_take_leaves_no_run_directory() {
    let t = setup();
    let out = t.root.join("run");
    let one = t.root.join("one.csv");
    let mut rows = String::from("text,label,movie\n");
    for i in 0..20 {
        rows.push_str(&format!("the movie,pos,m{}\n", i % 5));
    }
    std::fs::write(&one, rows).unwrap();
    let text = t.root.join("t.txt");
    std::fs::write(&text, "the good movie was very good\n".repeat(200)).unwrap();
    let gpt2 = fixture("tiny-gpt2", &t.root);
    let n_positions = {
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(gpt2.join("config.json")).unwrap()).unwrap();
        c["n_positions"].as_u64().unwrap()
    };
    let too_long = (n_positions + 1).to_string();
    let zero_eps = fixture_with("tiny-gpt2", &t.root.join("eps"), |c| {
        c["layer_norm_epsilon"] = 0.0.into()
    });
    let lm = |model: &Path, block: &str| -> Vec<String> {
        [
            "finetune",
            "--model",
            s(model),
            "--task",
            "lm",
            "--random-init",
            "--train-file",
            s(&text),
        ]
        .into_iter()
        .chain([
            "--block-size",
            block,
            "--output-dir",
            s(&out),
            "--max-steps",
            "1",
            "--no-progress",
        ])
        .map(String::from)
        .collect()
    };
    let mut cases: Vec<(Vec<String>, &[&str])> = Vec::new();
    let mut accum = finetune_args(s(&t.model), s(&t.data), s(&out), "2");
    accum.extend(["--grad-accum", "1000000"]);
    cases.push((
        accum.iter().map(|a| a.to_string()).collect(),
        &["grad_accum = 1000000", "at most"],
    ));
    let one_label = finetune_args(s(&t.model), s(&one), s(&out), "2");
    cases.push((
        one_label.iter().map(|a| a.to_string()).collect(),
        &["one label", "\"pos\""],
    ));
    cases.push((lm(&gpt2, &too_long), &["positions", "--block-size"]));
    cases.push((lm(&zero_eps, "8"), &["layer_norm_epsilon"]));
    let small_vocab = fixture_with("tiny-gpt2", &t.root.join("vocab"), |c| c["vocab_size"] = 5.into());
    cases.push((lm(&small_vocab, "8"), &["token id", "vocabulary has 5"]));
    for (args, wanted) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = run_err(&a);
        assert!(wanted.iter().all(|w| e.contains(w)), "{args:?}: {e}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
}

#[test]
fn absurd_model_sizes_are_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "the good movie was very good\n".repeat(200)).unwrap();
    for (field, value) in [("n_layer", 1_000_000u64), ("n_embd", 262_144)] {
        let model = fixture_with("tiny-gpt2", tmp.path(), |c| c[field] = value.into());
        let out = tmp.path().join(format!("run-{field}"));
        let e = run_err(&[
            "finetune",
            "--model",
            s(&model),
            "--task",
            "lm",
            "--random-init",
            "--train-file",
            s(&text),
            "--output-dir",
            s(&out),
            "--max-steps",
            "1",
            "--no-progress",
        ]);
        assert!(e.contains(field), "{field}: {e}");
    }
}

/// `predict` of `input` with the run in `run_dir`.
fn predict_args<'a>(t: &'a Setup, run_dir: &'a Path, input: &'a Path) -> [&'a str; 7] {
    [
        "predict",
        "--model",
        s(&t.model),
        "--checkpoint",
        s(run_dir),
        "--input",
        s(input),
    ]
}

/// `predict --output` writes its JSON lines over an earlier predictions file, and refuses any
/// other existing file before loading the model, leaving it as it was.
#[test]
fn predict_never_overwrites_a_file_it_did_not_write() {
    let t = setup();
    let run_dir = t.root.join("run");
    run_ok(&finetune_args(s(&t.model), s(&t.data), s(&run_dir), "1"), None);
    let out = t.root.join("predictions.jsonl");
    let predict = [&predict_args(&t, &run_dir, &t.data)[..], &["--output", s(&out)]].concat();
    // The last three have predict's keys: a user's ratings, another key order, other spacing.
    for users in [
        "my notes\n",
        "",
        "{\"text\": \"a\", \"label\": \"pos\"}\n",
        "{\"id\":17,\"label\":\"fresh\",\"score\":4.5,\"text\":\"great movie\"}\n",
        "{\"id\":1,\"text\":\"good\",\"label\":\"pos\",\"score\":0.5}\n",
        "{\"id\": 1, \"label\": \"pos\", \"score\": 0.5, \"text\": \"good\"}\n",
    ] {
        std::fs::write(&out, users).unwrap();
        let e = run_err(&predict);
        assert!(
            e.contains("predictions.jsonl: the file exists and is not predictions"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&out).unwrap(), users);
    }
    std::fs::remove_file(&out).unwrap();
    // `--output -` is stdout (as `--input -` is stdin), not a file named `-`.
    let here = t.root.join("cwd");
    std::fs::create_dir(&here).unwrap();
    let o = run_in(
        &here,
        &[&predict_args(&t, &run_dir, &t.data)[..], &["--output", "-"]].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).lines().count() > 1);
    assert_eq!(std::fs::read_dir(&here).unwrap().count(), 0, "a file was written");
    // Nothing to predict is an error, not an empty file that a later run would have to refuse.
    let stdin = [
        &predict_args(&t, &run_dir, Path::new("-"))[..],
        &["--output", s(&out)],
    ]
    .concat();
    let o = run(&stdin, Some("\n\n"));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("stdin: no texts to predict"),
        "{e}"
    );
    assert!(!out.exists());
    run_ok(&predict, None);
    let first = std::fs::read_to_string(&out).unwrap();
    assert!(first.lines().count() > 1, "{first}");
    run_ok(&predict, None);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), first);
    // Its own earlier output made read-only is kept (a rename would replace it).
    let mut ro = std::fs::metadata(&out).unwrap().permissions();
    ro.set_readonly(true);
    std::fs::set_permissions(&out, ro.clone()).unwrap();
    let e = run_err(&predict);
    assert!(e.contains("read-only"), "{e}");
    assert!(std::fs::metadata(&out).unwrap().permissions().readonly());
    #[allow(clippy::permissions_set_readonly_false)]
    ro.set_readonly(false);
    std::fs::set_permissions(&out, ro).unwrap();
    // Through a link, the file it names is rewritten and the link stays (it became a file).
    let one_line = format!("{}\n", first.lines().next().unwrap());
    std::fs::write(&out, &one_line).unwrap();
    let link = t.root.join("link.jsonl");
    std::os::unix::fs::symlink(&out, &link).unwrap();
    let via_link = [&predict_args(&t, &run_dir, &t.data)[..], &["--output", s(&link)]].concat();
    run_ok(&via_link, None);
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), first);
    // A loop of links is refused before the work (one of the links was renamed over).
    let (l1, l2) = (t.root.join("loop1.jsonl"), t.root.join("loop2.jsonl"));
    std::os::unix::fs::symlink(&l2, &l1).unwrap();
    std::os::unix::fs::symlink(&l1, &l2).unwrap();
    let e = run_err(&[&predict_args(&t, &run_dir, &t.data)[..], &["--output", s(&l1)]].concat());
    assert!(e.contains("a loop of links"), "{e}");
    assert!(l1.symlink_metadata().unwrap().file_type().is_symlink());
}

#[test]
fn messages_point_the_right_way() {
    let t = setup();
    let run_dir = t.root.join("run");
    run_ok(&finetune_args(s(&t.model), s(&t.data), s(&run_dir), "2"), None);
    // predict on a missing file: named as missing, not as a bad extension.
    let missing = t.root.join("missing.txt");
    let o = run(&predict_args(&t, &run_dir, &missing), None);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("missing.txt") && !e.contains("extension"),
        "{e}"
    );
    // An empty path is named as such (it printed ": No such file or directory").
    let o = run(&predict_args(&t, &run_dir, Path::new("")), None);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("(an empty path)"), "{e}");
    // A --checkpoint that names no checkpoint is said so first (it was taken for a run without
    // labels, or "X/checkpoints: Not a directory").
    for (ck, why) in [
        (missing.clone(), "no such checkpoint or run folder"),
        (t.data.clone(), "a file, not a checkpoint or run folder"),
    ] {
        let e = run_err(&predict_args(&t, &ck, &t.data));
        assert!(e.contains(why), "{e}");
    }
    // An output under a file is refused before the model is loaded (it failed after the work).
    let under_file = t.data.join("sub/p.jsonl");
    let mut a = predict_args(&t, &run_dir, &t.data).to_vec();
    a.extend(["--output", s(&under_file)]);
    let e = run_err(&a);
    assert!(
        e.contains("is a file, not a folder") && !e.contains("parameters"),
        "{e}"
    );
    // finetune's output folder too, before the data and model are read; and a dangling link.
    let e = run_err(&finetune_args(
        s(&t.model),
        s(&t.data),
        s(&t.data.join("run")),
        "1",
    ));
    assert!(
        e.contains("--output-dir") && e.contains("is a file, not a folder"),
        "{e}"
    );
    let dangling = t.root.join("dangling-run");
    std::os::unix::fs::symlink(t.root.join("nowhere"), &dangling).unwrap();
    let e = run_err(&finetune_args(s(&t.model), s(&t.data), s(&dangling), "1"));
    assert!(e.contains("which does not exist"), "{e}");
    let under = dangling.join("run");
    let e = run_err(&finetune_args(s(&t.model), s(&t.data), s(&under), "1"));
    assert!(e.contains("dangling-run is a link to"), "{e}");
    // export checks --device as every command does (it ignored any value).
    let e = run_err(&[
        "export",
        "--model",
        s(&t.model),
        "--checkpoint",
        s(&run_dir),
        "--out",
        s(&t.root.join("ex")),
        "--device",
        "gpu",
    ]);
    assert!(e.contains("gpu"), "{e}");
    // A reader that went away ends the output quietly (println! panicked: exit 101).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_spt-train"))
        .args(predict_args(&t, &run_dir, &t.data))
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !e.contains("panicked"),
        "{:?}: {e}",
        o.status
    );
    // An export folder holding only an unreadable marker: a folder like any (the refusal listed
    // no files: "it holds ; spt-train will not delete them").
    let marked = t.root.join("marked");
    std::fs::create_dir(&marked).unwrap();
    std::fs::write(marked.join(".spt-train-output"), "garbage").unwrap();
    let export = [
        "export",
        "--model",
        s(&t.model),
        "--checkpoint",
        s(&run_dir),
        "--out",
        s(&marked),
    ];
    let e = run_err(&export);
    assert!(e.contains("--overwrite") && !e.contains("it holds ;"), "{e}");
    run_ok(&[&export[..], &["--overwrite"]].concat(), None);
    assert!(marked.join("config.json").is_file());
    // eval needs no optimizer state.
    let ck = run_dir.join("checkpoints/step-00000002");
    std::fs::remove_file(ck.join("optimizer.safetensors")).unwrap();
    let eval = [
        "eval",
        "--model",
        s(&t.model),
        "--checkpoint",
        s(&ck),
        "--data-file",
        s(&t.data),
    ];
    run_ok(&eval, None);
    // A checkpoint holding a tensor the model does not train (here added to a valid checkpoint)
    // is refused by the tensor's name, not applied in part.
    {
        use spt_train::checkpoint::{load_checkpoint_weights, save_checkpoint, CheckpointData, FsIo};
        let c = load_checkpoint_weights(&ck, &candle_core::Device::Cpu).unwrap();
        let mut model: std::collections::BTreeMap<_, _> = c.model.into_iter().collect();
        let stray =
            candle_core::Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        model.insert("bert.encoder.layer.0.stray.weight".to_string(), stray);
        let data = CheckpointData {
            step: 7,
            data: c.manifest.data,
            rng_state: c.manifest.rng_state,
            config: c.manifest.config,
            extra_json: c.manifest.extra,
            model,
            optimizer: Default::default(),
            extra: c.extra.into_iter().collect(),
        };
        let odd = save_checkpoint(&run_dir.join("checkpoints"), &data, 0, &FsIo).unwrap();
        let mut a = eval.to_vec();
        a[4] = s(&odd);
        let e = run_err(&a);
        assert!(e.contains("stray.weight") && e.contains("does not train"), "{e}");
    }
    // Its finetune.toml gone, a checkpoint still carries its own settings (its manifest)...
    std::fs::remove_file(run_dir.join("finetune.toml")).unwrap();
    run_ok(&eval, None);
    // ...but one without them (an older spt-train's) is read as dense: the mode or model is named.
    let manifest = ck.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["config"] = serde_json::Value::Null;
    std::fs::write(&manifest, m.to_string()).unwrap();
    let e = run_err(&eval);
    assert!(e.contains("another mode or from another model"), "{e}");
    // predict from a run without labels.json, on a model whose config names no classes: the
    // missing file and the flag that gives it, not a config field.
    // (and, headless, a base model: its runs' heads are new, sized by the data's labels)
    let bare = fixture_with("tiny-bert-cls", &t.root.join("bare"), |c| {
        let o = c.as_object_mut().unwrap();
        o.remove("id2label");
        o.remove("label2id");
    });
    common::drop_head(&bare);
    let run2 = t.root.join("run2");
    run_ok(&finetune_args(s(&bare), s(&t.data), s(&run2), "1"), None);
    std::fs::remove_file(run2.join("labels.json")).unwrap();
    let text = t.root.join("texts.csv");
    std::fs::write(&text, "text\na good film\n").unwrap();
    let mut a = predict_args(&t, &run2, &text).to_vec();
    a[2] = s(&bare);
    // The checkpoint records its classes: answered by name without labels.json.
    let o = run_ok(&a, None);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        ["neg", "neutral", "pos"]
            .iter()
            .any(|c| out.contains(&format!("\"label\":\"{c}\""))),
        "{out}"
    );
    // A checkpoint from before that record: the labels must come from somewhere.
    let manifest = run2.join("checkpoints/step-00000001/manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["extra"]["data"]
        .as_object_mut()
        .unwrap()
        .remove("classes")
        .unwrap();
    std::fs::write(&manifest, m.to_string()).unwrap();
    let e = run_err(&a);
    assert!(e.contains("labels.json") && e.contains("--label-map"), "{e}");
    // A label map of another size than the checkpoint's head: both counts, and what to use.
    let two = t.root.join("two.json");
    std::fs::write(
        &two,
        r#"{"id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1}}"#,
    )
    .unwrap();
    let mut a = predict_args(&t, &run2, &text).to_vec();
    a[2] = s(&bare);
    a.extend(["--label-map", s(&two)]);
    let e = run_err(&a);
    assert!(
        e.contains("has 3 classes, the label map gives 2") && e.contains("labels.json"),
        "{e}"
    );
    // eval takes its task from --config: an LM run's settings with a BERT model are named as
    // such (it used to look for a `label` column the run never had), and so is a --task that
    // contradicts them.
    let lm_toml = t.root.join("lm.toml");
    std::fs::write(&lm_toml, "task = \"lm\"\nmodel = \"gpt2\"\n").unwrap();
    let eval_lm = [
        "eval",
        "--model",
        s(&t.model),
        "--config",
        s(&lm_toml),
        "--data-file",
        s(&t.data),
    ];
    let e = run_err(&eval_lm);
    assert!(
        e.contains("lm.toml") && e.contains("language modelling") && e.contains("BERT model"),
        "{e}"
    );
    let e = run_err(&[&eval_lm[..], &["--task", "classify"]].concat());
    assert!(e.contains("lm.toml") && e.contains("--task asks for"), "{e}");
    // A --drop-label that matches no row is likely misspelt: warned by name.
    let run3 = t.root.join("run3");
    let mut a = finetune_args(s(&t.model), s(&t.data), s(&run3), "1");
    a.extend(["--drop-label", "nuetral"]);
    let o = run_ok(&a, None);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--drop-label \"nuetral\" matches no row"), "{e}");
    // Labels that differ only in case are two classes, most likely by mistake: warned by name.
    let cased = t.root.join("cased.csv");
    let text = std::fs::read_to_string(&t.data)
        .unwrap()
        .replace(",neutral,", ",Pos,");
    std::fs::write(&cased, text).unwrap();
    let run4 = t.root.join("run4");
    let o = run_ok(&finetune_args(s(&t.model), s(&cased), s(&run4), "1"), None);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("labels \"Pos\" and \"pos\" (column `label`) differ only in case"),
        "{e}"
    );
    // export checks the tokenizer it copies: a broken tokenizer.json is refused by name and
    // nothing is written; a model without tokenizer files exports with a warning.
    let broken = fixture_with("tiny-bert-cls", &t.root.join("broken"), |_| {});
    std::fs::write(broken.join("tokenizer.json"), "{\"version\": ").unwrap();
    let out = t.root.join("export-broken");
    let export = |model: &Path, out: &Path| {
        run(
            &[
                "export",
                "--model",
                s(model),
                "--checkpoint",
                s(&run3),
                "--out",
                s(out),
            ],
            None,
        )
    };
    let o = export(&broken, &out);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("tokenizer.json"), "{e}");
    assert!(!out.exists());
    let untok = fixture_with("tiny-bert-cls", &t.root.join("untok"), |_| {});
    std::fs::remove_file(untok.join("tokenizer.json")).unwrap();
    let o = export(&untok, &out);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && e.contains("no tokenizer files"), "{e}");
    assert!(out.join("model.safetensors").is_file() && !out.join("tokenizer.json").exists());
}

#[test]
fn generate_is_capped_at_the_context_and_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-gpt2", tmp.path());
    let started = Instant::now();
    let o = run_ok(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "the good movie",
            "--max-new-tokens",
            "1000000000",
        ],
        None,
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let e = String::from_utf8_lossy(&o.stderr);
    // The fixture's context is 128 tokens, the prompt 3: 125 more are run, and the last one
    // sampled is not.
    assert!(e.contains("capped at 126"), "{e}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("the good movie") && out.ends_with('\n'), "{out}");
    assert!(out.split_whitespace().count() <= 129, "{out}");
    // A prompt that fills the context still gets its one token; one token more is refused.
    let prompt = |n: usize| format!("the{}", " the".repeat(n - 1));
    let full = prompt(128);
    let o = run_ok(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            &full,
            "--max-new-tokens",
            "5",
            "--seed",
            "3",
        ],
        None,
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("capped at 1:") && e.contains("prompt (128 tokens)"),
        "{e}"
    );
    let over = prompt(129);
    let e = run_err(&["generate", "--model", s(&model), "--prompt", &over]);
    assert!(e.contains("--prompt is 129 tokens"), "{e}");
}

/// `eval` and `predict` refuse a model whose head would be freshly initialised (no checkpoint to
/// bring a trained one), and a `--mode` other than the one the checkpoint's run trained in: both
/// would print figures of a model that was never trained.
#[test]
fn eval_and_predict_refuse_untrained_heads_and_a_foreign_mode() {
    let t = setup();
    // The fixture without its classifier: a base checkpoint.
    let base = t.root.join("base");
    std::fs::create_dir(&base).unwrap();
    for e in std::fs::read_dir(&t.model).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, base.join(p.file_name().unwrap())).unwrap();
    }
    common::drop_head(&base);
    let e = run_err(&["eval", "--model", s(&base), "--data-file", s(&t.data)]);
    assert!(
        e.contains("no trained classification head")
            && e.contains("classifier.weight")
            && e.contains("--checkpoint"),
        "{e}"
    );
    let text = t.root.join("texts.csv");
    std::fs::write(&text, "text\na good film\n").unwrap();
    let e = run_err(&["predict", "--model", s(&base), "--input", s(&text)]);
    assert!(e.contains("no trained classification head"), "{e}");

    // A LoRA run: --mode dense is refused, naming both modes; its own mode works.
    let run_dir = t.root.join("run");
    run_ok(&finetune_args(s(&t.model), s(&t.data), s(&run_dir), "1"), None);
    let mut a = predict_args(&t, &run_dir, &text).to_vec();
    let ok = run_ok(&a, None);
    a.extend(["--mode", "dense"]);
    let e = run_err(&a);
    assert!(e.contains("--mode dense") && e.contains("lora mode"), "{e}");
    *a.last_mut().unwrap() = "lora";
    assert_eq!(run_ok(&a, None).stdout, ok.stdout);
    // With the checkpoint, the headless base model is fine: the head comes from the run.
    let mut a = predict_args(&t, &run_dir, &text).to_vec();
    a[2] = s(&base);
    run_ok(&a, None);
    // A language-model run's checkpoint given to eval: named as the other task, not as a flag
    // the user never passed.
    let gpt2 = fixture("tiny-gpt2", &t.root);
    let lm_text = t.root.join("lm.txt");
    std::fs::write(&lm_text, "the good movie was very good\n".repeat(100)).unwrap();
    let lm_run = t.root.join("lm-run");
    run_ok(
        &[
            "finetune",
            "--model",
            s(&gpt2),
            "--task",
            "lm",
            "--random-init",
            "--train-file",
            s(&lm_text),
            "--block-size",
            "8",
            "--output-dir",
            s(&lm_run),
            "--max-steps",
            "1",
            "--no-progress",
        ],
        None,
    );
    let e = run_err(&[
        "eval",
        "--model",
        s(&t.model),
        "--checkpoint",
        s(&lm_run),
        "--data-file",
        s(&t.data),
    ]);
    assert!(
        e.contains("language modelling") && e.contains("--checkpoint's run"),
        "{e}"
    );
    // eval on an LM run read past classification flags without a word.
    let o = run_ok(
        &[
            "eval",
            "--model",
            s(&gpt2),
            "--checkpoint",
            s(&lm_run),
            "--data-file",
            s(&lm_text),
            "--max-length",
            "8",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--max-length has no effect on language modelling"),
        "{err}"
    );
    // predict named missing labels first; the task is the point.
    let e = run_err(&predict_args(&t, &lm_run, &t.data));
    assert!(
        e.contains("language modelling") && e.contains("use generate"),
        "{e}"
    );
}

/// Model files a user edited or a download cut short: each refused by name before a run folder
/// is made, with no panic trace on stderr (the tokenizers library panics on some of them).
#[test]
fn malformed_model_files_are_named_before_the_run_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = reviews_csv(tmp.path(), "d.csv", "text,label,movie");
    let out = tmp.path().join("run");
    let one_step = |model: &Path| {
        run(
            &[
                "finetune",
                "--model",
                s(model),
                "--train-file",
                s(&data),
                "--output-dir",
                s(&out),
                "--max-steps",
                "1",
                "--no-progress",
            ],
            None,
        )
    };
    let attempt = |model: &Path| {
        let o = one_step(model);
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success() && o.status.code() != Some(101), "{e}");
        assert!(!e.contains("panicked"), "a panic reached stderr: {e}");
        assert!(!out.exists(), "a refused run left {}", out.display());
        e
    };
    // A post_processor that gives token type 7 to a model with 2 types.
    let model = fixture("tiny-bert-cls", &tmp.path().join("a"));
    let tj = model.join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&tj).unwrap()).unwrap();
    t["post_processor"] = serde_json::json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[UNK]", "type_id": 7}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"[UNK]": {"id": "[UNK]", "ids": [1], "tokens": ["[UNK]"]}}});
    std::fs::write(&tj, t.to_string()).unwrap();
    let e = attempt(&model);
    assert!(
        e.contains("token type id 7") && e.contains("type_vocab_size"),
        "{e}"
    );
    // One naming a token it does not define: the library panics on every encode.
    t["post_processor"]["special_tokens"] = serde_json::json!({});
    std::fs::write(&tj, t.to_string()).unwrap();
    let e = attempt(&model);
    assert!(e.contains("tokenizer.json") && e.contains("cannot encode"), "{e}");
    // A config.json with a byte-order mark loads as without one.
    let model = fixture("tiny-bert-cls", &tmp.path().join("b"));
    let cfg = model.join("config.json");
    let text = std::fs::read(&cfg).unwrap();
    std::fs::write(&cfg, [&b"\xEF\xBB\xBF"[..], &text].concat()).unwrap();
    std::fs::write(
        model.join("tokenizer.json"),
        [
            &b"\xEF\xBB\xBF"[..],
            &std::fs::read(model.join("tokenizer.json")).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let o = one_step(&model);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Full fine-tuning of a model whose weights fit in memory but whose gradients and AdamW state
/// do not is refused from its config.json, before the data is read or the weights loaded (this
/// model's sizes do not match its weights file, and its data would fail: neither is named).
#[test]
fn full_fine_tuning_that_cannot_fit_is_refused_before_loading() {
    let Some(mem) = spt_models::physical_memory_bytes() else {
        eprintln!("no /proc/meminfo: the memory checks are off on this system");
        return;
    };
    let t = setup();
    // Layers of 4·h² + 2·h·f weights until they hold about half of memory in f32 (mem / 8
    // weights): the weights fit (check_model_size), four times as much (weights, gradient, two
    // moments) does not. Fine steps (12.6 M weights a layer) keep that true on any machine
    // from ~100 MB up; below, there is nothing to test.
    let (h, f) = (1024u64, 4096u64);
    let layers = (mem / 8).div_ceil(4 * h * h + 2 * h * f).max(1);
    if 4 * (layers * (4 * h * h + 2 * h * f) + 2 * h * 1024) > mem {
        eprintln!("{mem} bytes of memory: too little for this test's model");
        return;
    }
    let cfg_path = t.model.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["hidden_size"] = h.into();
    cfg["intermediate_size"] = f.into();
    cfg["num_hidden_layers"] = layers.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let bad_data = t.root.join("bad.csv");
    std::fs::write(&bad_data, "no,such,columns\n1,2,3\n").unwrap();
    let run_dir = t.root.join("run");
    let a: Vec<&str> = finetune_args(s(&t.model), s(&bad_data), s(&run_dir), "1")
        .into_iter()
        .map(|x| if x == "lora" { "dense" } else { x })
        .collect();
    let e = run_err(&a);
    assert!(
        e.contains("training needs at least") && e.contains("--mode lora or spt"),
        "{e}"
    );
    assert!(!run_dir.exists(), "the run folder was made");
}
