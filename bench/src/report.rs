//! The report: rows, the markdown table, JSON and an SVG chart.

use std::fmt::Write as _;

use serde::Serialize;

use crate::Stats;

/// One figure.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Row {
    pub(crate) backend: String,
    pub(crate) metric: String,
    /// The figure (p50 in µs for latencies).
    pub(crate) value: f64,
    pub(crate) unit: String,
    pub(crate) p99_us: Option<f64>,
    /// value / baseline (latency) or value / limit (rate).
    pub(crate) ratio: Option<f64>,
    pub(crate) baseline: Option<String>,
    /// The target ratio (at most for latencies, at least for comparisons).
    pub(crate) target: Option<f64>,
    pub(crate) met: Option<bool>,
}

impl Row {
    pub(crate) fn latency(
        b: &str,
        m: &str,
        s: Stats,
        base: f64,
        base_name: &str,
        target: Option<f64>,
    ) -> Self {
        let ratio = if base > 0.0 {
            s.p50_us / base
        } else {
            f64::NAN
        };
        Self {
            backend: b.into(),
            metric: m.into(),
            value: s.p50_us,
            unit: "µs p50".into(),
            p99_us: Some(s.p99_us),
            ratio: Some(ratio),
            baseline: Some(base_name.into()),
            target,
            met: target.map(|t| ratio <= t),
        }
    }

    pub(crate) fn rate(
        b: &str,
        m: &str,
        r: f64,
        limit: f64,
        limit_name: &str,
        target: Option<f64>,
    ) -> Self {
        let ratio = if limit > 0.0 { r / limit } else { f64::NAN };
        Self {
            backend: b.into(),
            metric: m.into(),
            value: r,
            unit: "cycles/s".into(),
            p99_us: None,
            ratio: Some(ratio),
            baseline: Some(limit_name.into()),
            target,
            met: target.map(|t| ratio >= t),
        }
    }

    pub(crate) fn compare(
        b: &str,
        m: &str,
        ours: f64,
        peer: f64,
        peer_name: &str,
        at_least: f64,
    ) -> Self {
        let ratio = if peer > 0.0 { ours / peer } else { f64::NAN };
        Self {
            backend: b.into(),
            metric: m.into(),
            value: ours,
            unit: "cycles/s".into(),
            p99_us: None,
            ratio: Some(ratio),
            baseline: Some(peer_name.into()),
            target: Some(at_least),
            met: Some(ratio >= at_least),
        }
    }

    pub(crate) fn value(b: &str, m: &str, v: f64, unit: &str) -> Self {
        Self {
            backend: b.into(),
            metric: m.into(),
            value: v,
            unit: unit.into(),
            p99_us: None,
            ratio: None,
            baseline: None,
            target: None,
            met: None,
        }
    }
}

/// The whole run.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) quick: bool,
    pub(crate) machine: String,
    pub(crate) rows: Vec<Row>,
    pub(crate) notes: Vec<(String, String)>,
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        })
        .map_or_else(String::new, |kb| format!(", {} GiB", kb / 1024 / 1024));
    format!("{cpus} cores ({model}){mem}; servers on loopback, started by the run")
}

impl Report {
    pub(crate) fn new(quick: bool) -> Self {
        Self {
            quick,
            machine: machine(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn note(&mut self, backend: &str, text: &str) {
        self.notes.push((backend.into(), text.into()));
    }

    pub(crate) fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Machine: {}. Mode: {}.\n",
            self.machine,
            if self.quick { "--quick" } else { "full" }
        );
        let _ = writeln!(
            s,
            "| backend | metric | value | p99 | ratio | to | target | met |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for r in &self.rows {
            let p99 = r.p99_us.map_or(String::new(), |p| format!("{p:.0} µs"));
            let ratio = r.ratio.map_or(String::new(), |x| format!("{x:.2}x"));
            let target = match (r.target, r.unit.as_str()) {
                (Some(t), "µs p50") => format!("≤ {t}x"),
                (Some(t), _) => format!("≥ {t}x"),
                (None, _) => String::new(),
            };
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            // Whole units, but a tenth below 100 where the figure has one (CPU per cycle,
            // average ops per hand-off).
            let value = if r.value.abs() < 100.0 && r.value.fract() != 0.0 && r.unit != "µs p50" {
                format!("{:.1}", r.value)
            } else {
                format!("{:.0}", r.value)
            };
            let _ = writeln!(
                s,
                "| {} | {} | {value} {} | {p99} | {ratio} | {} | {target} | {met} |",
                r.backend,
                r.metric,
                r.unit,
                r.baseline.as_deref().unwrap_or("")
            );
        }
        for (b, n) in &self.notes {
            let _ = writeln!(s, "\n- {b}: {n}");
        }
        s
    }

    /// A bar chart of hand-off p50 (µs, 16 waiters) and 64-task throughput per backend.
    pub(crate) fn svg(&self) -> String {
        let pick = |metric: &str| -> Vec<(String, f64)> {
            self.rows
                .iter()
                .filter(|r| r.metric == metric)
                .map(|r| (r.backend.clone(), r.value))
                .collect()
        };
        let panels = [
            (
                "hand-off p50 with 16 waiters (µs, lower is better)",
                pick("hand-off, 16 waiters"),
            ),
            (
                "throughput with 64 tasks (cycles/s, higher is better)",
                pick("throughput, 64 tasks"),
            ),
        ];
        let (w, bar_h, gap, label_w) = (760.0, 22.0, 8.0, 150.0);
        let mut y = 20.0;
        let mut body = String::new();
        for (title, bars) in &panels {
            let _ = writeln!(
                body,
                r#"<text x="10" y="{y}" font-size="14" font-weight="bold">{title}</text>"#
            );
            y += 12.0;
            let max = bars.iter().map(|b| b.1).fold(0.0_f64, f64::max).max(1.0);
            for (name, v) in bars {
                let len = (w - label_w - 90.0) * v / max;
                let _ = writeln!(
                    body,
                    r##"<text x="10" y="{ty}" font-size="12">{name}</text><rect x="{label_w}" y="{y}" width="{len:.1}" height="{bar_h}" fill="#4a7fb5"/><text x="{tx:.1}" y="{ty}" font-size="12">{v:.0}</text>"##,
                    ty = y + 15.0,
                    tx = label_w + len + 6.0
                );
                y += bar_h + gap;
            }
            y += 24.0;
        }
        format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{y}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
{body}</svg>
"#
        )
    }

    /// Writes `target/bench/report.{md,json}` and `chart.svg`.
    pub(crate) fn write(&self) -> std::io::Result<String> {
        let dir = std::path::Path::new("target/bench");
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_string_pretty(self).unwrap_or_default(),
        )?;
        std::fs::write(dir.join("chart.svg"), self.svg())?;
        Ok(dir.display().to_string())
    }
}
