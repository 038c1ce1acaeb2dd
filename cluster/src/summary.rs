//! The short human summary `dima up` prints (on stderr) before each job's
//! JSON result line (on stdout).

use serde_json::Value;

/// Lines describing a result line, or none for an unknown job.
pub fn human(result: &Value) -> Vec<String> {
    let number = |v: &Value| v.as_u64().unwrap_or(0);
    match result.get("job").and_then(Value::as_str) {
        Some("count") => vec![format!(
            "count: {} events over {} keys (checksum {})",
            number(&result["events"]),
            number(&result["keys"]),
            result["checksum"].as_str().unwrap_or("?")
        )],
        Some("pipelines") => result["pipelines"]
            .as_array()
            .map(|pipelines| {
                pipelines
                    .iter()
                    .flat_map(|p| {
                        let types: Vec<String> = p["by_type"]
                            .as_object()
                            .map(|m| m.iter().map(|(t, n)| format!("{t} {}", number(n))).collect())
                            .unwrap_or_default();
                        let mut lines = vec![format!(
                            "{}: read {} from {}, {} valid ({}), {} malformed -> {} (sink {}: {} written)",
                            p["name"].as_str().unwrap_or("?"),
                            number(&p["read"]),
                            p["source"].as_str().unwrap_or("?"),
                            number(&p["valid"]),
                            types.join(", "),
                            number(&p["malformed"]),
                            p["dead_letter"]["path"].as_str().unwrap_or("?"),
                            p["sink"]["kind"].as_str().unwrap_or("?"),
                            number(&p["sink"]["written"]),
                        )];
                        let l = &p["learner"];
                        if l.is_object() {
                            let metric = |v: &Value| v.as_f64().map_or("n/a".to_owned(), |x| format!("{x:.4}"));
                            lines.push(format!(
                                "{}: learner: {} examples ({} clicks), {} updates of {} campaign models over {} windows, {} failed; progressive AUC {}, logloss {}",
                                p["name"].as_str().unwrap_or("?"),
                                number(&l["examples"]),
                                number(&l["positives"]),
                                number(&l["updates"]),
                                number(&l["entities"]),
                                l["windows"].as_array().map_or(0, Vec::len),
                                number(&l["failed"]),
                                metric(&l["auc"]),
                                metric(&l["logloss"]),
                            ));
                        }
                        lines
                    })
                    .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}
