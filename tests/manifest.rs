//! Bad input: every broken manifest or environment gets one clear message
//! and a non-zero exit, never a panic or a hang.

use std::time::Duration;

use dima_tests::{Finished, free_port, layout_manifest, run_dima, write};

const LIMIT: Duration = Duration::from_secs(20);

fn validate(text: &str) -> Finished {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.toml", text);
    run_dima(&["validate", path.to_str().unwrap()], LIMIT)
}

fn assert_rejected(done: &Finished, code: i32, needles: &[&str]) {
    done.assert_rejected(code, needles);
}

#[test]
fn missing_file() {
    let done = run_dima(&["validate", "/nonexistent/dima.toml"], LIMIT);
    assert_rejected(
        &done,
        2,
        &[
            "cannot read manifest /nonexistent/dima.toml",
            "No such file",
        ],
    );
    let done = run_dima(&["up", "/nonexistent/dima.toml"], LIMIT);
    assert_rejected(&done, 2, &["cannot read manifest /nonexistent/dima.toml"]);
}

#[test]
fn unreadable_file() {
    // A directory cannot be read as a file, even by root.
    let dir = tempfile::tempdir().unwrap();
    let done = run_dima(&["validate", dir.path().to_str().unwrap()], LIMIT);
    assert_rejected(&done, 2, &["cannot read manifest", "Is a directory"]);
}

#[test]
fn toml_syntax_error_has_line_and_column() {
    let done = validate("[cluster]\nname = \"x\"\n[dataflow\n");
    assert_rejected(&done, 2, &["bad.toml:3:", "TOML syntax error"]);
}

#[test]
fn unknown_field_is_named() {
    let done = validate("[[dataflow.processes]]\naddress = \"127.0.0.1:2101\"\nworker = 2\n");
    assert_rejected(
        &done,
        2,
        &[
            "bad.toml:3:1",
            "dataflow.processes[0]",
            "unknown field `worker`",
        ],
    );
}

#[test]
fn wrong_type_is_named() {
    let done =
        validate("[[dataflow.processes]]\naddress = \"127.0.0.1:2101\"\nworkers = \"two\"\n");
    assert_rejected(
        &done,
        2,
        &[
            "dataflow.processes[0].workers",
            "invalid type: string \"two\"",
        ],
    );
}

#[test]
fn duplicate_addresses_and_zero_workers_are_reported_together() {
    let done = validate(
        "[[dataflow.processes]]\naddress = \"127.0.0.1:2101\"\nworkers = 0\n\
         [[dataflow.processes]]\naddress = \"127.0.0.1:2101\"\nworkers = 0\n\
         [[dataflow.processes]]\naddress = \"127.0.0.1:x\"\n",
    );
    assert_rejected(
        &done,
        2,
        &[
            "(4 problems)",
            "dataflow.processes[0].workers: must be at least 1",
            "dataflow.processes[1].workers: must be at least 1",
            "dataflow.processes[1].address: 127.0.0.1:2101 is already used by dataflow.processes[0].address",
            "dataflow.processes[2].address: \"127.0.0.1:x\" is not a socket address",
        ],
    );
}

#[test]
fn checkpoints_fields_are_named_when_wrong() {
    let done = validate("[checkpoints]\nevery_s = -1\nkeep = 0\n");
    assert_rejected(
        &done,
        2,
        &[
            "checkpoints.dir: is required",
            "checkpoints.every_s: -1 is not a number of seconds",
            "checkpoints.keep: must be at least 1",
            "checkpoints: there are no [pipelines.*] to checkpoint",
        ],
    );
    let done = validate("[checkpoints]\ndir = \"c\"\nevery = 3\n");
    assert_rejected(&done, 2, &["checkpoints.every", "unknown field"]);
}

#[test]
fn inference_section_validates_and_names_its_problems() {
    let done = validate("[inference]\nmodel = \"gemma3-270m\"\ntp = 2\n");
    done.assert_success();
    assert!(
        done.stdout.contains(
            "inference: gemma3-270m as \"gemma3-270m\" on cpu, tp 2 (all in process 0 (threads))"
        ),
        "{}",
        done.stdout
    );
    let done = validate(
        "[inference]\nmodel = \"gemma3-270m\"\nbackend = \"cuda\"\ntp = 2\nranks = [3, 0]\n",
    );
    assert_rejected(
        &done,
        2,
        &[
            "inference.backend: \"cuda\" runs every rank in one process for now",
            "inference.ranks[0]: process 3 does not exist",
        ],
    );
    let done =
        validate("[inference]\nmodel = \"gemma3-270m\"\nbackend = \"cuda\"\ndevices = [1]\n");
    done.assert_success();
    assert!(
        done.stdout.contains("on cuda devices [1]"),
        "{}",
        done.stdout
    );
}

#[test]
fn process_port_in_use_at_start_up() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let manifest = format!(
        "[[dataflow.processes]]\naddress = \"127.0.0.1:{port}\"\n[[dataflow.processes]]\naddress = \"127.0.0.1:{}\"\n",
        free_port()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.toml", &manifest);
    let done = run_dima(&["up", path.to_str().unwrap()], LIMIT);
    assert_rejected(
        &done,
        1,
        &[
            &format!("dataflow.processes[0].address 127.0.0.1:{port}: cannot listen"),
            "in use",
        ],
    );
    // `dima run` on its own reports the same.
    let done = run_dima(&["run", path.to_str().unwrap(), "--process", "0"], LIMIT);
    assert_rejected(
        &done,
        1,
        &[&format!(
            "dataflow.processes[0].address 127.0.0.1:{port}: cannot listen"
        )],
    );
}

#[test]
fn metrics_port_in_use_at_start_up() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let manifest = layout_manifest(
        1,
        1,
        &format!("[telemetry]\nmetrics_address = \"127.0.0.1:{port}\"\n"),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.toml", &manifest);
    let done = run_dima(&["up", path.to_str().unwrap()], LIMIT);
    assert_rejected(
        &done,
        1,
        &[&format!(
            "dataflow.processes[0].metrics_address 127.0.0.1:{port}: cannot listen"
        )],
    );
}

#[test]
fn process_index_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.toml", &layout_manifest(2, 1, ""));
    let done = run_dima(&["run", path.to_str().unwrap(), "--process", "5"], LIMIT);
    assert_rejected(&done, 1, &["--process 5: the manifest has 2 process(es)"]);
}
