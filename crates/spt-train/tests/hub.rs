//! `resolve_model` against a stand-in hub on localhost: the real hub is not reachable from CI, so
//! a small HTTP server answers the two requests hf-hub makes (the repository's file list, and
//! each file with a byte range) for a few repositories laid out as real ones are.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use spt_train::config::{resolve_model_with, Hub};

type Repos = HashMap<&'static str, Vec<(&'static str, Vec<u8>)>>;

/// Serves `repos` until the test ends; returns the endpoint and the log of requested paths.
fn serve(repos: Repos) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            answer(stream, &repos, &seen);
        }
    });
    (endpoint, log)
}

fn answer(mut stream: TcpStream, repos: &Repos, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    // `Range: bytes=S-` or `bytes=S-E` (inclusive).
    let mut range: Option<(usize, Option<usize>)> = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (a, b) = v.trim().split_once('-').unwrap_or((v.trim(), ""));
            range = a.parse().ok().map(|a| (a, b.parse().ok()));
        }
    }
    log.lock().unwrap().push(path.clone());
    let reply = |stream: &mut TcpStream, status: &str, headers: &[String], body: &[u8]| {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for h in headers {
            head += &format!("{h}\r\n");
        }
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(b"\r\n");
        let _ = stream.write_all(body);
    };
    // GET /api/models/{owner}/{name}/revision/main: the file list.
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let id = rest.trim_end_matches("/revision/main");
        return match repos.get(id) {
            Some(files) => {
                let siblings: Vec<String> = files
                    .iter()
                    .map(|(f, _)| format!(r#"{{"rfilename":"{f}"}}"#))
                    .collect();
                let body = format!(r#"{{"sha":"c0ffee","siblings":[{}]}}"#, siblings.join(","));
                reply(
                    &mut stream,
                    "200 OK",
                    &["Content-Type: application/json".into()],
                    body.as_bytes(),
                );
            }
            None => reply(&mut stream, "404 Not Found", &[], b"Repository not found"),
        };
    }
    // GET /{owner}/{name}/resolve/{revision}/{file}, with a byte range. Every repository is at
    // commit c0ffee; its branch `main` names it too.
    let found = path.split_once("/resolve/").and_then(|(id, rest)| {
        let (rev, file) = rest.split_once('/')?;
        let files = repos
            .get(id.trim_start_matches('/'))
            .filter(|_| rev == "main" || rev == "c0ffee")?;
        files.iter().find(|(f, _)| *f == file).map(|(f, b)| (*f, b))
    });
    match found {
        Some((file, bytes)) => {
            // hf-hub asks for bytes 0-0 first (size, etag, commit), then for the rest.
            let (start, last) = range.unwrap_or((0, None));
            let last = last.unwrap_or(usize::MAX).min(bytes.len().saturating_sub(1));
            let body = bytes.get(start..=last).unwrap_or(&[]);
            let headers = [
                format!("ETag: \"etag-{file}-{}\"", bytes.len()),
                "X-Repo-Commit: c0ffee".into(),
                format!("Content-Range: bytes {start}-{last}/{}", bytes.len()),
            ];
            reply(&mut stream, "206 Partial Content", &headers, body);
        }
        None => reply(
            &mut stream,
            "404 Not Found",
            &["X-Error-Code: EntryNotFound".into()],
            b"Entry not found",
        ),
    }
}

fn hub(dir: &std::path::Path, endpoint: &str, offline: bool) -> Hub {
    Hub {
        cache: hf_hub::Cache::new(dir.join("hub")),
        endpoint: endpoint.to_string(),
        offline,
        token: None,
    }
}

#[test]
fn hub_models_come_with_whichever_checkpoint_files_they_ship() {
    let index = br#"{"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors", "c.weight": "model-00001-of-00002.safetensors"}}"#;
    let sharded = vec![
        ("config.json", b"{\"model_type\": \"bert\"}".to_vec()),
        ("model.safetensors.index.json", index.to_vec()),
        ("model-00001-of-00002.safetensors", vec![1u8; 40]),
        ("model-00002-of-00002.safetensors", vec![2u8; 30]),
        ("vocab.txt", b"[PAD]\n[UNK]\n".to_vec()),
        ("README.md", b"# a model card".to_vec()),
    ];
    let repos: Repos = HashMap::from([
        ("someone/sharded", sharded.clone()),
        (
            "someone/pickled",
            vec![
                ("config.json", b"{}".to_vec()),
                ("pytorch_model.bin", vec![7u8; 25]),
                ("tokenizer.json", b"{}".to_vec()),
            ],
        ),
        (
            "someone/both",
            vec![
                ("config.json", b"{}".to_vec()),
                ("model.safetensors", vec![3u8; 10]),
                ("pytorch_model.bin", vec![4u8; 10]),
            ],
        ),
        (
            "someone/weightless",
            vec![("config.json", b"{}".to_vec()), ("tf_model.h5", vec![0u8; 5])],
        ),
    ]);
    let (endpoint, log) = serve(repos);
    let tmp = tempfile::tempdir().unwrap();
    let online = hub(tmp.path(), &endpoint, false);

    // The cache holds an older commit's config.json alone (as a tokenizer-only download leaves
    // it): everything comes from the listed commit, into one folder, which `main` then names.
    let repo_dir = tmp.path().join("hub/models--someone--sharded");
    std::fs::create_dir_all(repo_dir.join("snapshots/old0")).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), "old0").unwrap();
    std::fs::write(repo_dir.join("snapshots/old0/config.json"), "{\"old\": true}").unwrap();
    // Sharded safetensors: the index and every shard it names, beside config and tokenizer.
    let dir = resolve_model_with("someone/sharded", &online).unwrap();
    assert!(dir.ends_with("snapshots/c0ffee"), "{}", dir.display());
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        "c0ffee"
    );
    for (f, bytes) in &sharded {
        if *f == "README.md" {
            assert!(!dir.join(f).exists(), "only what a model needs is fetched");
        } else {
            let got = std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(&got, bytes, "{f}");
        }
    }

    // Only a PyTorch pickle: that is fetched.
    let dir = resolve_model_with("someone/pickled", &online).unwrap();
    assert_eq!(
        std::fs::read(dir.join("pytorch_model.bin")).unwrap(),
        vec![7u8; 25]
    );
    assert!(dir.join("tokenizer.json").is_file());

    // Both formats: safetensors, the one preferred, and not the pickle.
    let dir = resolve_model_with("someone/both", &online).unwrap();
    assert!(dir.join("model.safetensors").is_file());
    assert!(!dir.join("pytorch_model.bin").exists());
    assert!(
        !log.lock()
            .unwrap()
            .iter()
            .any(|p| p.contains("someone/both/resolve/main/pytorch_model.bin")),
        "the pickle was requested although safetensors were there"
    );

    // Offline, each downloaded model is found in the cache.
    let offline = hub(tmp.path(), "http://127.0.0.1:9", true);
    for id in ["someone/sharded", "someone/pickled", "someone/both"] {
        resolve_model_with(id, &offline).unwrap_or_else(|e| panic!("{id} offline: {e}"));
    }
    // A cached index whose shard is missing is not a whole model, even beside a whole pickle
    // (the loader reads the index first).
    let sharded = resolve_model_with("someone/sharded", &offline).unwrap();
    let shard = sharded.join("model-00002-of-00002.safetensors");
    std::fs::remove_file(&shard).unwrap();
    std::fs::write(sharded.join("pytorch_model.bin"), [0u8; 8]).unwrap();
    let e = resolve_model_with("someone/sharded", &offline)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("someone/sharded") && e.contains("no whole copy") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );

    // No checkpoint the loader reads: the error says what it looked for and what is there.
    let e = resolve_model_with("someone/weightless", &online)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("someone/weightless")
            && e.contains("model.safetensors.index.json")
            && e.contains("pytorch_model.bin")
            && e.contains("tf_model.h5"),
        "{e}"
    );
    // A repository the hub does not have.
    let e = resolve_model_with("someone/missing", &online)
        .unwrap_err()
        .to_string();
    assert!(e.contains("someone/missing") && e.contains("404"), "{e}");
}
