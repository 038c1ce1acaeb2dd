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
                            "{}: read {} from {}, {} valid ({}), {} malformed, {} late -> {} (sink {}: {} written)",
                            p["name"].as_str().unwrap_or("?"),
                            number(&p["read"]),
                            p["source"].as_str().unwrap_or("?"),
                            number(&p["valid"]),
                            types.join(", "),
                            number(&p["malformed"]),
                            number(&p["late"]),
                            p["dead_letter"]["path"].as_str().unwrap_or("?"),
                            p["sink"]["kind"].as_str().unwrap_or("?"),
                            number(&p["sink"]["written"]),
                        )];
                        if let Some(lag) = p["kafka_lag_records"].as_u64() {
                            lines.push(format!(
                                "{}: kafka: {} records left in the topic beyond what was read",
                                p["name"].as_str().unwrap_or("?"),
                                number(&Value::from(lag)),
                            ));
                        }
                        let a = &p["attribution"];
                        if a.is_object() {
                            let features: Vec<String> = p["features"]
                                .as_array()
                                .map(|f| {
                                    f.iter()
                                        .map(|f| format!("{} ({} keys)", f["name"].as_str().unwrap_or("?"), number(&f["keys"])))
                                        .collect()
                                })
                                .unwrap_or_default();
                            lines.push(format!(
                                "{}: attribution within {} s: {} positives, {} negatives, {} orphan clicks; {} examples -> {}; features: {}",
                                p["name"].as_str().unwrap_or("?"),
                                a["window_s"].as_f64().unwrap_or(0.0),
                                number(&a["positives"]),
                                number(&a["negatives"]),
                                number(&a["orphan_clicks"]),
                                number(&p["examples"]["written"]),
                                p["examples"]["kind"].as_str().unwrap_or("?"),
                                if features.is_empty() { "none".to_owned() } else { features.join(", ") },
                            ));
                        }
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
                        let m = &p["matching"];
                        if m.is_object() {
                            lines.push(format!(
                                "{}: matcher ({}): {} requests, {} dispatched ({:.1}%), {} expired, {} cancelled; value function {} states, {} TD updates; window p99 {:.2} ms; {} dispatches -> {}",
                                p["name"].as_str().unwrap_or("?"),
                                m["policy"].as_str().unwrap_or("?"),
                                number(&m["requests"]),
                                number(&m["dispatched"]),
                                100.0 * m["served_rate"].as_f64().unwrap_or(0.0),
                                number(&m["expired"]),
                                number(&m["cancelled"]),
                                number(&m["value_states"]),
                                number(&m["td_updates"]),
                                m["window_p99_ms"].as_f64().unwrap_or(0.0),
                                number(&m["dispatches"]["written"]),
                                m["dispatches"]["kind"].as_str().unwrap_or("?"),
                            ));
                        }
                        lines
                    })
                    .collect()
            })
            .unwrap_or_default(),
        Some("inference") => {
            let seconds = |v: &Value| v.as_f64().map_or("n/a".to_owned(), |x| format!("{x:.2} s"));
            let mut lines = vec![format!(
                "inference: {} on {} rank(s) ({}), served at http://{}: {} of {} requests ok, {} tokens at {:.1} tokens/s; time to first token p50 {}, inter-token p50 {}",
                result["model"].as_str().unwrap_or("?"),
                number(&result["tp"]),
                result["placement"].as_str().unwrap_or("?"),
                result["listen"].as_str().unwrap_or("?"),
                number(&result["ok"]),
                number(&result["requests"]),
                number(&result["completion_tokens"]),
                result["tokens_per_s"].as_f64().unwrap_or(0.0),
                seconds(&result["ttft_p50_s"]),
                seconds(&result["itl_p50_s"]),
            )];
            if let Some(errors) = result["errors"].as_array().filter(|e| !e.is_empty()) {
                for e in errors {
                    lines.push(format!("inference: failed: {}", e.as_str().unwrap_or("?")));
                }
            }
            lines
        }
        _ => Vec::new(),
    }
}

/// The text report of `dima simulate`.
pub fn simulation(r: &dataflows::matching::SimReport) -> String {
    let hourly: Vec<String> = r
        .hourly_served_rate
        .iter()
        .map(|x| format!("{:.1}%", 100.0 * x))
        .collect();
    format!(
        "{scenario}, policy {policy}, {hours} h, seed {seed}\n\
         requests {requests}, served {served} ({rate:.2}%), gave up waiting {gave_up}, declined {declined}\n\
         wait p50 {p50:.0} s, p95 {p95:.0} s; driver utilization {util:.1}%; revenue per driver hour {rev:.2}\n\
         value function: {states} states, {updates} TD updates, mean {mean:.2}\n\
         served rate by hour: {hourly}\n\
         {windows} windows, p99 {p99:.2} ms each; {speed:.0} simulated s per wall s\n",
        scenario = r.scenario,
        policy = r.policy,
        hours = r.hours,
        seed = r.seed,
        requests = r.requests,
        served = r.served,
        rate = 100.0 * r.served_rate,
        gave_up = r.cancelled_waiting,
        declined = r.declined,
        p50 = r.wait_p50_s,
        p95 = r.wait_p95_s,
        util = 100.0 * r.driver_utilization,
        rev = r.revenue_per_driver_hour,
        states = r.value_states,
        updates = r.td_updates,
        mean = r.value_mean,
        hourly = hourly.join(" "),
        windows = r.windows,
        p99 = r.window_p99_ms,
        speed = r.sim_seconds_per_wall_second,
    )
}
