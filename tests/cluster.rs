//! The count job across real processes: equal results for every layout,
//! failures and signals handled.

use std::time::Duration;

use dataflows::{CountJob, count_sequential};
use dima_tests::{
    eventually, layout_manifest, pids_with_args, repo_root, run_dima, spawn_dima, wait, write,
};

const JOB: &str = "[jobs.count]\nevents = 200_000\nkeys = 5_000\nseed = 7\nepoch_events = 10_000\n";

#[test]
fn count_result_is_identical_for_1x1_1x2_2x1_2x2() {
    let expected = count_sequential(&CountJob {
        events: 200_000,
        keys: 5_000,
        seed: 7,
        epoch_events: 10_000,
        ..CountJob::default()
    })
    .to_json()
    .to_string();
    assert!(
        expected.starts_with(r#"{"job":"count","events":200000,"keys":5000,"checksum":""#),
        "{expected}"
    );
    let dir = tempfile::tempdir().unwrap();
    for (processes, workers) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
        let path = write(
            dir.path(),
            &format!("{processes}x{workers}.toml"),
            &layout_manifest(processes, workers, JOB),
        );
        let done = run_dima(
            &["up", path.to_str().unwrap(), "--job", "count"],
            Duration::from_secs(60),
        );
        done.assert_success().assert_no_panic();
        assert_eq!(done.last_line(), expected, "{processes}x{workers}");
        if processes == 2 {
            assert!(
                done.stderr.contains("[p0] ") && done.stderr.contains("[p1] "),
                "log lines are prefixed:\n{}",
                done.stderr
            );
        }
    }
}

#[test]
fn events_flag_overrides_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.toml", &layout_manifest(2, 1, JOB));
    let done = run_dima(
        &["up", path.to_str().unwrap(), "--events", "12345"],
        Duration::from_secs(60),
    );
    done.assert_success();
    let line: serde_json::Value = serde_json::from_str(done.last_line()).unwrap();
    assert_eq!(line["events"], 12345);
}

