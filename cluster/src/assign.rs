//! `dima assign`: reading assignment problems from files.

use std::path::Path;

use anyhow::{Context, bail};
use dataflows::matching::Problem;

/// Reads a JSON edge list (`{"rows":R,"cols":C,"edges":[[r,c,w],...]}`) or,
/// for any other content, a dense CSV matrix (one row per line, no header).
pub fn read_problem(path: &Path) -> anyhow::Result<Problem> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.trim_start().starts_with('{') {
        parse_json(&text).with_context(|| format!("{}", path.display()))
    } else {
        parse_csv(&text).with_context(|| format!("{}", path.display()))
    }
}

fn parse_json(text: &str) -> anyhow::Result<Problem> {
    let value: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    let size = |key: &str| -> anyhow::Result<usize> {
        value[key]
            .as_u64()
            .map(|n| n as usize)
            .with_context(|| format!("{key:?} must be a non-negative integer"))
    };
    let (rows, cols) = (size("rows")?, size("cols")?);
    let Some(list) = value["edges"].as_array() else {
        bail!("\"edges\" must be an array of [row, col, weight]");
    };
    let mut edges = Vec::with_capacity(list.len());
    for (i, edge) in list.iter().enumerate() {
        let parts = edge.as_array().filter(|a| a.len() == 3);
        let parsed = parts.and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?, a[2].as_f64()?)));
        let Some((r, c, w)) = parsed else {
            bail!("edges[{i}]: {edge} is not [row, col, weight] with integer row and col");
        };
        edges.push((r as usize, c as usize, w));
    }
    Ok(Problem { rows, cols, edges })
}

fn parse_csv(text: &str) -> anyhow::Result<Problem> {
    let mut edges = Vec::new();
    let mut cols = None;
    let mut rows = 0;
    for (r, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        match cols {
            None => cols = Some(cells.len()),
            Some(n) if n != cells.len() => {
                bail!(
                    "line {}: {} cells, the first line has {n}",
                    r + 1,
                    cells.len()
                )
            }
            _ => {}
        }
        for (c, cell) in cells.iter().enumerate() {
            let w: f64 = cell.parse().with_context(|| {
                format!("line {}, cell {}: {cell:?} is not a number", r + 1, c + 1)
            })?;
            edges.push((r, c, w));
        }
        rows += 1;
    }
    Ok(Problem {
        rows,
        cols: cols.unwrap_or(0),
        edges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_csv_problems_parse_and_bad_ones_say_where() {
        let p = parse_json(r#"{"rows":2,"cols":3,"edges":[[0,1,2.5],[1,2,-1]]}"#).unwrap();
        assert_eq!((p.rows, p.cols, p.edges.len()), (2, 3, 2));
        let e = parse_json(r#"{"rows":2,"cols":3,"edges":[[0,1]]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("edges[0]"), "{e}");
        let p = parse_csv("1,2\n3,4\n").unwrap();
        assert_eq!((p.rows, p.cols, p.edges.len()), (2, 2, 4));
        let e = format!("{:#}", parse_csv("1,2\n3,x\n").unwrap_err());
        assert!(e.contains("line 2, cell 2: \"x\" is not a number"), "{e}");
        let e = parse_csv("1,2\n3\n").unwrap_err().to_string();
        assert!(e.contains("line 2: 1 cells"), "{e}");
    }
}
