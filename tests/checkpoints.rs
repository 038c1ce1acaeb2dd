//! Checkpoints with real processes: a run killed anywhere and started again
//! with `dima up` ends exactly as a run never killed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dima_tests::{eventually, layout_manifest, pids_with_args, run_dima, spawn_dima, wait, write};

const LIMIT: Duration = Duration::from_secs(180);

/// The dispatch pipeline (value policy) from `events` on 2 processes,
/// writing under `out`, with `[checkpoints]` when `checkpoints` is set.
fn manifest(
    dir: &Path,
    name: &str,
    events: &Path,
    out: &str,
    checkpoints: Option<&str>,
) -> PathBuf {
    let mut extra = String::new();
    if let Some(c) = checkpoints {
        extra.push_str(&format!(
            "[checkpoints]\ndir = \"{c}\"\nevery_s = 0.3\nkeep = 2\n\n"
        ));
    }
    extra.push_str(&format!(
        "[pipelines.city]\nfamily = \"dispatch\"\ndead_letter = {{ path = \"{out}/dead.jsonl\" }}\n\
         [pipelines.city.source]\nkind = \"jsonl\"\npath = \"{}\"\n\
         [pipelines.city.sink]\nkind = \"jsonl\"\npath = \"{out}/events.jsonl\"\n\
         [pipelines.city.matching]\ndispatches = {{ kind = \"jsonl\", path = \"{out}/dispatches.jsonl\" }}\n",
        events.display()
    ));
    write(dir, name, &layout_manifest(2, 1, &extra))
}

/// The summary line, without what may differ between equal runs (the
/// solver's wall-clock time, the dead-letter file's name).
fn summary(stdout: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let p = &mut v["pipelines"][0];
    p["matching"]["window_p99_ms"] = serde_json::json!(0);
    p["dead_letter"]["path"] = serde_json::json!("");
    v
}

fn outputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["events.jsonl", "dead.jsonl", "dispatches.jsonl"]
        .iter()
        .map(|f| {
            (
                f.to_string(),
                std::fs::read(dir.join(f)).unwrap_or_default(),
            )
        })
        .collect()
}

fn complete_checkpoints(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().join("MANIFEST.json").is_file())
                .count()
        })
        .unwrap_or(0)
}

/// Starts the run, SIGKILLs process `victim` once `ready` says so, and
/// checks the launcher reports it.
fn kill_when(manifest: &Path, victim: usize, ready: impl Fn() -> bool) {
    let path = manifest.to_str().unwrap();
    let up = spawn_dima(&["up", path]);
    let needle = format!("--process {victim}");
    let pid = eventually(Duration::from_secs(20), || {
        pids_with_args(&[path, &needle]).first().copied()
    })
    .expect("the process starts");
    eventually(Duration::from_secs(60), || ready().then_some(()))
        .expect("the kill point is reached");
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let done = wait(up, LIMIT);
    assert!(
        !done.status.success(),
        "the killed run fails:\n{}",
        done.stderr
    );
}

/// Writes `count` dispatch events (a `malformed` fraction corrupted) to `path`.
fn generate_dispatch(path: &Path, count: u64, malformed: f64) {
    run_dima(
        &[
            "events",
            "generate",
            "--pipeline",
            "dispatch",
            "--count",
            &count.to_string(),
            "--malformed",
            &malformed.to_string(),
            "--to",
            &format!("jsonl:{}", path.display()),
        ],
        LIMIT,
    )
    .assert_success();
}

/// When to kill, from the run's output and checkpoint directories.
type KillPoint = Box<dyn Fn(&Path, &Path) -> bool>;