#[test]
fn examples_local_toml_runs_the_count_job() {
    let local = repo_root().join("examples/local.toml");
    let local = local.to_str().unwrap();
    run_dima(&["validate", local], Duration::from_secs(10)).assert_success();
    let done = run_dima(
        &[
            "up",
            local,
            "--job",
            "count",
            "--events",
            "50000",
            "--no-inference",
        ],
        Duration::from_secs(60),
    );
    done.assert_success().assert_no_panic();
    assert_eq!(done.json_lines().len(), 1, "no inference line");
    let line: serde_json::Value = serde_json::from_str(done.last_line()).unwrap();
    assert_eq!(line["job"], "count");
    assert_eq!(line["events"], 50000);

    // Without --job: the manifest's pipelines, both of them, with a summary.
    // The dispatch sink appends, as every JSONL sink does.
    let dispatches = repo_root().join("examples/out/dispatches.jsonl");
    let before = std::fs::read_to_string(&dispatches).map_or(0, |t| t.lines().count());
    // With them, [inference]: two ranks in the two processes over TCP,
    // serving the API while the pipelines run.
    let done = run_dima(
        &["up", local, "--events", "60000"],
        Duration::from_secs(180),
    );
    done.assert_success().assert_no_panic();
    let lines = done.json_lines();
    let by_job = |job: &str| {
        lines
            .iter()
            .find(|l| l["job"] == job)
            .unwrap_or_else(|| panic!("no {job} line in {lines:?}"))
            .clone()
    };
    let served = by_job("inference");
    assert_eq!(served["tp"], 2, "{served}");
    assert_eq!(served["placement"], "tcp", "{served}");
    assert_eq!(served["requests"], 8, "{served}");
    assert_eq!(served["ok"], 8, "{served}");
    assert_eq!(served["completion_tokens"], 8 * 16, "{served}");
    assert!(served["tokens_per_s"].as_f64().unwrap() > 0.0, "{served}");
    assert!(
        done.stderr
            .contains("inference: gemma3-270m on 2 rank(s) (tcp)"),
        "{}",
        done.stderr
    );
    let line = by_job("pipelines");
    let pipelines = line["pipelines"].as_array().unwrap();
    let names: Vec<&str> = pipelines
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ads", "dispatch"]);
    for p in pipelines {
        assert_eq!(p["read"], 60000, "{p}");
        assert_eq!(
            p["valid"].as_u64().unwrap()
                + p["malformed"].as_u64().unwrap()
                + p["late"].as_u64().unwrap(),
            60000
        );
        let name = p["name"].as_str().unwrap();
        if name == "ads" {
            // The learner ran: every valid impression became an example.
            let learner = &p["learner"];
            assert_eq!(
                learner["examples"], p["by_type"]["ad_impression"],
                "{learner}"
            );
            assert!(learner["updates"].as_u64().unwrap() > 0, "{learner}");
            assert_eq!(learner["failed"], 0);
            // Hourly windows, the fixed effect refit every 2.
            let windows = learner["windows"].as_array().unwrap().len() as u64;
            let refits = learner["fixed_effect_refits"].as_u64().unwrap();
            assert!(
                windows >= 4 && refits >= 1 && refits <= windows / 2 + 1,
                "{learner}"
            );
            // Attribution labelled them, the features were computed, the
            // examples file holds one line per example.
            assert_eq!(p["examples"]["written"], learner["examples"], "{p}");
            assert_eq!(p["attribution"]["positives"], learner["positives"], "{p}");
            assert_eq!(p["features"].as_array().unwrap().len(), 4, "{p}");
            assert!(p["late"].as_u64().unwrap() > 0, "{p}");
            assert!(learner["auc"].as_f64().unwrap() > 0.5, "{learner}");
        } else {
            // The matcher ran on every ride request and wrote its dispatches.
            let m = &p["matching"];
            assert_eq!(m["policy"], "value", "{m}");
            assert_eq!(m["requests"], p["by_type"]["ride_request"], "{m}");
            let dispatched = m["dispatched"].as_u64().unwrap();
            assert!(dispatched > 0, "{m}");
            assert_eq!(m["dispatches"]["written"], dispatched, "{m}");
            assert!(m["value_states"].as_u64().unwrap() > 0, "{m}");
            assert!(m["td_updates"].as_u64().unwrap() > dispatched, "{m}");
            assert_eq!(m["late_events"], 0, "{m}");
            let written = std::fs::read_to_string(&dispatches).unwrap();
            assert_eq!((written.lines().count() - before) as u64, dispatched);
            let first: serde_json::Value =
                serde_json::from_str(written.lines().nth(before).unwrap()).unwrap();
            assert_eq!(first["type"], "dispatch");
            assert!(
                done.stderr.contains("dispatch: matcher (value)"),
                "{}",
                done.stderr
            );
        }
        assert!(
            done.stderr
                .contains(&format!("{name}: read 60000 from generator")),
            "human summary on stderr:\n{}",
            done.stderr
        );
    }
}

/// A slow job: 2 processes generating at 2,000 events/s for ~30 s.
fn slow_cluster(dir: &std::path::Path) -> std::path::PathBuf {
    let job = "[jobs.count]\nevents = 60_000\nepoch_events = 1_000\nevents_per_second = 2_000.0\n";
    write(dir, "slow.toml", &layout_manifest(2, 1, job))
}

#[test]
fn a_failed_process_stops_the_others_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = slow_cluster(dir.path());
    let path = path.to_str().unwrap();
    let up = spawn_dima(&["up", path]);
    let victim = eventually(Duration::from_secs(10), || {
        pids_with_args(&[path, "--process 1"]).first().copied()
    })
    .expect("process 1 starts");
    // Let it get going, then kill it the hard way.
    std::thread::sleep(Duration::from_millis(300));
    std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let done = wait(up, Duration::from_secs(20));
    assert!(!done.status.success());
    assert_eq!(done.status.code(), Some(1));
    assert!(
        done.stderr.contains("process 1 (127.0.0.1:")
            && done.stderr.contains("killed by signal 9 (SIGKILL)"),
        "the failure names the process and its status:\n{}",
        done.stderr
    );
    assert!(
        pids_with_args(&[path, "run"]).is_empty(),
        "no child is left running"
    );
}

