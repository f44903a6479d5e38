//! Watches a whole run's tracing events and spans and the drivers' `log` records (every
//! crate, down to debug) and the labels of every metric it registers for the passwords and keys the checks use: none may
//! ever show, whatever the checks themselves looked at.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use lock_conformance::{CaseResult, Outcome};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tracing::field::{Field, Visit};
use tracing::{span, Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// The secrets the checks hand to the stores (passwords, a private key's armour).
pub const SECRETS: &[&str] = &["s3cret", "n0t-the-pw-7", "wr0ng-pw", "PRIVATE KEY"];

/// What the run showed.
#[derive(Debug, Default)]
pub struct Watch {
    events: AtomicU64,
    records: AtomicU64,
    series: AtomicU64,
    leaks: Mutex<Vec<String>>,
    /// Hooks that could not be installed (another was first).
    missing: Mutex<Vec<&'static str>>,
}

static WATCH: OnceLock<Arc<Watch>> = OnceLock::new();

impl Watch {
    /// Installs the process-wide tracing subscriber and metrics recorder (once).
    pub fn install() -> Arc<Watch> {
        WATCH
            .get_or_init(|| {
                let w = Arc::new(Watch::default());
                // Down to debug: trace is left out for its volume (it would slow the
                // timing-sensitive checks).
                let sub = tracing_subscriber::registry()
                    .with(tracing_subscriber::filter::LevelFilter::DEBUG)
                    .with(Scan(w.clone()));
                let mut missing = Vec::new();
                if tracing::subscriber::set_global_default(sub).is_err() {
                    missing.push("tracing subscriber");
                }
                if metrics::set_global_recorder(Labels(w.clone())).is_err() {
                    missing.push("metrics recorder");
                }
                match log::set_boxed_logger(Box::new(Logs(w.clone()))) {
                    Ok(()) => log::set_max_level(log::LevelFilter::Debug),
                    Err(_) => missing.push("log logger"),
                }
                *w.missing.lock().unwrap_or_else(|p| p.into_inner()) = missing;
                w
            })
            .clone()
    }

    fn look(&self, what: &str, text: &str) {
        if let Some(s) = SECRETS.iter().find(|s| text.contains(*s)) {
            let mut leaks = self.leaks.lock().unwrap_or_else(|p| p.into_inner());
            if leaks.len() < 5 {
                leaks.push(format!("{what} shows {s:?}: {text}"));
            }
        }
    }

    /// The run's verdict as a case, the run's own results (their details and reasons)
    /// scanned too: failed if a secret showed anywhere, or if a hook was missing or saw
    /// nothing while cases ran (a watch that saw nothing proves nothing).
    pub fn result(&self, cases: &[CaseResult]) -> CaseResult {
        for c in cases {
            self.look(
                &format!("the result of {}/{}", c.target, c.case),
                &format!("{:?}", c.outcome),
            );
        }
        let leaks = self.leaks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let missing = self
            .missing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (events, records, series) = (
            self.events.load(Ordering::Relaxed),
            self.records.load(Ordering::Relaxed),
            self.series.load(Ordering::Relaxed),
        );
        let ran = cases
            .iter()
            .any(|c| matches!(c.outcome, Outcome::Passed { .. } | Outcome::Failed { .. }));
        let outcome = if !leaks.is_empty() {
            Outcome::Failed {
                reason: leaks.join("; "),
            }
        } else if !missing.is_empty() {
            Outcome::Failed {
                reason: format!("not installed: {missing:?}"),
            }
        } else if !ran {
            Outcome::Skipped {
                reason: "no case ran".into(),
            }
        } else if events == 0 && series == 0 {
            // The hooks are in place (checked above): the cases that ran worked in other
            // processes only.
            Outcome::Skipped {
                reason: "nothing was logged or measured in this process".into(),
            }
        } else {
            Outcome::Passed {
                detail: format!(
                    "{events} tracing events and spans, {records} log records, {series} metric \
                     registrations, {} results: none shows {SECRETS:?}",
                    cases.len()
                ),
            }
        };
        let r = CaseResult {
            target: "secrets".into(),
            case: "no_password_or_key_in_logs_or_metric_labels".into(),
            outcome,
            millis: 0,
        };
        lock_conformance::print_result(&r);
        r
    }
}

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, " {}={value}", field.name());
    }
}

struct Scan(Arc<Watch>);

impl<S: Subscriber> Layer<S> for Scan {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        self.0.events.fetch_add(1, Ordering::Relaxed);
        let mut f = Fields(String::new());
        event.record(&mut f);
        self.0.look(event.metadata().target(), &f.0);
    }
    fn on_new_span(&self, attrs: &span::Attributes<'_>, _: &span::Id, _: Context<'_, S>) {
        self.0.events.fetch_add(1, Ordering::Relaxed);
        let mut f = Fields(String::new());
        attrs.record(&mut f);
        self.0.look(attrs.metadata().name(), &f.0);
    }
    fn on_record(&self, _: &span::Id, values: &span::Record<'_>, _: Context<'_, S>) {
        let mut f = Fields(String::new());
        values.record(&mut f);
        self.0.look("a span's field", &f.0);
    }
}

struct Logs(Arc<Watch>);

impl log::Log for Logs {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.records.fetch_add(1, Ordering::Relaxed);
        self.0.look(record.target(), &record.args().to_string());
    }
    fn flush(&self) {}
}

struct Labels(Arc<Watch>);

impl Labels {
    fn seen(&self, key: &Key) {
        self.0.series.fetch_add(1, Ordering::Relaxed);
        let text = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect::<Vec<_>>()
            .join(",");
        self.0.look(&format!("metric {}", key.name()), &text);
    }
}

impl Recorder for Labels {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.seen(key);
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.seen(key);
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.seen(key);
        Histogram::noop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_in_an_event_or_a_label_is_caught() {
        let w = Watch::install();
        tracing::warn!(url = "redis://app:s3cret@h", "connect failed");
        log::debug!("key: -----BEGIN PRIVATE KEY-----");
        metrics::counter!("lock_test_total", "url" => "n0t-the-pw-7").increment(1);
        let ran = CaseResult {
            target: "t".into(),
            case: "c".into(),
            outcome: Outcome::Passed {
                detail: "connected to postgres://app:wr0ng-pw@h".into(),
            },
            millis: 0,
        };
        let r = w.result(&[ran]);
        let Outcome::Failed { reason } = r.outcome else {
            panic!("not caught: {:?}", r.outcome)
        };
        for s in SECRETS {
            assert!(reason.contains(s), "{s} not caught: {reason}");
        }
    }
}
