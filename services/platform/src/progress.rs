//! Progress of long operator commands (`catalogctl replay`, `catalogctl dlq redrive`): a bar with rate
//! and ETA (indicatif) when standard error is a terminal, plain lines every few seconds when it is not
//! (a log file, CI, `kubectl logs`), so both people and log collectors get something readable.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often the plain form prints a line.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// One operation's progress; see the module docs.
pub struct Progress {
    label: &'static str,
    unit: &'static str,
    form: Form,
}

enum Form {
    Bar(indicatif::ProgressBar),
    Plain {
        out: Box<dyn Write + Send>,
        started: Instant,
        last: Option<Instant>,
        done: u64,
        total: Option<u64>,
        /// (done, total) of the last line printed.
        printed: Option<(u64, Option<u64>)>,
    },
}

impl Progress {
    /// Progress of `label` counted in `unit` (e.g. "events"), drawn on standard error.
    pub fn new(label: &'static str, unit: &'static str) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix}: [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} {msg} \
                     ({per_sec}, ETA {eta})",
                )
                .expect("the template is valid"),
            );
            bar.set_prefix(label);
            bar.set_message(unit);
            bar.enable_steady_tick(Duration::from_millis(200));
            Self {
                label,
                unit,
                form: Form::Bar(bar),
            }
        } else {
            Self::plain(label, unit, Box::new(std::io::stderr()))
        }
    }

    /// The plain form, writing to `out` (tests).
    pub fn plain(label: &'static str, unit: &'static str, out: Box<dyn Write + Send>) -> Self {
        Self {
            label,
            unit,
            form: Form::Plain {
                out,
                started: Instant::now(),
                last: None,
                done: 0,
                total: None,
                printed: None,
            },
        }
    }

    /// `done` of `total` so far (`total` may grow while the operation runs: a replay chases a live
    /// log).
    pub fn update(&mut self, done: u64, total: u64) {
        match &mut self.form {
            Form::Bar(bar) => {
                bar.set_length(total.max(done));
                bar.set_position(done);
            }
            Form::Plain {
                last,
                done: d,
                total: t,
                ..
            } => {
                *d = done;
                *t = Some(total.max(done));
                if last.is_none_or(|l| l.elapsed() >= PLAIN_EVERY) {
                    *last = Some(Instant::now());
                    self.print_line();
                }
            }
        }
    }

    /// Ends the display with a last line saying `outcome`.
    pub fn finish(mut self, outcome: &str) {
        match &mut self.form {
            Form::Bar(bar) => {
                bar.finish_with_message(format!("{} — {outcome}", self.unit));
                // The finished bar stays on its line; what the command prints next starts below it.
                eprintln!();
            }
            Form::Plain {
                done,
                total,
                printed,
                ..
            } => {
                if *printed != Some((*done, *total)) {
                    self.print_line();
                }
                if let Form::Plain { out, .. } = &mut self.form {
                    let _ = writeln!(out, "{}: {outcome}", self.label);
                }
            }
        }
    }

    fn print_line(&mut self) {
        let Form::Plain {
            out,
            started,
            done,
            total,
            printed,
            ..
        } = &mut self.form
        else {
            return;
        };
        *printed = Some((*done, *total));
        let elapsed = started.elapsed().as_secs_f64().max(0.001);
        #[allow(clippy::cast_precision_loss)]
        let rate = *done as f64 / elapsed;
        let total = total.unwrap_or(*done);
        let left = total.saturating_sub(*done);
        #[allow(clippy::cast_precision_loss)]
        let eta = if rate > 0.0 {
            format!("{:.0} s", left as f64 / rate)
        } else {
            "unknown".to_owned()
        };
        let _ = writeln!(
            out,
            "{}: {done}/{total} {} ({rate:.0}/s, ETA {eta}, {elapsed:.0} s elapsed)",
            self.label, self.unit
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn without_a_terminal_progress_is_plain_lines_at_most_every_few_seconds() {
        let out = Shared::default();
        let mut p = Progress::plain("replay", "events", Box::new(out.clone()));
        p.update(10, 100);
        // Updates in quick succession print nothing more (a line every 5 s, not per batch).
        for done in 11..50 {
            p.update(done, 100);
        }
        p.finish("caught up");
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("replay: 10/100 events ("), "{text}");
        assert!(lines[0].contains("/s, ETA "), "{text}");
        assert!(lines[1].starts_with("replay: 49/100 events ("), "{text}");
        assert_eq!(lines[2], "replay: caught up");
        assert!(
            !text.contains('\r') && !text.contains('\u{1b}'),
            "no terminal codes: {text:?}"
        );

        // A state already printed is not printed again by `finish`.
        let out = Shared::default();
        let mut p = Progress::plain("redrive", "products", Box::new(out.clone()));
        p.update(5, 5);
        p.finish("done");
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
    }
}