#[test]
fn sigterm_stops_every_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = slow_cluster(dir.path());
    let path = path.to_str().unwrap();
    let up = spawn_dima(&["up", path]);
    eventually(Duration::from_secs(10), || {
        (pids_with_args(&[path, "run"]).len() == 2).then_some(())
    })
    .expect("both processes start");
    std::thread::sleep(Duration::from_millis(300));
    std::process::Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .unwrap();
    let done = wait(up, Duration::from_secs(20));
    assert_eq!(done.status.code(), Some(143), "stderr:\n{}", done.stderr);
    assert!(
        done.stderr.contains("stopped by SIGTERM"),
        "{}",
        done.stderr
    );
    assert!(
        pids_with_args(&[path, "run"]).is_empty(),
        "no child is left running"
    );
    done.assert_no_panic();
}

#[test]
fn a_missing_peer_times_out_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = layout_manifest(2, 1, "").replacen(
        "[[dataflow.processes]]",
        "[dataflow]\nconnect_timeout_ms = 500\n\n[[dataflow.processes]]",
        1,
    );
    let path = write(dir.path(), "m.toml", &manifest);
    let done = run_dima(
        &["run", path.to_str().unwrap(), "--process", "0"],
        Duration::from_secs(20),
    );
    assert_eq!(done.status.code(), Some(1), "stderr:\n{}", done.stderr);
    assert!(
        done.stderr
            .contains("peers not connected within 500ms: process 1 at 127.0.0.1:"),
        "{}",
        done.stderr
    );
    done.assert_no_panic();
}

#[test]
fn a_stranger_on_the_port_is_refused_and_the_mesh_still_forms() {
    // A client that is not a Dima peer connects first; process 0 must turn it
    // away and still accept process 1.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.toml", &layout_manifest(2, 1, JOB));
    let text = std::fs::read_to_string(&path).unwrap();
    let address = text
        .split('"')
        .find(|s| s.starts_with("127.0.0.1:"))
        .unwrap()
        .to_owned();
    let p0 = spawn_dima(&["run", path.to_str().unwrap(), "--process", "0"]);
    let stranger = eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect(&address).ok()
    })
    .unwrap();
    {
        use std::io::Write;
        let mut s = &stranger;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    }
    let p1 = spawn_dima(&["run", path.to_str().unwrap(), "--process", "1"]);
    let done0 = wait(p0, Duration::from_secs(30));
    let done1 = wait(p1, Duration::from_secs(30));
    done0.assert_success();
    done1.assert_success();
    assert!(
        done0.stderr.contains("refused a connection"),
        "{}",
        done0.stderr
    );
    assert!(done0.last_line().starts_with(r#"{"job":"count""#));
    drop(stranger);
}

#[test]
fn ctrl_c_while_waiting_for_peers_exits_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.toml", &layout_manifest(2, 1, ""));
    let p0 = spawn_dima(&["run", path.to_str().unwrap(), "--process", "0"]);
    std::thread::sleep(Duration::from_millis(300));
    std::process::Command::new("kill")
        .args(["-INT", &p0.id().to_string()])
        .status()
        .unwrap();
    // The default connect timeout is 60 s: only the signal can end it this soon.
    let done = wait(p0, Duration::from_secs(5));
    assert_eq!(done.status.code(), Some(130), "stderr:\n{}", done.stderr);
    assert!(
        done.stderr.contains("interrupted while waiting for peers"),
        "{}",
        done.stderr
    );
}
