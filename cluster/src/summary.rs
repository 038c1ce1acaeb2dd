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
                    .map(|p| {
                        let types: Vec<String> = p["by_type"]
                            .as_object()
                            .map(|m| m.iter().map(|(t, n)| format!("{t} {}", number(n))).collect())
                            .unwrap_or_default();
                        format!(
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
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}
