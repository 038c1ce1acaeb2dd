//! Model files: fetching the real Gemma 3 270M GGUF, and reading it exactly
//! as the `gguf` Python package does.
//!
//! `scripts/test.sh` fetches the model before the tests run
//! (`dima models fetch gemma3-270m`), so here fetching again must be a no-op.

use std::time::Duration;

use dima_tests::{run_dima, write};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn fetch_is_idempotent_and_prints_the_path() {
    let done = run_dima(&["models", "fetch", "gemma3-270m"], LIMIT);
    done.assert_success();
    assert!(
        done.last_line()
            .ends_with("/models/gemma-3-270m-q4_k_m.gguf"),
        "{}",
        done.stdout
    );
    assert!(
        done.stderr
            .contains("already in the cache (sha256 verified)"),
        "{}",
        done.stderr
    );
}

#[test]
fn inspect_reads_what_the_gguf_package_reads() {
    let reference: serde_json::Value = serde_json::from_str(include_str!(
        "../actors/testdata/gemma3-270m-inventory.json"
    ))
    .unwrap();
    let done = run_dima(&["models", "inspect", "gemma3-270m"], LIMIT);
    done.assert_success();
    let ours: serde_json::Value = serde_json::from_str(done.last_line()).unwrap();

    let tensors = ours["tensors"].as_array().unwrap();
    let expected = reference["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), expected.len());
    for (got, want) in tensors.iter().zip(expected) {
        assert_eq!(got["name"], want["name"]);
        assert_eq!(
            got["type"].as_str().unwrap().to_uppercase(),
            want["type"].as_str().unwrap().to_uppercase()
        );
        assert_eq!(got["dims"], want["dims"], "{}", want["name"]);
        assert_eq!(got["start"], want["start"], "{}", want["name"]);
        assert_eq!(got["bytes"], want["bytes"], "{}", want["name"]);
    }
    for (key, want) in reference["metadata"].as_object().unwrap() {
        let got = &ours["metadata"][key];
        match want.get("array_len") {
            Some(len) => assert_eq!(&got["len"], len, "{key}"),
            None => assert_eq!(got, want, "{key}"),
        }
    }
    assert_eq!(
        ours["tensor_types"],
        serde_json::json!({"f32": 109, "q4_K": 27, "q5_0": 81, "q6_K": 9, "q8_0": 10})
    );
}

#[test]
fn corrupt_and_unknown_models_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let fetched = run_dima(&["models", "fetch", "gemma3-270m"], LIMIT);
    let real = std::fs::read(fetched.last_line()).unwrap();
    let cut = write(dir.path(), "cut.gguf", "");
    std::fs::write(&cut, &real[..100_000]).unwrap();
    let done = run_dima(&["models", "inspect", cut.to_str().unwrap()], LIMIT);
    assert_eq!(done.status.code(), Some(1));
    assert!(done.stderr.contains("truncated at byte"), "{}", done.stderr);

    let text = write(dir.path(), "notes.gguf", "hello, this is not a model");
    let done = run_dima(&["models", "inspect", text.to_str().unwrap()], LIMIT);
    assert!(done.stderr.contains("not a GGUF file"), "{}", done.stderr);

    let done = run_dima(&["models", "inspect", "gemma9-1t"], LIMIT);
    assert!(
        done.stderr.contains("unknown model \"gemma9-1t\""),
        "{}",
        done.stderr
    );
    let done = run_dima(&["models", "fetch", "gemma9-1t"], LIMIT);
    assert_eq!(done.status.code(), Some(1));
    assert!(
        done.stderr.contains("dima can fetch gemma3-270m"),
        "{}",
        done.stderr
    );
    done.assert_no_panic();
}

/// A corrupted file in the model cache is refused by catalog name, naming
/// the file and both hashes; `dima models verify` checks the real one.
#[test]
fn a_corrupted_cached_model_is_refused_and_verify_checks_the_cache() {
    let done = run_dima(&["models", "verify", "gemma3-270m"], LIMIT);
    done.assert_success();
    assert!(
        done.stdout.contains("ok (sha256 a5fd3b62"),
        "{}",
        done.stdout
    );
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(models.join("gemma-3-270m-q4_k_m.gguf"), b"GGUF not really").unwrap();
    for args in [
        &[
            "generate",
            "--model",
            "gemma3-270m",
            "--prompt",
            "x",
            "--max-tokens",
            "1",
        ][..],
        &["models", "verify", "gemma3-270m"][..],
    ] {
        let out = std::process::Command::new(dima_tests::dima_bin())
            .args(args)
            .env("DIMA_CACHE_DIR", dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("gemma-3-270m-q4_k_m.gguf"),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains("is corrupted or was replaced"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