#[test]
fn a_run_killed_anywhere_and_started_again_ends_as_one_never_killed() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("city.jsonl");
    generate_dispatch(&events, 150_000, 0.01);
    let reference = manifest(dir.path(), "reference.toml", &events, "reference", None);
    let done = run_dima(&["up", reference.to_str().unwrap()], LIMIT);
    done.assert_success().assert_no_panic();
    let expected = summary(&done.stdout);
    let expected_files = outputs(&dir.path().join("reference"));
    assert!(
        expected["pipelines"][0]["matching"]["dispatched"]
            .as_u64()
            .unwrap()
            > 100
    );

    // Kill points: process 0 before the first checkpoint is complete,
    // process 1 right after one, process 1 between two.
    let points: [(&str, usize, KillPoint); 3] = [
        (
            "early",
            0,
            Box::new(|out, _| {
                out.join("events.jsonl")
                    .metadata()
                    .is_ok_and(|m| m.len() > 0)
            }),
        ),
        (
            "after a checkpoint",
            1,
            Box::new(|_, ckpt| complete_checkpoints(ckpt) >= 1),
        ),
        (
            "between checkpoints",
            1,
            Box::new(|out, ckpt| {
                complete_checkpoints(ckpt) >= 2
                    && out
                        .join("dispatches.jsonl")
                        .metadata()
                        .is_ok_and(|m| m.len() > 20_000)
            }),
        ),
    ];
    for (i, (point, victim, ready)) in points.iter().enumerate() {
        let out = format!("out-{i}");
        let ckpt = format!("ckpt-{i}");
        let path = manifest(
            dir.path(),
            &format!("run-{i}.toml"),
            &events,
            &out,
            Some(&ckpt),
        );
        let (out_dir, ckpt_dir) = (dir.path().join(&out), dir.path().join(&ckpt));
        kill_when(&path, *victim, || ready(&out_dir, &ckpt_dir));
        let again = run_dima(&["up", path.to_str().unwrap()], LIMIT);
        again.assert_success().assert_no_panic();
        if *point != "early" {
            assert!(
                again.stderr.contains("restoring from checkpoint"),
                "{point}: the second run restores:\n{}",
                again.stderr
            );
        }
        assert_eq!(summary(&again.stdout), expected, "{point}: the summary");
        for ((name, got), (_, want)) in outputs(&out_dir).iter().zip(&expected_files) {
            assert!(
                got == want,
                "{point}: {name} differs from the uninterrupted run's"
            );
        }
    }
}

#[test]
fn checkpoints_of_other_pipelines_and_unwritable_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("city.jsonl");
    generate_dispatch(&events, 60_000, 0.0);
    let first = manifest(dir.path(), "first.toml", &events, "first", Some("shared"));
    run_dima(&["up", first.to_str().unwrap()], LIMIT).assert_success();
    assert!(complete_checkpoints(&dir.path().join("shared")) >= 1);
    let listed = run_dima(
        &[
            "checkpoints",
            "list",
            dir.path().join("shared").to_str().unwrap(),
            "--format",
            "json",
        ],
        LIMIT,
    );
    listed.assert_success();
    let list: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let newest = list.as_array().unwrap().last().unwrap();
    assert_eq!(newest["complete"], true, "{newest}");
    assert!(
        newest["bytes"].as_u64().unwrap() > 0 && newest["epoch"].as_u64().is_some(),
        "{newest}"
    );
    assert!(
        newest["state_bytes"]["city.matcher"].as_u64().unwrap() > 0,
        "{newest}"
    );
    let inspected = run_dima(
        &[
            "checkpoints",
            "inspect",
            newest["path"].as_str().unwrap(),
            "--format",
            "json",
        ],
        LIMIT,
    );
    inspected.assert_success();
    let inspect: serde_json::Value = serde_json::from_str(&inspected.stdout).unwrap();
    assert_eq!(inspect["workers"].as_array().unwrap().len(), 2, "{inspect}");

    // Other pipelines (another output path) on the same directory.
    let other = manifest(dir.path(), "other.toml", &events, "other", Some("shared"));
    run_dima(&["up", other.to_str().unwrap()], LIMIT)
        .assert_rejected(1, &["other pipelines", "fingerprint", "--fresh"]);
    // --fresh ignores them.
    run_dima(&["up", other.to_str().unwrap(), "--fresh"], LIMIT).assert_success();

    // A directory that cannot be created: refused before anything runs.
    std::fs::write(dir.path().join("a-file"), "x").unwrap();
    let blocked = manifest(
        dir.path(),
        "blocked.toml",
        &events,
        "blocked",
        Some("a-file/ckpt"),
    );
    run_dima(&["up", blocked.to_str().unwrap()], LIMIT)
        .assert_rejected(1, &["checkpoints.dir", "a-file/ckpt", "cannot create it"]);
    assert!(
        !dir.path().join("blocked/events.jsonl").exists(),
        "nothing ran"
    );
}
